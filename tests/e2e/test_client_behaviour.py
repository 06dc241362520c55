"""One behaviour suite, run against both client drivers: the sync `rexec.Client` (selectors)
and the async `rexec.connect` (asyncio). Both sit on the same sans-I/O client core; these
identical assertions keep them from drifting apart again.

Each test gets `drive`, a small adapter that gives both drivers the same blocking face. What
the real server never does (CLOSE with a command still open, going silent) comes from
`FakeServer`: the real server protocol core, scripted, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

import rexec
import rexec.client.core
from rexec import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConnectionLost,
    ConnectTimeout,
    ErrorCode,
    ExecError,
    FrameType,
    NotRexecServer,
    RemoteError,
    Result,
    ServerInfo,
    ServerRefused,
    Stream,
    Token,
    TruncatedError,
)
from rexec.protocol.client import ClientConnection
from rexec.protocol.events import ExecReceived
from rexec.protocol.notice import RefusalCode
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import generate_token

T = TypeVar("T")
STEP = 30.0  # bound on any one blocking step of a test

# ---- the two drivers behind one face ---------------------------------------------------


class Proc(Protocol):
    def write(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def signal(self, signum: int) -> None: ...
    def read_chunk(self, stream: Stream) -> bytes: ...
    def chunks(self) -> list[tuple[Stream, bytes]]: ...
    def wait(self) -> Result: ...


class Session(Protocol):
    def run(self, command: Any, **kw: Any) -> Result: ...
    def start(self, command: Any, **kw: Any) -> Proc: ...
    def close(self) -> None: ...


class SyncProc:
    def __init__(self, proc: rexec.SyncProcess) -> None:
        self.proc = proc

    def write(self, data: bytes) -> None:
        self.proc.write(data)

    def close_stdin(self) -> None:
        self.proc.close_stdin()

    def signal(self, signum: int) -> None:
        self.proc.signal(signum)

    def read_chunk(self, stream: Stream) -> bytes:
        return (self.proc.stdout if stream == Stream.STDOUT else self.proc.stderr).read_chunk()

    def chunks(self) -> list[tuple[Stream, bytes]]:
        return list(self.proc)

    def wait(self) -> Result:
        return self.proc.wait()


class SyncSession:
    def __init__(self, client: rexec.Client) -> None:
        self.client = client

    def run(self, command: Any, **kw: Any) -> Result:
        return self.client.run(command, **kw)

    def start(self, command: Any, **kw: Any) -> Proc:
        return SyncProc(self.client.start(command, **kw))

    def close(self) -> None:
        self.client.close()


class AsyncProc:
    def __init__(self, call: Callable[[Awaitable[Any]], Any], proc: rexec.Process) -> None:
        self.call = call
        self.proc = proc

    def write(self, data: bytes) -> None:
        self.call(self.proc.write(data))

    def close_stdin(self) -> None:
        self.call(self.proc.close_stdin())

    def signal(self, signum: int) -> None:
        self.proc.signal(signum)

    def read_chunk(self, stream: Stream) -> bytes:
        out = self.proc.stdout if stream == Stream.STDOUT else self.proc.stderr
        return self.call(out.read_chunk())  # type: ignore[no-any-return]

    def chunks(self) -> list[tuple[Stream, bytes]]:
        async def collect() -> list[tuple[Stream, bytes]]:
            return [item async for item in self.proc]

        return self.call(collect())  # type: ignore[no-any-return]

    def wait(self) -> Result:
        return self.call(self.proc.wait())  # type: ignore[no-any-return]


class AsyncSession:
    def __init__(self, call: Callable[[Awaitable[Any]], Any], conn: rexec.Connection) -> None:
        self.call = call
        self.conn = conn

    def run(self, command: Any, **kw: Any) -> Result:
        return self.call(self.conn.run(command, **kw))  # type: ignore[no-any-return]

    def start(self, command: Any, **kw: Any) -> Proc:
        return AsyncProc(self.call, self.call(self.conn.start(command, **kw)))

    def close(self) -> None:
        self.call(self.conn.close())


class Drive:
    """Connects with either driver; everything it returns blocks like the sync API."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.sessions: list[Session] = []

    def call(self, awaitable: Awaitable[T]) -> T:
        assert self.loop is not None

        async def bounded() -> T:
            return await asyncio.wait_for(awaitable, STEP)

        return self.loop.run_until_complete(bounded())

    def connect(self, target: str, token: str | Token, **kw: Any) -> Session:
        session: Session
        if self.kind == "sync":
            session = SyncSession(rexec.Client(target, token=token, **kw))
        else:

            async def go() -> rexec.Connection:
                return await rexec.connect(target, token=token, **kw)

            session = AsyncSession(self.call, self.call(go()))
        self.sessions.append(session)
        return session

    def close(self) -> None:
        for session in self.sessions:
            with contextlib.suppress(Exception):  # a session a test broke on purpose
                session.close()
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def drive(request: pytest.FixtureRequest) -> Iterator[Drive]:
    d = Drive(request.param)
    yield d
    d.close()


