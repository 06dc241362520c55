"""Honest refusals and foreign servers (issue 10, items 7 and 8).

A client the server turns away for a reason that is no secret (busy, rate limited, a suite
it does not take, shutting down) is told so in a refusal notice (docs/PROTOCOL.md 6.6) and
says so; a failed authentication stays a silent close. A client that reached an SSH or HTTP
server says what it found instead of a length error or a ten-second wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rexec import Client
from rexec.protocol.token import Token, parse_token

BUSY = b"rexec: the server refused the connection: busy, too many connections (try again in 1s)\n"
TOKEN = "rexec1:a1b2c3d4e5f60718:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
RATE_LIMITED = (
    b"rexec: the server refused the connection: rate limited, too many failed "
    b"authentications from this address or user (try again in 60s)\n"
)


def _wrong(token: str) -> str:
    return Token(parse_token(token).key_id, bytes(32)).format()


def _received(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes (bounded)."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got


def _fail_auth(address: str, token: str, times: int) -> None:
    """`times` failed authentications, quickly, with the in-process client."""
    from rexec.errors import AuthError

    for _ in range(times):
        with pytest.raises(AuthError):
            Client(address, token=token, connect_timeout=5)


# ---- item 7: the server says why ------------------------------------------------------


def test_server_full_names_it_and_retries_a_bounded_number_of_times(
    server_factory: Any, e2e: Any
) -> None:
    srv = server_factory("[limits]\nmax_connections = 1\nmax_unauthenticated = 1\n")
    held = srv.connect()
    try:
        t0 = time.monotonic()
        proc = e2e.run_cli(["run", srv.address, "echo no"], token=srv.token)
        took = time.monotonic() - t0
    finally:
        held.close()
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert proc.stderr == BUSY
    assert took < 8.0, f"gave up after {took:.1f}s"
    refusals = srv.log_events("connection refused")
    assert [r["reason"] for r in refusals] == ["max_connections reached"] * 4  # 1 + 3 retries
    assert not srv.log_events("authentication failed")


def test_busy_is_retried_until_a_slot_frees(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nmax_connections = 1\nmax_unauthenticated = 1\n")
    held = srv.connect()
    proc = subprocess.Popen(
        [e2e.REXEC, "run", srv.address, "echo in"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env({"REXEC_TOKEN": srv.token}),
    )
    try:
        assert e2e.wait_until(lambda: srv.log_events("connection refused"), 10)
    finally:
        held.close()
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out, err) == (0, b"in\n", b"")


def test_rate_limited_source_is_told_so_not_wrong_token(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()  # default: 10 failures per 60 s
    _fail_auth(srv.address, _wrong(srv.token), 10)
    for token in (_wrong(srv.token), srv.token):  # the 11th bad attempt, then the right token
        proc = e2e.run_cli(["run", srv.address, "echo no"], token=token)
        assert (proc.returncode, proc.stdout, proc.stderr) == (255, b"", RATE_LIMITED)
    host, port = srv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        assert _received(s) == b"RXNO\x02\x02\x00\x3c"  # reason 2, retry after 60 s
    assert len(srv.log_events("authentication failed")) == 10  # refusals are not failures


def test_refusals_for_other_reasons_never_count_as_failed_authentications(
    server_factory: Any, e2e: Any
) -> None:
    srv = server_factory('[server]\nsuites = ["ChaChaPoly"]\n[limits]\nauth_failures = 2\n')
    for _ in range(3):
        proc = e2e.run_cli(["run", "--suite", "aesgcm", srv.address, "echo no"], token=srv.token)
        assert (proc.returncode, proc.stdout) == (255, b"")
        assert proc.stderr == (
            b"rexec: the server refused the connection: cipher suite AESGCM is not allowed\n"
        )
    proc = e2e.run_cli(["run", "--suite", "chachapoly", srv.address, "echo yes"], token=srv.token)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"yes\n", b"")
    assert not srv.log_events("authentication failed")


def test_unauthenticated_peers_are_told_of_a_shutdown(server_factory: Any) -> None:
    srv = server_factory()
    host, port = srv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        time.sleep(0.2)  # accepted
        srv.stop()
        assert _received(s) == b"RXNO\x02\x04\x00\x00"  # reason 4, no retry hint


def test_unix_rate_limit_is_per_uid_and_apart_from_tcp(
    server_factory: Any, e2e: Any, tmp_path: Path
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="rexec-uid-"))  # short, and others may enter it
    try:
        os.chmod(sock_dir, 0o711)
        srv = server_factory("[limits]\nauth_failures = 3\n", unix=[str(sock_dir / "s")])
        unix = f"unix:{sock_dir / 's'}"
        _fail_auth(unix, _wrong(srv.token), 3)
        proc = e2e.run_cli(["run", unix, "echo no"], token=srv.token)
        assert (proc.returncode, proc.stdout) == (255, b"")
        assert proc.stderr == RATE_LIMITED
        # the bucket is this uid's over the unix socket: TCP from 127.0.0.1 is another
        proc = e2e.run_cli(["run", srv.address, "echo tcp"], token=srv.token)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"tcp\n", b"")
        if os.geteuid() != 0:
            return  # another uid needs root; tests/unit/test_admission.py checks the keying
        os.chmod(sock_dir / "s", 0o666)
        out = _as_uid(65534, lambda: _run_over(sock_dir / "s", srv.token, "echo other-uid"))
        assert out == b"other-uid\n"
    finally:
        with contextlib.suppress(OSError):
            (sock_dir / "s").unlink()
        sock_dir.rmdir()


def _run_over(path: Path, token: str, command: str) -> bytes:
    """Run in a child as another user: whose client config (root's) it must not look for."""
    os.environ["XDG_CONFIG_HOME"] = str(path.parent)  # holds no rexec/client.toml
    with Client(f"unix:{path}", token=token, connect_timeout=5) as client:
        return client.run(command).stdout


def _as_uid(uid: int, fn: Callable[[], bytes]) -> bytes:
    """fn() in a forked child running as uid (the interpreter is already loaded)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, fn())
            code = 0
        except BaseException as exc:
            os.write(w, f"child failed: {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], deadline - time.monotonic())
            if not ready or not (chunk := os.read(r, 4096)):
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    out = b"".join(chunks)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_sync_client_reads_the_notice_after_its_hello_write_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that sends a notice and closes without reading: the selector client's HELLO
    write fails (EPIPE on a unix socket) and it still reads why (ClientCore.send_failed).
    The asyncio transport drops unread bytes on a failed write: it relies on the server's
    half-close and linger, which test_client_behaviour checks for both drivers."""
    from rexec import ServerRefused
    from rexec.protocol.client import ClientConnection

    path = tmp_path / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    closed = threading.Event()

    def refuse_and_close() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"RXNO\x02\x04\x00\x00")  # shutting down
        conn.close()
        closed.set()

    thread = threading.Thread(target=refuse_and_close, daemon=True)
    thread.start()
    initiate = ClientConnection.initiate
    wrote: list[OSError] = []
    send = socket.socket.send

    def late(self: ClientConnection) -> None:
        assert closed.wait(5)
        initiate(self)

    def spy(self: socket.socket, data: Any, *args: Any) -> int:
        try:
            return send(self, data, *args)
        except OSError as exc:
            wrote.append(exc)
            raise

    monkeypatch.setattr(ClientConnection, "initiate", late)
    monkeypatch.setattr(socket.socket, "send", spy)
    try:
        with pytest.raises(ServerRefused, match="shutting down"):
            Client(f"unix:{path}", token=TOKEN, connect_timeout=5)
    finally:
        thread.join(5)
        listener.close()
    assert [exc.errno for exc in wrote] == [errno.EPIPE]


