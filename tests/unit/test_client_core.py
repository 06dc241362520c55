"""The sans-I/O client core against the real server protocol core, in memory, with made-up
time: the rules both drivers share (errors, ends, keepalive, results, flow accounting)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rexec.client.connecting
import rexec.client.core
from rexec import (
    AuthError,
    ConnectionLost,
    ErrorCode,
    ExecError,
    ExitStatus,
    NotRexecServer,
    RemoteError,
    Result,
    ServerInfo,
    ServerRefused,
    Stream,
    TruncatedError,
)
from rexec.client.connecting import ConnectAttempts
from rexec.client.core import HANDSHAKE_CLOSED, ClientCore, Command
from rexec.errors import ConnectTimeout, LocalProtocolError, RemoteProtocolError
from rexec.protocol.events import (
    CloseReceived,
    CreditReceived,
    ExecReceived,
    OutputReceived,
    SignalReceived,
    StdinClosed,
    StdinReceived,
)
from rexec.protocol.frames import VERSION
from rexec.protocol.notice import BUSY_ATTEMPT_MIN, BUSY_RETRIES, RefusalCode, encode_notice
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import generate_token

INFO = ServerInfo(server="t", user="u", host="h", max_payload=262144, max_channels=3)


class Pair:
    """A ClientCore wired to a ServerConnection; `now` is the client's clock."""

    def __init__(self) -> None:
        token = generate_token()
        self.core = ClientCore(token, target="lab1")
        self.server = ServerConnection({token.key_id: token.secret}.get, INFO)
        self.now = 0.0
        self.pings = 0
        self.consumed: list[tuple[int, int]] = []
        self.core.conn.output_consumed = lambda ch, n: self.consumed.append((ch, n))  # type: ignore[method-assign]

    def c2s(self) -> list[object]:
        return list(self.server.receive_data(self.core.data_to_send()))

    def s2c(self) -> list[Command]:
        return self.core.receive_data(self.server.data_to_send(), self.now)

    def handshake(self) -> None:
        self.core.initiate()
        self.c2s()
        self.s2c()
        self.c2s()  # AUTH
        assert self.server.authenticated and self.core.info == INFO

    def start(self, command: str = "x", stdin: bool = False) -> Command:
        cmd = self.core.start(command, stdin=stdin)
        [event] = self.c2s()
        assert isinstance(event, ExecReceived) and event.channel == cmd.channel
        return cmd


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