@pytest.fixture
def conn(drive: Drive, server: Any) -> Session:
    return drive.connect(server.address, server.token)


# ---- a scripted server for what the real one never does --------------------------------

INFO = ServerInfo(server="fake", user="u", host="h", max_payload=262144, max_channels=64)


class FakeServer:
    """Accepts one client and runs the real server core, then on the first EXEC either says
    goodbye with the command still open ("close"; "output-close": after some output) or goes
    silent for good ("stall")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.token = generate_token()
        self.frames: list[FrameType] = []  # what the client sent, after the handshake
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(STEP)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _trace(self, direction: str, ftype: FrameType, channel: int, length: int) -> None:
        if direction == "recv":
            self.frames.append(ftype)

    def _serve(self) -> None:
        keys = {self.token.key_id: self.token.secret}
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        conn = ServerConnection(keys.get, INFO, trace=self._trace)
        sending = True
        deadline = time.monotonic() + STEP
        with sock:
            sock.settimeout(0.1)
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, ExecReceived) and self.mode == "output-close":
                        conn.send_output(event.channel, 1, b"partial\n")
                        conn.send_output(event.channel, 2, b"err\n")
                        conn.farewell(ErrorCode.SHUTDOWN, "going away now")
                    elif isinstance(event, ExecReceived) and self.mode == "close":
                        conn.farewell(ErrorCode.SHUTDOWN, "going away now")
                    elif isinstance(event, ExecReceived):
                        sending = False  # silent from here on: not even a PONG
                out = conn.data_to_send()
                if sending and out:
                    sock.sendall(out)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(STEP)


@pytest.fixture
def fake_server() -> Iterator[Callable[[str], FakeServer]]:
    made: list[FakeServer] = []

    def make(mode: str) -> FakeServer:
        made.append(FakeServer(mode))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


# ---- results, output and errors ---------------------------------------------------------


def test_exit_status_and_output(conn: Session, server: Any) -> None:
    r = conn.run("printf 'out'; printf 'err' >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code, r.signal, r.ok) == (b"out", b"err", 7, None, False)
    assert r.target == server.address and r.command == "printf 'out'; printf 'err' >&2; exit 7"
    r = conn.run(["printf", "%s|", "a b", "it's", ""])
    assert (r.stdout, r.command, r.ok) == (
        b"a b|it's||",
        ("printf", "%s|", "a b", "it's", ""),
        True,
    )
    r = conn.run(["sh", "-c", "kill -TERM $$"])
    assert (r.exit_code, r.signal, r.shell_status) == (None, signal.SIGTERM, 143)


def test_stdin_bytes_round_trip(conn: Session) -> None:
    data = os.urandom(1024 * 1024) + bytes(range(256))
    r = conn.run(["cat"], stdin=data)
    assert r.stdout == data and r.ok


def test_exec_error_carries_the_exit_code(conn: Session) -> None:
    with pytest.raises(ExecError, match="not found") as info:
        conn.run(["definitely-not-a-command-xyz"])
    assert info.value.exit_code == 127
    assert conn.run(["echo", "still"]).stdout == b"still\n"  # the connection survives


def test_refused_command_is_a_remote_error(conn: Session) -> None:
    with pytest.raises(RemoteError, match="not allowed") as info:
        conn.run("true", env={"NOT_ALLOWED_VAR": "1"})
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert conn.run("echo $REXEC_BX", env={"REXEC_BX": "yes"}).stdout == b"yes\n"


def test_command_failed_carries_its_result(conn: Session, server: Any) -> None:
    command = "echo 'nginx: inactive' >&2; exit 3"
    with pytest.raises(CommandFailed) as info:
        conn.run(command, check=True)
    assert info.value.result == Result(
        command, 3, None, False, info.value.result.duration, b"", b"nginx: inactive\n",
        server.address,
    )  # fmt: skip
    assert str(info.value) == (
        f"command failed with exit status 3 on {server.address}: {command}\n"
        "  stderr: nginx: inactive"
    )
    # the message quotes the last lines only, decoded leniently and made printable
    noisy = "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; printf '\\377\\033[2J' >&2; exit 1"
    with pytest.raises(CommandFailed) as info:
        conn.run(noisy, check=True)
    assert str(info.value).split("\n")[1:] == [
        "  stderr: line4",
        "  stderr: line5",
        "  stderr: line6",
        "  stderr: line7",
        "  stderr: \ufffd?[2J",
    ]
    with pytest.raises(CommandTimeout) as timed:
        conn.run(["sh", "-c", "echo late >&2; exec sleep 1000.4321"], timeout=0.3, check=True)
    assert timed.value.result.timed_out and timed.value.result.stderr == b"late\n"
    assert str(timed.value).endswith("\n  stderr: late")


# ---- streaming ------------------------------------------------------------------------------


def test_streaming_stdin_and_output(conn: Session) -> None:
    proc = conn.start(["cat"], stdin=True)
    proc.write(b"line one\n")
    assert proc.read_chunk(Stream.STDOUT) == b"line one\n"
    proc.write(b"two\n")
    proc.close_stdin()
    assert proc.read_chunk(Stream.STDOUT) == b"two\n"
    assert proc.read_chunk(Stream.STDOUT) == b""
    result = proc.wait()
    assert (result.exit_code, result.stdout) == (0, b"")  # what was taken is not repeated


def test_iteration_tags_each_chunk_with_its_stream(conn: Session) -> None:
    proc = conn.start("echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c")
    assert proc.chunks() == [
        (Stream.STDOUT, b"a\n"),
        (Stream.STDERR, b"b\n"),
        (Stream.STDOUT, b"c\n"),
    ]
    assert proc.wait().ok


def test_chunks_are_the_bytearrays_frames_were_decrypted_into(conn: Session) -> None:
    """As the README says: a chunk is a bytearray (no copy on the streaming path), and the
    end of a stream is b""."""
    proc = conn.start("echo a; sleep 0.1; echo b >&2")
    chunks = proc.chunks()
    assert chunks == [(Stream.STDOUT, b"a\n"), (Stream.STDERR, b"b\n")]
    assert [type(data) for _, data in chunks] == [bytearray, bytearray]
    proc = conn.start(["echo", "c"])
    first, end = proc.read_chunk(Stream.STDOUT), proc.read_chunk(Stream.STDOUT)
    assert (type(first), first, type(end), end) == (bytearray, b"c\n", bytes, b"")
    assert proc.wait().ok


def test_signal_reaches_the_command(conn: Session) -> None:
    proc = conn.start(["sh", "-c", "echo up; exec sleep 1000.2469"])
    assert proc.read_chunk(Stream.STDOUT) == b"up\n"
    proc.signal(signal.SIGINT)
    result = proc.wait()
    assert (result.signal, result.shell_status) == (signal.SIGINT, 130)


def test_concurrent_processes_on_one_connection(conn: Session) -> None:
    procs = [conn.start(["sh", "-c", f"sleep 0.2; echo {i}; echo e{i} >&2"]) for i in range(6)]
    results = [p.wait() for p in reversed(procs)]  # waiting on one serves the others
    assert [(r.stdout, r.stderr) for r in results] == [
        (f"{i}\n".encode(), f"e{i}\n".encode()) for i in reversed(range(6))
    ]


def test_more_processes_than_the_server_allows(drive: Drive, server_factory: Any) -> None:
    srv = server_factory("[limits]\nmax_channels = 2\n")
    conn = drive.connect(srv.address, srv.token)
    procs = [conn.start(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(2)]
    third = conn.start(["echo", "2"])  # waits for a free channel instead of being refused
    assert [p.wait().stdout for p in [*procs, third]] == [b"0\n", b"1\n", b"2\n"]
    assert not srv.log_events("limit hit: max_channels")


# ---- the connection's end ---------------------------------------------------------------


def test_wrong_token_is_an_auth_error(drive: Drive, server_factory: Any) -> None:
    srv = server_factory()
    wrong = Token(srv.token_obj.key_id, b"\x01" * 32)
    with pytest.raises(AuthError, match="authentication failed"):
        drive.connect(srv.address, wrong)


def test_nothing_listening_is_said_in_the_same_words(drive: Drive, tmp_path: Path) -> None:
    """A refused connect reads as the socket says it, whichever driver made it (asyncio's
    own wording, "Connect call failed (...)", never leaks through)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there now
    token = generate_token()
    for address, reason in (
        (f"127.0.0.1:{port}", "Connection refused"),
        (f"unix:{tmp_path / 'none.sock'}", "No such file or directory"),
    ):
        with pytest.raises(ConnectionLost) as info:
            drive.connect(address, token)
        assert str(info.value) == f"cannot connect to {address}: {reason}"


