"""The Python peers: an asyncssh server (own process) + client, and a paramiko client.

Each helper does one unit of work and checks its result (exit status, byte counts), so a
broken peer shows up as "unavailable: <reason>" rather than as a fast wrong number.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from benchmarks import procs
from benchmarks.model import Unavailable
from benchmarks.openssh import LOOPBACK, OpenSSH
from benchmarks.runtime import PYTHON, ROOT, tail, wait_file

if TYPE_CHECKING:
    import asyncssh
    import paramiko  # type: ignore[import-untyped]

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)


def _import_asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError as exc:
        raise Unavailable(f"asyncssh not installed ({exc}); pip install -e '.[bench]'") from exc
    return asyncssh


def _import_paramiko() -> Any:
    try:
        import paramiko
    except ImportError as exc:
        raise Unavailable(f"paramiko not installed ({exc}); pip install -e '.[bench]'") from exc
    return paramiko


class AsyncsshPeer:
    """asyncssh client (in this process) against an asyncssh server (its own process)."""

    def __init__(self) -> None:
        self.dir = procs.tempdir("rexec-bench-asyncssh-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""
        self.mod: Any = None

    def start(self) -> None:
        asyncssh = _import_asyncssh()
        self.mod = asyncssh
        self.version = asyncssh.__version__
        host = asyncssh.generate_private_key("ssh-ed25519")
        host.write_private_key(str(self.dir / "host_ed25519"))
        client = asyncssh.generate_private_key("ssh-ed25519")
        client.write_private_key(str(self.dir / "client_ed25519"))
        client.write_public_key(str(self.dir / "authorized_keys"))
        ready = self.dir / "ready"
        log = (self.dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "benchmarks.asyncssh_server",
                "--host-key",
                str(self.dir / "host_ed25519"),
                "--authorized-keys",
                str(self.dir / "authorized_keys"),
                "--ready-file",
                str(ready),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        procs.on_cleanup("asyncssh server", self.stop)
        try:
            addr = wait_file(ready, self.proc, 15.0, "asyncssh server")
        except Unavailable as exc:
            raise Unavailable(f"{exc}: {tail(self.dir / 'server.log')}") from exc
        self.port = int(addr.splitlines()[0].rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_popen(self.proc)
            self.proc = None

    def connect(self) -> Any:
        """asyncssh.connect(...): awaitable and async context manager."""
        return self.mod.connect(
            LOOPBACK,
            self.port,
            username="bench",
            known_hosts=None,
            client_keys=[str(self.dir / "client_ed25519")],
            agent_path=None,
            config=None,
            connect_timeout=30,
        )

    @staticmethod
    async def run(conn: asyncssh.SSHClientConnection, command: str) -> bytes:
        res = await conn.run(command, encoding=None, check=False, stdin=asyncssh_devnull())
        if res.exit_status != 0:
            raise RuntimeError(f"asyncssh {command!r}: exit {res.exit_status}")
        out = res.stdout
        return out if isinstance(out, bytes) else (out or "").encode()

    @staticmethod
    async def download(conn: asyncssh.SSHClientConnection, nbytes: int) -> None:
        proc = await conn.create_process(f"head -c {nbytes} /dev/zero", encoding=None)
        proc.stdin.write_eof()
        got = 0
        for _ in range(nbytes):  # bounded: at least one byte per read
            data = await proc.stdout.read(CHUNK)
            if not data:
                break
            got += len(data)
        res = await proc.wait()
        if got != nbytes or res.exit_status != 0:
            raise RuntimeError(
                f"asyncssh download: {got} of {nbytes} bytes, exit {res.exit_status}"
            )

    @staticmethod
    async def upload(conn: asyncssh.SSHClientConnection, nbytes: int) -> None:
        proc = await conn.create_process("wc -c", encoding=None)
        for _ in range(nbytes // CHUNK):
            proc.stdin.write(ZEROS)
            await proc.stdin.drain()
        proc.stdin.write_eof()
        out = await proc.stdout.read()
        res = await proc.wait()
        if res.exit_status != 0 or int(out or b"-1") != nbytes:
            raise RuntimeError(f"asyncssh upload: remote counted {out!r}, exit {res.exit_status}")

    @staticmethod
    async def sftp(conn: asyncssh.SSHClientConnection, op: str, src: str, dst: str) -> None:
        """One SFTP put or get on an open connection, with asyncssh's defaults (it takes the
        server's 4 MiB read/write limits and keeps up to 128 requests in flight)."""
        async with conn.start_sftp_client() as sftp:
            if op == "put":
                await sftp.put(src, dst, recurse=True)
            else:
                await sftp.get(src, dst, recurse=True)


