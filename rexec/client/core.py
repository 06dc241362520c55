"""The client's protocol semantics, written once and free of I/O (the sans-I/O pattern).

Both client drivers only move bytes, wait, and tell this core the time: rexec.client.blocking
(selectors: `rexec run`, the shell and the sync `rexec.Client`) and rexec.client.aio (asyncio:
`rexec.connect`). What the protocol means to a client is decided here, and only here:

- routing: each command is a `Command` (one channel); its output, EXIT, ERROR and stdin
  credit go to it, and its output waits there, per stream, until the application takes it;
- a command's ERROR is raised when its EXIT arrives: `ExecError` (exit_code = that EXIT's
  code) for EXEC_FAILED, `RemoteError` for any other code;
- an ERROR on channel 0 is the server's reason for ending the connection: it is named in
  the error of every command the end leaves without an EXIT, and in `ClientCore.error`;
- the server's CLOSE is answered with ours; a command it leaves without an EXIT, or an EOF
  before CLOSE, is `TruncatedError`; the server closing during the handshake is `AuthError`;
- in place of message 2, a refusal notice is `ServerRefused` and an SSH or HTTP reply is
  `NotRexecServer` (found by rexec.protocol.notice, raised unchanged); a handshake write
  that fails is not the end until what the server sent has been read (a notice);
- keepalive, while a command runs: a PING after `KEEPALIVE_IDLE` seconds of silence,
  `ConnectionLost` after `KEEPALIVE_DEAD` (the server reads at all times and its PONG
  overtakes its data, so stdin it has not taken yet is no excuse for silence); the server's
  own PINGs are answered by the connection, as long as a driver keeps reading;
- flow: never more stdin than the server's window (`ClientConnection.stdin_room`); output
  is reported consumed (`output_consumed`) once it is handed to the application: taken from
  a stream, written to a sink, or collected into a Result;
- results: a `Result` from the EXIT and the output the application did not take.

Connecting again (a busy server, `retry=N`) is rexec.client.connecting's: it asks a failed
attempt's core whether it sent an EXEC.

The core never raises for what the server did: it records the error on the commands (and on
the connection), and the drivers raise it to whoever waits for them.
"""

from __future__ import annotations

import errno
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from rexec.errors import (
    AuthError,
    ConnectionLost,
    ErrorCode,
    ExecError,
    LocalProtocolError,
    PolicyError,
    ProtocolError,
    RemoteError,
    RexecError,
    ServerRefused,
    TruncatedError,
)
from rexec.protocol.client import ClientConnection
from rexec.protocol.connection import TraceFn
from rexec.protocol.events import (
    CloseReceived,
    CreditReceived,
    ErrorReceived,
    Event,
    ExitReceived,
    HandshakeComplete,
    OutputReceived,
    Stream,
)
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.pty import PtyRequest
from rexec.protocol.token import Token
from rexec.result import Result

SIGKILL = 9  # the same number on every POSIX system (PROTOCOL.md 10.8)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexec.protocol.xfer import XferRequest

KEEPALIVE_IDLE = 15.0  # seconds of server silence, while a command runs, before we PING
KEEPALIVE_DEAD = 30.0  # seconds of server silence before we give up on it
CLOSE_WAIT = 2.0  # how long a client waits for the server's CLOSE after its own
HANDSHAKE_CLOSED = (
    "authentication failed: the server closed the connection during the handshake "
    "(wrong or unknown token; the server's log has the reason)"
)

Data = bytes | bytearray  # a data frame's payload may be the buffer it was decrypted into
Chunk = tuple[Stream, Data]


def is_reset(exc: OSError) -> bool:
    """The peer reset the connection, or closed it under our write (both drivers' one rule)."""
    return exc.errno in (errno.ECONNRESET, errno.EPIPE)


def connection_broke(endpoint: object, exc: OSError) -> ConnectionLost:
    """The error for a socket that failed under an established connection."""
    return ConnectionLost(f"connection to {endpoint} lost: {exc}")