def test_server_shutdown_ends_commands_then_the_connection(
    drive: Drive, server_factory: Any, e2e: Any
) -> None:
    srv = server_factory("[limits]\nshutdown_grace = 0.3\nkill_grace = 0.5\n")
    conn = drive.connect(srv.address, srv.token)
    marker = e2e.marker("1000.55")
    proc = conn.start(["sh", "-c", f"echo up; exec sleep {marker}"])
    assert proc.read_chunk(Stream.STDOUT) == b"up\n"
    srv.proc.send_signal(signal.SIGTERM)
    result = proc.wait()  # running commands get their EXIT before the server goes
    assert result.signal in (signal.SIGTERM, signal.SIGKILL)
    assert srv.proc.wait(STEP) == 0
    with pytest.raises(ConnectionLost, match=r"server closed the connection .*shutdown"):
        conn.start(["true"]).wait()


def test_server_killed_mid_command_is_truncation(
    drive: Drive, server_factory: Any, e2e: Any
) -> None:
    srv = server_factory()
    conn = drive.connect(srv.address, srv.token)
    marker = e2e.marker("1000.56")
    proc = conn.start(["sh", "-c", f"echo up; exec sleep {marker}"])
    try:
        assert proc.read_chunk(Stream.STDOUT) == b"up\n"
        srv.proc.kill()
        srv.proc.wait(STEP)
        with pytest.raises(ConnectionLost):  # TruncatedError, or a reset
            proc.wait()
    finally:
        for pid in e2e.cmdline_pids(marker):
            os.kill(pid, signal.SIGKILL)


