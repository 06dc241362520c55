"""Loopback plumbing for the demo: one server thread, one client socket, nothing left behind.

The naive server runs whatever it is sent, without authentication. So it listens on
127.0.0.1 only, accepts exactly the demo's own client (the peer address must be the client
socket we just bound), serves that one connection in a thread the demo owns and joins, and
is torn down in `finally` whatever happens. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from rexec.demo.codec import FrameTooLarge

HOST = "127.0.0.1"
IO_TIMEOUT = 5.0  # the longest any single wait may take; scenarios need far less
DEADLINE = 15.0  # hard limit on the life of a server thread
SILENCE = 0.3  # how long we wait to show that an answer is never coming
POLL = 0.002
MAX_ACCEPTS = 4  # strangers refused before we give up waiting for our own client

T = TypeVar("T")
Settle = Callable[[socket.socket, int], None]


@dataclass
class ServerLog:
    """What the server thread did, for the client side and the report to read."""

    deadline: float
    received: list[bytes] = field(default_factory=list)  # one entry per command it ran
    sent: list[bytes] = field(default_factory=list)  # what its send()s actually sent
    recv_chunks: list[bytes] = field(default_factory=list)  # raw recv() results (framed)
    replies: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    waiting_in_recv: bool = False
    saw_eof: bool = False  # recv() returned b'': the server concluded the client left
    refused: FrameTooLarge | None = None
    body_buffered_at_refusal: int = -1
    error: str | None = None


def run_command(command: bytes) -> bytes:
    """Run a command as the tutorial does (`shell=True`, stdout and stderr together).

    Spelled `/bin/sh -c` rather than `shell=True`: the same thing, and bounded in time.
    """
    done = subprocess.run(
        ["/bin/sh", "-c", command.decode(errors="replace")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=IO_TIMEOUT,
        check=False,
    )
    return done.stdout


def _peek(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` unread bytes, without consuming them or waiting; None if none yet."""
    sock.settimeout(0.0)
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return None


def wait_buffered(sock: socket.socket, want: int, timeout: float = IO_TIMEOUT) -> int:
    """Wait until `want` bytes sit unread in `sock`; return how many do (may be more).

    This is what makes each scenario deterministic: we read only once the bytes we are
    talking about are all in the socket buffer, as happens whenever a reader is a little
    slower than its writer. MSG_PEEK looks without consuming.
    """
    deadline = time.monotonic() + timeout
    old = sock.gettimeout()
    try:
        data = _peek(sock, want + 1)
        for _ in range(int(timeout / POLL) + 1):
            if data == b"" or len(data or b"") >= want:
                break  # enough bytes, or EOF: no more will come
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL)
            data = _peek(sock, want + 1)
    finally:
        sock.settimeout(old)
    return 0 if data is None else len(data)


def wait_until(predicate: Callable[[], bool], timeout: float = IO_TIMEOUT) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL) + 1):
        if predicate() or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    return predicate()


def recv_or_silence(sock: socket.socket, size: int, silence: float = SILENCE) -> bytes | None:
    """recv(size), but give up after `silence` seconds and return None: a hang, shown."""
    old = sock.gettimeout()
    sock.settimeout(silence)
    try:
        return sock.recv(size)
    except TimeoutError:
        return None
    finally:
        sock.settimeout(old)


def wait_replies(log: ServerLog, count: int, timeout: float = IO_TIMEOUT) -> bool:
    """Wait until the server has sent `count` more replies; False if it did not in time."""
    deadline = time.monotonic() + timeout
    for _ in range(count):
        if not log.replies.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
    return True


def _serve(
    conn: socket.socket, serve: Callable[[socket.socket, ServerLog], None], log: ServerLog
) -> None:
    """Thread body: run the server loop on one connection, record any error, always close."""
    try:
        serve(conn, log)
    except Exception as exc:  # recorded for the report; a thread must not die noisily
        log.error = f"{type(exc).__name__}: {exc}"
    finally:
        log.waiting_in_recv = False
        conn.close()


def _accept_own_client(listener: socket.socket, client_addr: tuple[str, int]) -> socket.socket:
    """Accept the demo's own client and nobody else (the naive server runs any command)."""
    for _ in range(MAX_ACCEPTS):
        conn, peer = listener.accept()
        if peer[0] == HOST and peer[1] == client_addr[1]:
            return conn
        conn.close()
    raise ConnectionRefusedError(f"no connection from our own client {client_addr}")


def run_pair(
    serve: Callable[[socket.socket, ServerLog], None],
    talk: Callable[[socket.socket, ServerLog], T],
    *,
    nodelay: bool = False,
    deadline: float = DEADLINE,
) -> tuple[T, ServerLog]:
    """Run one scenario: `serve` in a thread on the accepted socket, `talk` on the client.

    Returns what `talk` returned and the server's log, once the server thread has ended.
    The client hangs up first, which is how the tutorial's server learns to stop.
    `nodelay` sets TCP_NODELAY on both ends, as rexec/2 does (the tutorial does not).
    """
    log = ServerLog(deadline=time.monotonic() + deadline)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn: socket.socket | None = None
    thread: threading.Thread | None = None
    try:
        listener.settimeout(IO_TIMEOUT)
        listener.bind((HOST, 0))  # port 0: the kernel picks a free port at run time
        listener.listen(1)
        client.settimeout(IO_TIMEOUT)
        client.bind((HOST, 0))
        client.connect(listener.getsockname())
        conn = _accept_own_client(listener, client.getsockname())
        listener.close()
        conn.settimeout(IO_TIMEOUT)
        if nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=_serve, args=(conn, serve, log), name="rexec-demo-server", daemon=True
        )
        thread.start()
        result = talk(client, log)
    finally:
        client.close()  # the server's recv() now returns b'' and its loop ends
        listener.close()
        if thread is None:
            if conn is not None:
                conn.close()
        else:
            thread.join(max(0.0, min(IO_TIMEOUT, log.deadline - time.monotonic())))
            if thread.is_alive() and conn is not None:
                # Wakes a recv() blocked in the thread; the thread then closes conn.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                thread.join(IO_TIMEOUT)
    if thread.is_alive():  # daemon, so it cannot keep the process alive; still an error
        raise RuntimeError("the demo server thread outlived its deadline")
    return result, log