def asyncssh_devnull() -> Any:
    import asyncssh

    return asyncssh.DEVNULL


class ParamikoPeer:
    """paramiko client against the private sshd."""

    def __init__(self, sshd: OpenSSH) -> None:
        self.sshd = sshd
        self.mod: Any = None
        self.version = ""

    def start(self) -> None:
        self.mod = _import_paramiko()
        self.version = self.mod.__version__
        if self.sshd.proc is None:
            raise Unavailable("needs the private sshd, which is not running")

    def connect(self, nodelay: bool = True) -> paramiko.SSHClient:
        """Connect to the private sshd. paramiko leaves Nagle on (no TCP_NODELAY), which
        costs ~40 ms per command here (delayed ACK); by default we hand it a socket with
        TCP_NODELAY set, so the peer is measured at its best."""
        sock = socket.create_connection((LOOPBACK, self.sshd.port), timeout=30)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = self.mod.SSHClient()
        client.set_missing_host_key_policy(self.mod.AutoAddPolicy())
        client.connect(
            LOOPBACK,
            port=self.sshd.port,
            sock=sock,
            username=self.sshd.user,
            key_filename=str(self.sshd.key),
            look_for_keys=False,
            allow_agent=False,
            timeout=30,
            banner_timeout=30,
            auth_timeout=30,
        )
        return client

    @staticmethod
    def _finish(chan: paramiko.Channel, command: str, timeout: float = 120.0) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = chan.recv(CHUNK)
            if not data:
                break
            out += data
        if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"paramiko {command!r}: no exit status")
        status = chan.exit_status
        chan.close()
        if status != 0:
            raise RuntimeError(f"paramiko {command!r}: exit {status}")
        return bytes(out)

    @staticmethod
    def _open(client: paramiko.SSHClient, command: str) -> paramiko.Channel:
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=30)
        chan.settimeout(120)
        chan.exec_command(command)
        return chan

    def run(self, client: paramiko.SSHClient, command: str) -> bytes:
        chan = self._open(client, command)
        chan.shutdown_write()
        return self._finish(chan, command)

    def run_many(self, client: paramiko.SSHClient, command: str, n: int) -> list[bytes]:
        """n channels at once on one connection: open all, then collect all."""
        chans = [self._open(client, command) for _ in range(n)]
        for chan in chans:
            chan.shutdown_write()
        return [self._finish(chan, command) for chan in chans]

    def run_many_connections(self, command: str, n: int) -> list[bytes]:
        """n connections at once, one thread each (paramiko is blocking)."""

        def one() -> bytes:
            client = self.connect()
            try:
                return self.run(client, command)
            finally:
                client.close()

        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(one) for _ in range(n)]
            return [f.result(timeout=300) for f in futures]

    def download(self, client: paramiko.SSHClient, nbytes: int) -> None:
        chan = self._open(client, f"head -c {nbytes} /dev/zero")
        chan.shutdown_write()
        got = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            data = chan.recv(CHUNK)
            if not data:
                break
            got += len(data)
        chan.status_event.wait(30)
        status = chan.exit_status
        chan.close()
        if got != nbytes or status != 0:
            raise RuntimeError(f"paramiko download: {got} of {nbytes} bytes, exit {status}")

    def upload(self, client: paramiko.SSHClient, nbytes: int) -> None:
        chan = self._open(client, "wc -c")
        for _ in range(nbytes // CHUNK):
            chan.sendall(ZEROS)
        chan.shutdown_write()
        out = self._finish(chan, "wc -c")
        if int(out or b"-1") != nbytes:
            raise RuntimeError(f"paramiko upload: remote counted {out!r}")


def close_quietly(obj: Any) -> None:
    with contextlib.suppress(Exception):
        obj.close()


def run_in_thread(fn: Any, timeout: float) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError("timed out")
    if "error" in box:
        raise box["error"]
    return box.get("value")