def test_close_with_a_command_open_is_truncation(
    drive: Drive, fake_server: Callable[[str], FakeServer], e2e: Any
) -> None:
    srv = fake_server("close")
    conn = drive.connect(srv.address, srv.token)
    proc = conn.start(["sleep", "1"])
    with pytest.raises(TruncatedError, match=r"before the command's exit status .*going away now"):
        proc.wait()
    with pytest.raises(ConnectionLost, match=r"server closed the connection .*going away now"):
        conn.start(["true"])
    answered = e2e.wait_until(lambda: srv.frames[-1] == FrameType.CLOSE, 5)
    assert answered, srv.frames  # the client answered the server's CLOSE


def test_truncated_error_carries_the_output_received(
    drive: Drive, fake_server: Callable[[str], FakeServer]
) -> None:
    """As a Result would: the output collected before the cut, none of what was taken."""
    srv = fake_server("output-close")
    conn = drive.connect(srv.address, srv.token)
    with pytest.raises(TruncatedError, match="before the command's exit status") as info:
        conn.run(["sleep", "1"])
    assert (info.value.stdout, info.value.stderr) == (b"partial\n", b"err\n")
    assert type(info.value.stdout) is bytes
    srv = fake_server("output-close")
    proc = drive.connect(srv.address, srv.token).start(["sleep", "1"])
    assert proc.read_chunk(Stream.STDOUT) == b"partial\n"  # taken: not in the error
    with pytest.raises(TruncatedError) as info:
        proc.wait()
    assert (info.value.stdout, info.value.stderr) == (b"", b"err\n")