def command_error(code: int, message: str, status: ExitStatus) -> RexecError:
    """The exception for a command the server refused (ERROR on its channel, then EXIT)."""
    if code == ErrorCode.EXEC_FAILED:
        return ExecError(message, exit_code=status.exit_code)
    if code == ErrorCode.POLICY:
        return PolicyError(code, message)
    return RemoteError(code, message)


class Command:
    """One command (one channel) as the client sees it. Drivers read it; the core changes it."""

    __slots__ = (
        "_chunks",
        "_collect",
        "_refusal",
        "_seq",
        "channel",
        "command",
        "error",
        "lost",
        "status",
        "stdin_open",
    )

    def __init__(self, channel: int, command: str | tuple[str, ...], stdin: bool) -> None:
        self.channel = channel
        self.command = command
        self.stdin_open = stdin
        self.status: ExitStatus | None = None
        self.error: RexecError | None = None  # why there is no Result: refused, or cut short
        self.lost = False  # the connection ended before the command's EXIT
        # output not taken yet, per stream (index Stream - 1), tagged with its arrival order
        self._chunks: tuple[deque[tuple[int, Data]], deque[tuple[int, Data]]] = (
            deque(),
            deque(),
        )
        self._collect = [False, False]  # that stream goes into the Result: counted as taken
        self._seq = 0
        self._refusal: tuple[int, str] | None = None

    @property
    def done(self) -> bool:
        """The command ended: it has its exit status, or an error instead."""
        return self.status is not None or self.error is not None

    def has_output(self, stream: Stream | None = None) -> bool:
        """Output is waiting to be taken (of `stream`, or of either)."""
        if stream is None:
            return bool(self._chunks[0] or self._chunks[1])
        return bool(self._chunks[stream - 1])

    def __repr__(self) -> str:
        return f"<Command {self.channel} {self.command!r} status={self.status} error={self.error}>"