def test_core_imports_no_io_and_no_clock() -> None:
    """Time is passed in; bytes come and go through the driver."""
    banned = {"asyncio", "socket", "selectors", "subprocess", "threading", "time", "os"}
    tree = ast.parse(Path(rexec.client.core.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in banned]


def test_connecting_imports_no_io_and_no_clock() -> None:
    """Its other half (connect errors, retries) too; os only for an errno's words."""
    banned = {"asyncio", "socket", "selectors", "subprocess", "threading", "time"}
    tree = ast.parse(Path(rexec.client.connecting.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in banned]
    uses = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os"
    }
    assert uses == {"strerror"}


# ---- results and errors -------------------------------------------------------------------


def test_output_is_routed_and_the_result_assembled(pair: Pair) -> None:
    one, two = pair.start("one"), pair.start("two")
    pair.server.send_output(one.channel, Stream.STDOUT, b"a")
    pair.server.send_output(two.channel, Stream.STDERR, b"b")
    pair.server.send_output(one.channel, Stream.STDERR, b"c")
    pair.server.send_exit(one.channel, ExitStatus(0, duration=1.5))
    touched = pair.s2c()
    assert [c.channel for c in touched] == [1, 2, 1, 1]
    assert one.done and not two.done and one.status == ExitStatus(0, duration=1.5)
    assert pair.core.result(one) == Result("one", 0, None, False, 1.5, b"a", b"c", "lab1")
    assert pair.consumed == []  # nothing was taken; a closed channel needs no credit


def test_take_hands_out_chunks_in_arrival_order_and_reports_them(pair: Pair) -> None:
    cmd = pair.start()
    for stream, data in [(1, b"o1"), (2, b"e1"), (1, b"o22")]:
        pair.server.send_output(cmd.channel, Stream(stream), data)
    pair.s2c()
    assert pair.core.take(cmd, Stream.STDERR) == (Stream.STDERR, b"e1")
    assert pair.core.take(cmd) == (Stream.STDOUT, b"o1")
    assert pair.core.take(cmd, Stream.STDERR) is None  # nothing yet, not the end
    assert pair.consumed == [(1, 2), (1, 2)]
    pair.core.collect(cmd, Stream.STDOUT)  # what it holds counts as taken, once
    assert pair.consumed[-1] == (1, 3)
    pair.server.send_output(cmd.channel, Stream.STDOUT, b"late")
    pair.server.send_exit(cmd.channel, ExitStatus(0))
    pair.s2c()
    assert pair.consumed[-1] == (1, 4)  # collected: counted on arrival
    assert pair.core.take(cmd, Stream.STDERR) == (Stream.STDERR, b"")  # the end
    assert pair.core.result(cmd).stdout == b"o22late"
    assert len(pair.consumed) == 4  # the channel is closed: nothing more to report


def test_exec_failed_is_an_exec_error_with_the_exit_code(pair: Pair) -> None:
    cmd = pair.start("nope")
    pair.server.send_channel_error(cmd.channel, ErrorCode.EXEC_FAILED, "command not found: nope")
    pair.s2c()
    assert not cmd.done  # the ERROR waits for its EXIT
    pair.server.send_exit(cmd.channel, ExitStatus(127))
    pair.s2c()
    with pytest.raises(ExecError, match=r"^command not found: nope$") as info:
        pair.core.result(cmd)
    assert info.value.exit_code == 127
    assert pair.core.take(cmd) == (Stream.STDERR, b"")  # a refused command simply has no output


def test_other_refusals_are_remote_errors(pair: Pair) -> None:
    cmd = pair.start()
    pair.server.send_channel_error(cmd.channel, ErrorCode.LIMIT, "too many")
    pair.server.send_exit(cmd.channel, ExitStatus(255))
    pair.s2c()
    with pytest.raises(RemoteError, match=r"server error \(limit\): too many") as info:
        pair.core.result(cmd)
    assert info.value.code == ErrorCode.LIMIT
    assert pair.core.error is None  # the connection goes on


# ---- the connection's end ---------------------------------------------------------------


def test_server_close_with_a_command_open(pair: Pair) -> None:
    cmd = pair.start()
    done = pair.start()
    pair.server.send_exit(done.channel, ExitStatus(0))
    pair.server.farewell(ErrorCode.SHUTDOWN, "server is shutting down")
    touched = pair.s2c()
    assert cmd in touched and done in touched
    assert pair.core.result(done).ok  # it had its EXIT before the CLOSE
    why = r"before the command's exit status \(server error \(shutdown\): server is shutting"
    with pytest.raises(TruncatedError, match=why):
        pair.core.result(cmd)
    with pytest.raises(TruncatedError):
        pair.core.take(cmd)  # cut-short output never ends like a complete one
    assert [type(e) for e in pair.c2s()] == [CloseReceived]  # the CLOSE is answered
    with pytest.raises(ConnectionLost, match=r"the server closed the connection \(server error"):
        pair.core.start("more")
    pair.core.receive_eof()  # the FIN after CLOSE changes nothing
    assert isinstance(pair.core.error, ConnectionLost)


def test_eof_without_close_is_truncation(pair: Pair) -> None:
    cmd = pair.start()
    pair.core.receive_eof()
    assert isinstance(pair.core.error, TruncatedError)
    with pytest.raises(TruncatedError, match="without CLOSE"):
        pair.core.result(cmd)
    with pytest.raises(TruncatedError):
        pair.core.write(cmd, b"x")  # the connection is gone: not a closed pipe


def test_our_close_lets_running_commands_end(pair: Pair) -> None:
    cmd = pair.start()
    pair.core.close()
    assert [type(e) for e in pair.c2s()] == [CloseReceived]
    pair.server.send_exit(cmd.channel, ExitStatus(None, 15))
    pair.server.send_close()
    pair.s2c()
    assert pair.core.result(cmd).signal == 15
    assert str(pair.core.error) == "connection closed"


@pytest.mark.parametrize("how", ["eof", "reset", "truncated"])
def test_the_server_closing_the_handshake_is_an_auth_error(how: str) -> None:
    core = ClientCore(generate_token())
    core.initiate()
    if how == "eof":
        core.receive_eof()
    else:
        error = TruncatedError("x") if how == "truncated" else ConnectionLost("reset")
        core.connection_lost(error, reset=how == "reset")
    assert isinstance(core.error, AuthError) and str(core.error) == HANDSHAKE_CLOSED


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_a_refusal_notice_is_server_refused_unchanged(split: bool) -> None:
    pair = Pair()
    pair.core.initiate()
    assert pair.server.refuse(RefusalCode.BUSY, 1)  # at accept, before it reads a byte
    wire = pair.server.data_to_send()
    for chunk in [wire[i : i + 1] for i in range(len(wire))] if split else [wire]:
        assert pair.core.error is None
        pair.core.receive_data(chunk, pair.now)
    error = pair.core.error
    assert isinstance(error, ServerRefused) and (error.code, error.retry_after) == (1, 1)
    pair.core.receive_eof()  # the close that follows the notice changes nothing
    assert pair.core.error is error


def test_a_foreign_reply_is_not_a_rexec_server() -> None:
    core = ClientCore(generate_token())
    core.initiate()
    core.receive_data(b"SSH-2.0-OpenSSH_9.6\r\n", 0.0)
    assert isinstance(core.error, NotRexecServer)
    assert str(core.error) == "not a rexec server (it speaks SSH)"


@pytest.mark.parametrize("then", ["notice", "eof"])
def test_a_failed_handshake_write_reads_on(then: str) -> None:
    """A server that refused us may have said why before it closed under our HELLO."""
    core = ClientCore(generate_token())
    core.initiate()
    assert core.send_failed(ConnectionLost("broken pipe"), reset=True)
    assert core.error is None  # not yet: read first
    if then == "notice":
        core.receive_data(encode_notice(RefusalCode.SHUTTING_DOWN, version=VERSION), 0.0)
        assert isinstance(core.error, ServerRefused)
    else:
        core.receive_eof()
        assert isinstance(core.error, AuthError) and str(core.error) == HANDSHAKE_CLOSED


def test_a_failed_write_after_the_handshake_ends_the_connection(pair: Pair) -> None:
    cmd = pair.start()
    error = ConnectionLost("broken pipe")
    assert not pair.core.send_failed(error, reset=True)
    assert pair.core.error is error and cmd.error is error
    core = ClientCore(generate_token())  # and in the handshake, an error that is no reset
    core.initiate()
    assert not core.send_failed(ConnectionLost("no route"), reset=False)
    assert str(core.error) == "no route"


def test_busy_is_retried_a_few_times_within_the_deadline() -> None:
    busy = ServerRefused(RefusalCode.BUSY, 1, "busy")
    attempts = ConnectAttempts(100.0, 0.0)
    delays = [attempts.retry_delay(busy, 0.0) for _ in range(BUSY_RETRIES + 1)]
    assert all(d is not None and 0.5 <= d <= 1.0 for d in delays[:-1]) and delays[-1] is None
    assert attempts.retry_delay(busy, 0.0) is None  # and never again
    late = ConnectAttempts(1.0, 0.0)
    assert late.retry_delay(busy, 0.99) is None  # the wait would pass the deadline
    for code in (RefusalCode.RATE_LIMITED, RefusalCode.SHUTTING_DOWN):
        other = ServerRefused(code, 1, "no")
        assert ConnectAttempts(100.0, 0.0).retry_delay(other, 0.0) is None


def test_a_busy_retry_leaves_the_attempt_time_and_a_late_timeout_names_the_refusal() -> None:
    busy = ServerRefused(RefusalCode.BUSY, 1, "busy")
    late = ConnectAttempts(1.5, 0.0)
    # a wait of 0.5-1.0 s could start an attempt with a millisecond to go: none starts with
    # less than BUSY_ATTEMPT_MIN left (a CI failure: 1 ms left of a 1.5 s connect deadline)
    for _ in range(50):
        assert ConnectAttempts(1.5, 0.0).retry_delay(busy, 1.0 - BUSY_ATTEMPT_MIN + 0.05) is None
    timeout = ConnectTimeout("timed out")
    assert late.timed_out(timeout) is timeout  # no refusal yet: the timeout itself
    assert late.retry_delay(busy, 0.0) is not None
    assert late.timed_out(timeout) is busy  # the retry ran out of time: the server's word


def test_a_protocol_error_ends_everything(pair: Pair) -> None:
    cmd = pair.start()
    pair.core.receive_data(b"\x00\x00\x00\x01x", pair.now)  # a frame too short to be one
    assert cmd.done and cmd.error is pair.core.error
    assert isinstance(pair.core.error, RemoteProtocolError)


# ---- keepalive ----------------------------------------------------------------------------


def test_keepalive_pings_then_gives_up(pair: Pair) -> None:
    core = pair.core
    assert core.keepalive(100.0) == 115.0  # no command: nothing to watch
    assert pair.c2s() == []
    cmd = pair.start()
    assert core.keepalive(200.0) == 215.0  # the silence clock starts with the command
    assert core.keepalive(214.9) == 215.0
    assert pair.c2s() == []
    assert core.keepalive(215.0) == 230.0  # PING sent; dead at 230 unless it is answered
    pair.c2s()  # the server answers with PONG
    pair.now = 216.0
    pair.s2c()
    assert core.keepalive(230.5) == 231.0  # the PONG counted as life: not dead at 230
    assert core.keepalive(231.0) == 246.0  # silent again: another PING, dead at 246
    pair.c2s()  # unanswered this time
    with pytest.raises(ConnectionLost, match=r"^server lab1 stopped responding \(30s\)$"):
        core.keepalive(246.0)
    assert cmd.error is core.error and core.keepalive(300.0) == float("inf")


def test_keepalive_pings_ahead_of_stdin_and_gives_up_on_a_server_that_takes_none(
    pair: Pair,
) -> None:
    """The server reads at all times: stdin it has not taken is no sign it is busy."""
    cmd = pair.start("cat", stdin=True)
    pair.core.keepalive(0.0)
    assert pair.core.write(cmd, bytes(100_000)) == 100_000  # queued, never sent
    assert pair.core.keepalive(15.0) == 30.0
    ping = pair.core.data_to_send(0)  # control frames only: the PING overtakes the stdin
    assert [type(e).__name__ for e in pair.server.receive_data(ping)] == []  # (PING: no event)
    assert pair.server.data_to_send()  # the server's PONG
    assert pair.core.conn.pending_data == 100_000
    with pytest.raises(ConnectionLost, match="stopped responding"):
        pair.core.keepalive(30.0)


# ---- stdin, signals and credit --------------------------------------------------------------


def test_stdin_never_exceeds_the_window(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = pair.start("cat", stdin=True)
    room = {cmd.channel: 5}
    monkeypatch.setattr(pair.core.conn, "stdin_room", lambda ch: room[ch])
    assert pair.core.write(cmd, b"0123456789") == 5
    room[cmd.channel] = 0
    assert pair.core.write(cmd, b"56789") == 0
    assert pair.core.handle([CreditReceived(cmd.channel, 100)], 0.0) == [cmd]  # wakes writers
    room[cmd.channel] = 100
    assert pair.core.write(cmd, b"56789") == 5
    pair.core.close_stdin(cmd)
    pair.core.signal(cmd, 2)
    events = pair.c2s()
    assert SignalReceived(cmd.channel, 2) in events  # (control frames may overtake data)
    assert [e for e in events if not isinstance(e, SignalReceived)] == [
        StdinReceived(cmd.channel, b"01234"),
        StdinReceived(cmd.channel, b"56789"),
        StdinClosed(cmd.channel),
    ]
    with pytest.raises(LocalProtocolError, match="stdin of 'cat' is closed"):
        pair.core.write(cmd, b"more")
    pair.server.send_exit(cmd.channel, ExitStatus(0))
    pair.s2c()
    assert pair.core.write(cmd, b"gone") == 4  # ended: dropped, as a closed pipe would
    pair.core.signal(cmd, 9)  # nothing to signal any more
    assert pair.c2s() == []


def test_start_waits_for_the_servers_channel_limit(pair: Pair) -> None:
    cmds = [pair.start() for _ in range(3)]
    assert not pair.core.can_start()
    pair.server.send_exit(cmds[0].channel, ExitStatus(0))
    pair.s2c()
    assert pair.core.can_start()


def test_output_events_carry_the_stream_enum(pair: Pair) -> None:
    cmd = pair.start()
    pair.server.send_output(cmd.channel, Stream.STDERR, b"x")
    [event] = pair.core.conn.receive_data(pair.server.data_to_send())
    assert isinstance(event, OutputReceived) and event.stream is Stream.STDERR