def test_keepalive_gives_up_on_a_silent_server(
    drive: Drive, fake_server: Callable[[str], FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rexec.client.core, "KEEPALIVE_IDLE", 0.2)
    monkeypatch.setattr(rexec.client.core, "KEEPALIVE_DEAD", 0.8)
    srv = fake_server("stall")
    conn = drive.connect(srv.address, srv.token)
    proc = conn.start(["sleep", "1000"])
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost, match="stopped responding"):
        proc.wait()
    assert 0.7 < time.monotonic() - t0 < 5  # bounded: the deadline, not the OS, decided
    assert FrameType.PING in srv.frames


def test_keepalive_keeps_a_quiet_command(
    drive: Drive, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rexec.client.core, "KEEPALIVE_IDLE", 0.2)
    monkeypatch.setattr(rexec.client.core, "KEEPALIVE_DEAD", 0.6)
    conn = drive.connect(server.address, server.token)
    result = conn.run("sleep 1.5; echo done")  # silent for 2.5x the deadline: PONGs answer
    assert (result.exit_code, result.stdout) == (0, b"done\n")


# ---- the flow-control contract with the protocol core ---------------------------------------


def test_stdin_never_exceeds_the_window(
    drive: Drive, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClientConnection, "stdin_room", lambda self, channel: 1000)
    sent: list[int] = []

    def trace(direction: str, ftype: FrameType, channel: int, length: int) -> None:
        if direction == "send" and ftype == FrameType.STDIN:
            sent.append(length)

    conn = drive.connect(server.address, server.token, trace=trace)
    data = os.urandom(100_000)
    assert conn.run(["cat"], stdin=data).stdout == data
    proc = conn.start(["wc", "-c"], stdin=True)
    proc.write(data)
    proc.close_stdin()
    assert proc.wait().stdout.split() == [b"100000"]
    assert sum(sent) == 200_000 and max(sent) == 1000