class ClientCore:
    """One client connection's protocol state: feed it bytes and the time, send what it queues.

    `conn` is the underlying ClientConnection: a driver feeds it received bytes (through
    `buffer_updated`/`receive_data`, or itself and then `handle`) and sends `data_to_send()`
    after every call here.
    """

    def __init__(
        self,
        token: Token,
        suite: Suite = Suite.AESGCM,
        *,
        target: str | None = None,
        trace: TraceFn | None = None,
    ) -> None:
        self.conn = ClientConnection(token, suite, trace=trace)
        self.target = target
        self.info: ServerInfo | None = None
        self.error: RexecError | None = None  # set once the connection can run nothing more
        self.server_error: RemoteError | None = None  # the server's channel-0 ERROR, if any
        self.commands: dict[int, Command] = {}  # the open ones, by channel
        self.keepalive_idle = KEEPALIVE_IDLE
        self.keepalive_dead = KEEPALIVE_DEAD
        self._last_rx: float | None = None  # None: the silence clock restarts at the next call
        self._pinged = False
        self._closing = False  # we said CLOSE first
        self.exec_sent = False  # an EXEC was queued: a command may run (never retry then)

    # ---- bytes in and out -----------------------------------------------------------------

    def initiate(self) -> None:
        """Queue HELLO and the first handshake message."""
        self.conn.initiate()

    def data_to_send(self, limit: int | None = None) -> bytes | bytearray:
        """What to send now: every control frame, and data frames while under `limit` bytes
        (None: all). A driver that leaves data queued here lets a later SIGNAL or PONG
        overtake it."""
        return self.conn.data_to_send(limit)

    def get_buffer(self) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> list[Command]:
        """`nbytes` arrived in the get_buffer() view; returns the commands that changed."""
        self.heard(now)
        try:
            events = self.conn.buffer_updated(nbytes)
        except (ProtocolError, ServerRefused) as exc:  # NotRexecServer is a ProtocolError
            return self.connection_lost(exc)
        return self.handle(events, now)

    def receive_data(self, data: bytes, now: float) -> list[Command]:
        """As buffer_updated, for bytes in hand."""
        try:
            events = self.conn.receive_data(data)
        except (ProtocolError, ServerRefused) as exc:
            return self.connection_lost(exc)
        return self.handle(events, now)

    def receive_eof(self) -> list[Command]:
        """The server closed its side of the stream."""
        try:
            self.conn.receive_eof()
        except TruncatedError as exc:
            return self.connection_lost(exc)
        return self.connection_lost(None)

    def handle(self, events: Iterable[Event], now: float) -> list[Command]:
        """Apply events from `conn`; returns the commands that changed (duplicates possible)."""
        if self.error is not None:  # ended (say, the keepalive gave up): late bytes are moot
            return []
        self.heard(now)
        touched: list[Command] = []
        for event in events:
            if isinstance(event, OutputReceived):
                cmd = self.commands[event.channel]
                if event.data:
                    cmd._seq += 1
                    cmd._chunks[event.stream - 1].append((cmd._seq, event.data))
                    if cmd._collect[event.stream - 1]:
                        self._consumed(cmd, len(event.data))
                    touched.append(cmd)
            elif isinstance(event, ExitReceived):
                cmd = self.commands.pop(event.channel)
                cmd.status = event.status
                cmd.stdin_open = False
                if cmd._refusal is not None:
                    cmd.error = command_error(*cmd._refusal, event.status)
                touched.append(cmd)
            elif isinstance(event, CreditReceived):
                cmd_or_none = self.commands.get(event.channel)
                if cmd_or_none is not None:
                    touched.append(cmd_or_none)
            elif isinstance(event, ErrorReceived):
                if event.channel == 0:
                    self.server_error = RemoteError(event.code, event.message)
                else:
                    self.commands[event.channel]._refusal = (event.code, event.message)
            elif isinstance(event, HandshakeComplete):
                self.info = event.info
            elif isinstance(event, CloseReceived):
                self.conn.send_close()  # the answer; a no-op after our own CLOSE
                touched.extend(self._end(self._closed_error()))
        return touched

    def heard(self, now: float) -> None:
        """Bytes arrived from the server at `now` (a whole frame or not): it is alive."""
        self._last_rx = now
        self._pinged = False

    # ---- the connection's end ---------------------------------------------------------------

    def connection_lost(self, error: RexecError | None, *, reset: bool = False) -> list[Command]:
        """The stream ended: `error` says how (None: after the server's CLOSE, cleanly).

        `reset`: the server reset the connection. In the handshake, a reset or an EOF means
        it refused us (a bad token gets no answer): AuthError. A refusal notice or a foreign
        reply (ServerRefused, NotRexecServer) stays what it is. The first reason wins.
        """
        if self.error is not None:
            return []
        if self.info is None:
            if error is None or reset or isinstance(error, TruncatedError):
                error = AuthError(HANDSHAKE_CLOSED)
        elif error is None:
            error = self._closed_error()
        return self._end(error)

    def send_failed(self, error: ConnectionLost, *, reset: bool) -> bool:
        """A write to the server failed. True: keep reading, the handshake's EOF or error
        ends it (a server that refused us may have said why before it closed: read the
        notice first; our unsent bytes are moot). False: the connection has ended."""
        if reset and self.info is None and self.error is None:
            return True
        self.connection_lost(error, reset=reset)
        return False

    def _closed_error(self) -> ConnectionLost:
        if self._closing:
            return ConnectionLost("connection closed")
        why = f" ({self.server_error})" if self.server_error is not None else ""
        return ConnectionLost(f"the server closed the connection{why}")

    def _end(self, error: RexecError) -> list[Command]:
        """No more commands on this connection; the open ones end with an error."""
        if self.error is None:
            self.error = error
        if (
            isinstance(error, ConnectionLost)
            and not isinstance(error, TruncatedError)
            and self.conn.close_received  # an orderly CLOSE that left commands without EXIT
        ):
            why = f" ({self.server_error})" if self.server_error is not None else ""
            error = TruncatedError(
                f"the server closed the connection before the command's exit status{why}"
            )
        ended = list(self.commands.values())
        for cmd in ended:
            cmd.error = error
            cmd.lost = True
            cmd.stdin_open = False
        self.commands.clear()
        return ended

    def close(self) -> None:
        """Say CLOSE: we want nothing more. The server ends our commands, then answers."""
        if self.error is None and self.conn.handshake_done and not self.conn.close_sent:
            self._closing = True
            self.conn.send_close()

    # ---- keepalive ----------------------------------------------------------------------------

    def keepalive(self, now: float) -> float:
        """Decide about keepalive at time `now`; returns when to ask again.

        Only while a command runs: an idle connection is the server's to time out.
        Raises ConnectionLost (and ends the connection) once the server has been silent for
        `keepalive_dead` seconds.
        """
        if self.error is not None or self.conn.close_sent:
            return math.inf
        last = self._last_rx
        if not self.commands or last is None:
            self._last_rx = now
            self._pinged = False
            return now + self.keepalive_idle
        silent = now - last
        if silent >= self.keepalive_dead:
            who = f"server {self.target}" if self.target else "the server"
            error = ConnectionLost(f"{who} stopped responding ({silent:.0f}s)")
            self._end(error)
            raise error
        if silent >= self.keepalive_idle and not self._pinged:
            self._pinged = True
            self.conn.send_ping(b"keepalive")
        return last + (self.keepalive_dead if self._pinged else self.keepalive_idle)

    # ---- commands -----------------------------------------------------------------------------

    def can_start(self) -> bool:
        """start() may go ahead: fewer commands run than the server allows (or it will fail)."""
        info = self.info
        return self.error is not None or info is None or len(self.commands) < info.max_channels

    def start(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pty: PtyRequest | None = None,
    ) -> Command:
        """Queue EXEC for a command (a str runs under /bin/sh -c, a sequence is an argv).

        With `pty`, on a pseudo-terminal: its output arrives as one stream (stdout)."""
        if self.error is not None:
            raise self.error
        if self.info is None:
            raise LocalProtocolError("start() before the handshake finished")
        if self.conn.close_sent:
            raise ConnectionLost("connection is closed")
        name: str | tuple[str, ...] = command if isinstance(command, str) else tuple(command)
        self.exec_sent = True
        channel = self.conn.send_exec(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, pty=pty
        )
        if not self.commands:
            self._last_rx = None  # the first running command starts the silence clock
        cmd = Command(channel, name, stdin)
        self.commands[channel] = cmd
        return cmd

    def start_transfer(self, request: XferRequest, name: str) -> Command:
        """Queue XFER for a transfer channel (rexec.client.xfercore drives it): a Command
        whose stdin and stdout carry the transfer's records (docs/PROTOCOL.md section 17)."""
        if self.error is not None:
            raise self.error
        if self.info is None:
            raise LocalProtocolError("a transfer before the handshake finished")
        if self.conn.close_sent:
            raise ConnectionLost("connection is closed")
        self.exec_sent = True  # a put may have written files: never retried either
        channel = self.conn.send_xfer(request)
        if not self.commands:
            self._last_rx = None
        cmd = Command(channel, name, True)
        self.commands[channel] = cmd
        self.collect(cmd, Stream.STDERR)  # (a transfer has no stderr)
        return cmd

    def write_record(self, cmd: Command, buf: bytearray) -> None:
        """Queue one record (a buffer behind frames.HEADROOM bytes, within stdin_room) as
        one STDIN frame, framed in place."""
        if cmd.lost and cmd.error is not None:
            raise cmd.error
        if not cmd.done:
            self.conn.send_stdin_buffer(cmd.channel, buf)

    def stdin_room(self, cmd: Command) -> int:
        """Bytes of stdin the server takes now (0 while its window is shut, or at the end)."""
        if not cmd.stdin_open or cmd.channel not in self.commands or self.conn.close_sent:
            return 0
        return self.conn.stdin_room(cmd.channel)

    def write(self, cmd: Command, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the window allows (at most MAX_PAYLOAD); returns how much.

        A command that has ended takes everything and drops it (as a closed pipe would); a
        connection that ended raises its error.
        """
        if cmd.lost and cmd.error is not None:
            raise cmd.error
        if cmd.done:
            return len(data)
        if not cmd.stdin_open:
            raise LocalProtocolError(f"stdin of {cmd.command!r} is closed or was not requested")
        n = min(len(data), self.stdin_room(cmd), MAX_PAYLOAD)
        if n:  # (the connection copies it behind its frame header: no copy here)
            self.conn.send_stdin(cmd.channel, data if n == len(data) else memoryview(data)[:n])
        return n

    def close_stdin(self, cmd: Command) -> None:
        """EOF on the command's stdin (nothing to do once it has ended)."""
        if cmd.stdin_open and cmd.channel in self.commands and not self.conn.close_sent:
            self.conn.send_stdin_eof(cmd.channel)
        cmd.stdin_open = False

    def signal(self, cmd: Command, signum: int) -> None:
        """Deliver a signal to the command's process group, if it still runs."""
        if cmd.channel in self.commands and not self.conn.close_sent:
            self.conn.send_signal(cmd.channel, signum)

    def abandon(self, cmd: Command) -> None:
        """The caller gave up on a run() (an exception, Ctrl-C, a cancelled task): kill the
        command now, as subprocess.run kills its child, rather than when the connection
        closes; its output from here on counts as taken (nobody will read it)."""
        if cmd.done:
            return
        self.signal(cmd, SIGKILL)
        for stream in Stream:
            self.collect(cmd, stream)

    def resize(self, cmd: Command, rows: int, cols: int) -> None:
        """A pty command's new window size (WINDOW), if it still runs."""
        if cmd.channel in self.commands and not self.conn.close_sent:
            self.conn.send_window(cmd.channel, rows, cols)

    def take(self, cmd: Command, stream: Stream | None = None) -> Chunk | None:
        """The next output chunk for the application (of `stream`, or in arrival order).

        None: nothing yet, wait for more. `(stream, b"")`: the end. Raises the connection's
        error when it cut the command short: truncated output never looks complete.
        """
        chunks = cmd._chunks
        if stream is None:
            out, err = chunks
            if out and err:
                stream = Stream.STDOUT if out[0][0] < err[0][0] else Stream.STDERR
            else:
                stream = Stream.STDOUT if out else Stream.STDERR
        queue = chunks[stream - 1]
        if queue:
            data = queue.popleft()[1]
            if not cmd._collect[stream - 1]:
                self._consumed(cmd, len(data))
            return stream, data
        if not cmd.done:
            return None
        if cmd.lost and cmd.error is not None:
            raise cmd.error
        return stream, b""

    def collect(self, cmd: Command, stream: Stream) -> None:
        """From now on `stream` goes into the Result: what it holds and gets counts as taken."""
        index = stream - 1
        if not cmd._collect[index]:
            cmd._collect[index] = True
            self._consumed(cmd, sum(len(data) for _, data in cmd._chunks[index]))

    def result(self, cmd: Command) -> Result:
        """The Result of a command that has ended; raises its error if it has one (a
        TruncatedError with the output the Result would have held)."""
        error = cmd.error
        if error is not None and not isinstance(error, TruncatedError):
            raise error
        if error is None and cmd.status is None:
            raise LocalProtocolError(f"{cmd.command!r} has not ended yet")
        out, err = (b"".join([data for _, data in queue]) for queue in cmd._chunks)
        for queue in cmd._chunks:
            queue.clear()
        if isinstance(error, TruncatedError):
            raise error.with_output(out, err)
        assert cmd.status is not None
        return Result.from_status(cmd.command, cmd.status, out, err, target=self.target)

    def _consumed(self, cmd: Command, nbytes: int) -> None:
        if nbytes and cmd.channel in self.commands and not self.conn.close_sent:
            self.conn.output_consumed(cmd.channel, nbytes)