# ---- item 8: not a rexec server -------------------------------------------------------


@contextlib.contextmanager
def _listener(reply: bytes | None) -> Iterator[str]:
    """A loopback TCP server that answers every connection with `reply` and closes, or
    (None) reads what comes and never answers, as an HTTP server waiting for a request."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        srv.close()
        for c in conns:
            c.close()


SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
HTTP_REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(("reply", "speaks"), [(SSH_BANNER, b"SSH"), (HTTP_REPLY, b"HTTP")])
def test_cli_names_the_protocol_it_found(e2e: Any, reply: bytes, speaks: bytes) -> None:
    token = "rexec1:a1b2c3d4e5f60718:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
    with _listener(reply) as address:
        t0 = time.monotonic()
        proc = e2e.run_cli(["run", address, "true"], token=token)
        took = time.monotonic() - t0
    assert proc.returncode == 255
    assert proc.stderr == b"rexec: not a rexec server (it speaks " + speaks + b")\n"
    assert took < 2.0, f"took {took:.2f}s"


def test_cli_explains_a_silent_peer(e2e: Any) -> None:
    token = "rexec1:a1b2c3d4e5f60718:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
    with _listener(None) as address:
        proc = e2e.run_cli(["run", "--connect-timeout", "1", address, "true"], token=token)
    assert proc.returncode == 255
    assert (
        proc.stderr
        == (
            f"rexec: handshake with {address} timed out after 1s: the server sent nothing back "
            "(it may not be a rexec server)\n"
        ).encode()
    )