def test_output_handed_over_is_reported_consumed(
    drive: Drive, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumed: dict[int, int] = {}

    def output_consumed(self: ClientConnection, channel: int, nbytes: int) -> None:
        consumed[channel] = consumed.get(channel, 0) + nbytes

    monkeypatch.setattr(ClientConnection, "output_consumed", output_consumed)
    conn = drive.connect(server.address, server.token)
    r = conn.run("head -c 300000 /dev/zero; head -c 1000 /dev/zero >&2")  # collected
    assert (len(r.stdout), len(r.stderr)) == (300000, 1000)
    # (output taken after its EXIT is not reported: a closed channel needs no window)
    proc = conn.start("head -c 300000 /dev/zero; head -c 1000 /dev/zero >&2; sleep 0.5")
    assert sum(len(chunk) for _, chunk in proc.chunks()) == 301000  # taken as a stream
    proc.wait()
    assert list(consumed.values()) == [301000, 301000]


# ---- refusals and foreign servers (docs/PROTOCOL.md 6.6) ----------------------------------

FULL = "[limits]\nmax_connections = 1\nmax_unauthenticated = 1\n"
BUSY = "the server refused the connection: busy, too many connections (try again in 1s)"


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_a_full_server_refuses_saying_why(
    drive: Drive, server_factory: Any, tmp_path: Path, over: str
) -> None:
    srv = server_factory(FULL, unix=[str(tmp_path / "s")])
    target = srv.address if over == "tcp" else f"unix:{tmp_path / 's'}"
    held = srv.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerRefused) as info:
            drive.connect(target, srv.token, connect_timeout=1.5)
        took = time.monotonic() - t0
    finally:
        held.close()
    assert (info.value.code, info.value.retry_after, str(info.value)) == (
        RefusalCode.BUSY,
        1,
        BUSY,
    )
    assert took < 3.0, f"busy retries went past the connect deadline: {took:.1f}s"
    reasons = [r["reason"] for r in srv.log_events("connection refused")]
    assert 2 <= len(reasons) <= 4, reasons  # tried again (a retry waits under 1 s), bounded
    assert set(reasons) == {"max_connections reached"}
    assert not srv.log_events("authentication failed")  # a refusal is no failed auth


def test_a_busy_server_is_tried_again_until_a_slot_frees(
    drive: Drive, server_factory: Any, e2e: Any
) -> None:
    srv = server_factory(FULL)
    held = srv.connect()

    def free_a_slot_once_refused() -> None:
        e2e.wait_until(lambda: srv.log_events("connection refused"), STEP)
        held.close()

    freer = threading.Thread(target=free_a_slot_once_refused, daemon=True)
    freer.start()
    try:
        conn = drive.connect(srv.address, srv.token, connect_timeout=10.0)
    finally:
        freer.join(STEP)
    assert conn.run(["echo", "in"]).stdout == b"in\n"
    assert 1 <= len(srv.log_events("connection refused")) <= 3


def test_a_late_hello_still_reads_its_notice(
    drive: Drive, server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server half-closes after a notice and reads what comes: a client whose HELLO goes
    out after the refusal (on a unix socket that write would fail) still reads why."""
    srv = server_factory(FULL, unix=[str(tmp_path / "s")])
    held = srv.connect()
    initiate = ClientConnection.initiate

    def late(self: ClientConnection) -> None:
        time.sleep(0.2)  # the server refuses meanwhile
        initiate(self)

    monkeypatch.setattr(ClientConnection, "initiate", late)
    try:
        with pytest.raises(ServerRefused, match="busy"):
            drive.connect(f"unix:{tmp_path / 's'}", srv.token, connect_timeout=0.5)
    finally:
        held.close()


@contextlib.contextmanager
def foreign_server(reply: bytes) -> Iterator[str]:
    """A loopback listener that sends `reply` to each connection, then reads and never
    closes first: what the client concludes comes from the bytes, not from an EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        conns: list[socket.socket] = []
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conns.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(reply)
        for sock in conns:
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(STEP)
        listener.close()


@pytest.mark.parametrize(
    ("reply", "speaks"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "SSH"),
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "HTTP"),
    ],
    ids=["ssh", "http"],
)
def test_a_foreign_server_is_named(drive: Drive, reply: bytes, speaks: str) -> None:
    with foreign_server(reply) as address, pytest.raises(NotRexecServer) as info:
        drive.connect(address, generate_token(), connect_timeout=5.0)
    assert str(info.value) == f"not a rexec server (it speaks {speaks})"


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (b"", "the server sent nothing back (it may not be a rexec server)"),
        (b"\x00\x00\x00", "the server's reply stopped after 3 bytes"),
    ],
    ids=["silent", "stalled"],
)
def test_a_stalled_handshake_says_what_came_back(drive: Drive, reply: bytes, detail: str) -> None:
    with foreign_server(reply) as address, pytest.raises(ConnectTimeout) as info:
        drive.connect(address, generate_token(), connect_timeout=0.5)
    assert str(info.value) == f"handshake with {address} timed out after 0.5s: {detail}"
