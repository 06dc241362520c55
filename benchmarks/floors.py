"""The floors: what this machine does with no remote-execution layer at all.

- raw loopback TCP throughput, plain Python sockets, sender in its own process;
- local pipe throughput: `head -c N /dev/zero` read by Python (default 64 KiB pipe, and a
  1 MiB pipe via F_SETPIPE_SZ);
- the relay: `head -c N /dev/zero` read by one Python process and sent over loopback TCP to
  another, with no framing, no encryption and no protocol: the streaming download's path
  with nothing of rexec's on it, so what any remote runner on this machine can approach;
- asyncio spawn of `true` (create_subprocess_exec + communicate/wait), one at a time;
- asyncio spawn-and-wait of N concurrent `sh -c 'sleep 0.2; echo ok'`;
- (info) the same two with subprocess.Popen and a pidfd watched by the event loop instead of
  asyncio's child watcher (Python 3.11's default spawns a thread per child): the lower bound
  a server built that way can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import subprocess
import time

from benchmarks.openssh import LOOPBACK
from benchmarks.runtime import PYTHON

BUF = 1 << 20
SOCKBUF = 4 << 20
F_SETPIPE_SZ = 1031

SENDER = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
buf = bytes(1 << 20)
view = memoryview(buf)
full, rest = divmod(n, len(buf))
for _ in range(full):
    s.sendall(buf)
if rest:
    s.sendall(view[:rest])
s.shutdown(socket.SHUT_WR)
s.close()
"""


RELAY = """
import os, socket, subprocess, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
head = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
fd = head.stdout.fileno()
buf = bytearray(1 << 20)
view = memoryview(buf)
for _ in range(n + 1):
    got = os.readv(fd, [buf])
    if not got:
        break
    s.sendall(view[:got])
s.shutdown(socket.SHUT_WR)
s.close()
sys.exit(head.wait())
"""


def tcp_throughput(nbytes: int, timeout: float = 120.0, sender: str = SENDER) -> float:
    """MB/s from accept() to EOF: one Python process sends (`sender`: zeros from memory, or
    RELAY: a command's pipe), this one receives."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
        lsock.bind((LOOPBACK, 0))
        lsock.listen(1)
        lsock.settimeout(30)
        port = lsock.getsockname()[1]
        proc = subprocess.Popen([PYTHON, "-c", sender, str(port), str(nbytes)])
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(timeout)
                buf = bytearray(BUF)
                got = 0
                t0 = time.perf_counter()
                for _ in range(nbytes + 1):  # bounded: each recv returns >= 1 byte or EOF
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
                elapsed = time.perf_counter() - t0
            if proc.wait(timeout=30) != 0 or got != nbytes:
                raise RuntimeError(f"tcp floor: got {got} of {nbytes}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return nbytes / elapsed / 1e6


def pipe_throughput(nbytes: int, pipe_size: int | None = None) -> float:
    """MB/s for `head -c N /dev/zero` read by this process in 1 MiB reads."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(nbytes), "/dev/zero"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    if pipe_size:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
    buf = bytearray(BUF)
    got = 0
    try:
        for _ in range(nbytes + 1):
            n = os.readv(fd, [buf])
            if not n:
                break
            got += n
    finally:
        proc.stdout.close()
        rc = proc.wait(timeout=30)
    elapsed = time.perf_counter() - t0
    if rc != 0 or got != nbytes:
        raise RuntimeError(f"pipe floor: got {got} of {nbytes}, exit {rc}")
    return nbytes / elapsed / 1e6


async def spawn_true(count: int) -> list[float]:
    """Seconds per `true`: create_subprocess_exec with pipes, read to EOF, wait."""
    out: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "true",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await proc.communicate()
        out.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"true exited {proc.returncode}")
    return out


SLEEP_CMD = "sleep 0.2; echo ok"


async def spawn_many(n: int) -> float:
    """Seconds for n concurrent `sh -c 'sleep 0.2; echo ok'`, all read and reaped."""

    async def one() -> bytes:
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            SLEEP_CMD,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"sh exited {proc.returncode}")
        return out

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    if any(o != b"ok\n" for o in outs):
        raise RuntimeError("unexpected output from sh")
    return elapsed


async def _popen_pidfd(argv: list[str]) -> bytes:
    """Spawn with Popen, await exit through a pidfd in the loop, then read the pipes."""
    loop = asyncio.get_running_loop()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    pidfd = os.pidfd_open(proc.pid)
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(exited, 60)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()  # the child is gone: its small output and EOF are waiting
    proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.wait() != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return out


async def spawn_true_pidfd(count: int) -> list[float]:
    out: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        await _popen_pidfd(["true"])
        out.append(time.perf_counter() - t0)
    return out


async def spawn_many_pidfd(n: int) -> float:
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(_popen_pidfd(["sh", "-c", SLEEP_CMD]) for _ in range(n)))
    elapsed = time.perf_counter() - t0
    if any(o != b"ok\n" for o in outs):
        raise RuntimeError("unexpected output from sh")
    return elapsed
