"""A selector-driven client over the sans-I/O core: `rexec run` and the sync `rexec.Client`.

No asyncio here: `rexec run` is a process per command and asyncio alone would cost it
~60 ms of imports. The socket is non-blocking with our own output buffer, so the client
never deadlocks by blocking in send() while the server waits for us to read its output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from rexec.address import Endpoint
from rexec.client.target import TOKEN_ENV, ResolvedTarget, resolve_target
from rexec.errors import (
    AuthError,
    ConnectionLost,
    ConnectTimeout,
    ErrorCode,
    ExecError,
    LocalProtocolError,
    RemoteError,
    RexecError,
    ServerRefused,
    TruncatedError,
)
from rexec.heap import BULK, keep_heap
from rexec.protocol.client import ClientConnection
from rexec.protocol.connection import TraceFn
from rexec.protocol.events import (
    CloseReceived,
    ErrorReceived,
    Event,
    ExitReceived,
    HandshakeComplete,
    OutputReceived,
)
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.notice import busy_retry_delay, stalled_handshake
from rexec.protocol.token import Token
from rexec.result import Result

HANDSHAKE_CLOSED = (
    "authentication failed: the server closed the connection during the handshake "
    "(wrong or unknown token; the server's log has the reason)"
)
OUT_HIGH_WATER = 4 * MAX_PAYLOAD  # stop reading local stdin while this much is unsent
KEEPALIVE_IDLE = 15.0  # seconds of server silence before we PING
KEEPALIVE_DEAD = 30.0  # seconds of server silence before we give up
CLOSE_WAIT = 2.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s (close sends a reset)

Sink = Callable[[bytes], None]
PollHook = Callable[[], "int | None"]  # returns a signal number to forward, or None


def open_socket(endpoint: Endpoint, timeout: float) -> socket.socket:
    """Connect with a deadline; TCP_NODELAY because every frame is one complete write."""
    try:
        if endpoint.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            assert endpoint.host is not None and endpoint.port is not None
            host = endpoint.host
            # an ASCII host as bytes: a str makes getaddrinfo load the IDNA codec (+ unicodedata,
            # ~3-9 ms of `rexec run` start-up) just to encode "127.0.0.1"
            addr = host.encode("ascii") if host.isascii() else host
            # (typeshed says str; CPython's getaddrinfo takes bytes too)
            sock = socket.create_connection((addr, endpoint.port), timeout=timeout)  # type: ignore[arg-type]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError:
        raise ConnectTimeout(f"connecting to {endpoint} timed out after {timeout:g}s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConnectionLost(f"cannot connect to {endpoint}: {reason}") from None
    return sock


_SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a TCP send queue not yet sent


def _unsent(sock: socket.socket | None) -> int:
    """Bytes queued in the kernel that the peer will not take yet (its window is shut, or
    for a unix socket, it does not read). Sent-but-unacknowledged bytes do not count: a
    dead host must still fail the keepalive. 0 when unknown."""
    import fcntl
    import termios

    if sock is None:
        return 0
    request = termios.TIOCOUTQ if sock.family == socket.AF_UNIX else _SIOCOUTQNSD
    try:
        out = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", out)[0])


def resolve(
    target: str, *, token: str | Token | None = None, token_file: str | None = None
) -> ResolvedTarget:
    """resolve_target, with an explicit token (text or Token) taking precedence."""
    if token is None:
        return resolve_target(target, token_file=token_file)
    text = token.format() if isinstance(token, Token) else token
    env = dict(os.environ)
    env[TOKEN_ENV] = text
    return resolve_target(target, env=env)


def channel_error(code: int, message: str) -> Exception:
    """The exception for an ERROR frame on a command's channel."""
    if code == ErrorCode.EXEC_FAILED:
        return ExecError(message)
    return RemoteError(code, message)


class BlockingConnection:
    """One authenticated connection; commands run one at a time."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: Token,
        *,
        connect_timeout: float = 10.0,
        suite: Suite = Suite.AESGCM,
        trace: TraceFn | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._conn = ClientConnection(token, suite, trace=trace)
        self._args = (token, suite, trace)  # for a fresh ClientConnection on a retry
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._out = bytearray()
        # poll, not epoll: stdin may be a regular file, which epoll refuses
        self._sel: selectors.BaseSelector = selectors.PollSelector()
        self.info: ServerInfo | None = None
        self._closed = False
        self._last_rx = time.monotonic()
        self._pinged = False

    # ---- connection ----------------------------------------------------------------

    def connect(self) -> ServerInfo:
        """Connect and authenticate; a server that says it is busy is tried again a few
        times (notice.busy_retry_delay), all within the connect timeout."""
        deadline = time.monotonic() + self._connect_timeout
        retries = 0
        while True:
            try:
                return self._connect_once(deadline)
            except ServerRefused as exc:
                delay = busy_retry_delay(exc, retries, deadline - time.monotonic())
                if delay is None:
                    raise
            time.sleep(delay)
            retries += 1
            token, suite, trace = self._args
            self._conn = ClientConnection(token, suite, trace=trace)
            self._sel = selectors.PollSelector()
            self._out.clear()
            self._closed = False

    def _connect_once(self, deadline: float) -> ServerInfo:
        sock = open_socket(self.endpoint, max(0.001, deadline - time.monotonic()))
        self._sock = sock
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ)
        self._conn.initiate()
        self._flush_queue()
        try:
            while self.info is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectTimeout(
                        stalled_handshake(
                            str(self.endpoint), self._connect_timeout, self._conn.reply_received
                        )
                    )
                for event in self._pump(remaining, handshake=True):
                    if isinstance(event, HandshakeComplete):
                        self.info = event.info
        except BaseException:
            self._abort()
            raise
        return self.info

    def _flush_queue(self) -> None:
        self._out += self._conn.data_to_send()
        self._try_send()

    def _try_send(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._out:
            try:
                sent = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if self.info is None and exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._out.clear()  # closed during the handshake: read why (a notice?)
                    break
                raise ConnectionLost(f"connection to {self.endpoint} lost: {exc}") from None
            del self._out[:sent]
        self._sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0))

    def _pump(
        self, timeout: float | None, *, handshake: bool = False, extra: int = 0
    ) -> list[Event]:
        """Wait up to `timeout` for socket activity; returns the protocol events it brought.

        `extra` is a file descriptor also registered by the caller; when it is ready, the
        returned list is empty and `self.ready_extra` is True.
        """
        sock = self._sock
        assert sock is not None
        self.ready_extra = False
        events: list[Event] = []
        for key, mask in self._sel.select(timeout):
            if key.fileobj is not sock:
                self.ready_extra = True
                continue
            if mask & selectors.EVENT_WRITE:
                self._try_send()
            if mask & selectors.EVENT_READ:
                events.extend(self._read(handshake))
        return events

    def _read(self, handshake: bool) -> list[Event]:
        sock = self._sock
        assert sock is not None
        try:
            with self._conn.get_buffer() as view:
                nbytes = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and handshake:
                nbytes = 0
            else:
                raise ConnectionLost(f"connection to {self.endpoint} lost: {exc}") from None
        self._last_rx = time.monotonic()
        self._pinged = False
        if not nbytes:
            if handshake and not self._conn.handshake_done:
                raise AuthError(HANDSHAKE_CLOSED)
            self._conn.receive_eof()  # raises TruncatedError unless CLOSE came first
            return [CloseReceived()] if not self._closed else []
        events = self._conn.buffer_updated(nbytes)
        self._flush_queue()
        return events

    def _keepalive(self) -> None:
        if self._out or _unsent(self._sock):
            # The server holds our input back (it stops reading while a command leaves its
            # stdin unread), so a PING would wait behind it: the server is not silent but
            # busy, and its kernel keeps answering for it (a zero window is an answer).
            self._last_rx = time.monotonic()
            return
        silent = time.monotonic() - self._last_rx
        if silent > KEEPALIVE_DEAD:
            raise ConnectionLost(f"server {self.endpoint} stopped responding ({silent:.0f}s)")
        if silent > KEEPALIVE_IDLE and not self._pinged:
            self._pinged = True
            self._conn.send_ping(b"keepalive")
            self._flush_queue()

    # ---- commands ------------------------------------------------------------------

    def run(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | int | None = None,
        stdout: Sink | None = None,
        stderr: Sink | None = None,
        poll: PollHook | None = None,
        wakeup_fd: int | None = None,
    ) -> Result:
        """Run one command. Output goes to the sinks as it arrives, else into the Result.

        stdin: bytes to send, a file descriptor to stream until EOF, or None for EOF at once.
        poll/wakeup_fd: the CLI's Ctrl-C hook; wakeup_fd becomes readable when poll has news.
        """
        if self.info is None:
            raise LocalProtocolError("run() before connect()")
        conn = self._conn
        name: str | tuple[str, ...] = command if isinstance(command, str) else tuple(command)
        channel = conn.send_exec(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin is not None
        )
        if isinstance(stdin, bytes):
            conn.send_stdin(channel, stdin)
            conn.send_stdin_eof(channel)
        self._flush_queue()
        chunks: dict[int, list[bytes]] = {1: [], 2: []}
        sinks = {1: stdout, 2: stderr}
        stdin_fd = stdin if isinstance(stdin, int) else None
        error: Exception | None = None
        reading_stdin = False
        if wakeup_fd is not None:
            self._sel.register(wakeup_fd, selectors.EVENT_READ)
        try:
            while True:
                want_stdin = stdin_fd is not None and len(self._out) < OUT_HIGH_WATER
                if want_stdin != reading_stdin:
                    assert stdin_fd is not None
                    if want_stdin:
                        self._sel.register(stdin_fd, selectors.EVENT_READ)
                    else:
                        self._sel.unregister(stdin_fd)
                    reading_stdin = want_stdin
                events = self._pump(KEEPALIVE_IDLE / 3)
                if self.ready_extra:
                    stdin_fd = self._extra_ready(channel, stdin_fd, wakeup_fd, poll)
                    if stdin_fd is None and reading_stdin:
                        reading_stdin = False
                if not events and not self.ready_extra:
                    self._keepalive()
                for event in events:
                    if isinstance(event, OutputReceived) and event.channel == channel:
                        if len(event.data) >= BULK:
                            keep_heap()  # a bulk stream: worth pinning the heap (once)
                        sink = sinks[event.stream]
                        if sink is None:
                            chunks[event.stream].append(event.data)
                        else:
                            sink(event.data)
                    elif isinstance(event, ExitReceived) and event.channel == channel:
                        if error is not None:  # the command never started
                            if isinstance(error, ExecError):
                                error.exit_code = event.status.exit_code
                            raise error
                        return Result.from_status(
                            name, event.status, b"".join(chunks[1]), b"".join(chunks[2])
                        )
                    elif isinstance(event, ErrorReceived):
                        if event.channel == 0:
                            raise RemoteError(event.code, event.message)
                        if event.channel == channel:
                            error = channel_error(event.code, event.message)
                    elif isinstance(event, CloseReceived):
                        raise TruncatedError(
                            "server closed the connection before the command's exit status"
                        )
        finally:
            if reading_stdin and stdin_fd is not None:
                self._sel.unregister(stdin_fd)
            if wakeup_fd is not None:
                self._sel.unregister(wakeup_fd)

    def _extra_ready(
        self, channel: int, stdin_fd: int | None, wakeup_fd: int | None, poll: PollHook | None
    ) -> int | None:
        """Handle local stdin and the signal wake-up; returns the still-open stdin fd."""
        conn = self._conn
        if wakeup_fd is not None and poll is not None:
            signum = poll()
            if signum is not None and channel in conn.channels:
                conn.send_signal(channel, signum)
        if stdin_fd is not None:
            try:
                data = os.read(stdin_fd, MAX_PAYLOAD)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None and channel in conn.channels:
                if len(data) >= BULK:
                    keep_heap()
                if data:
                    conn.send_stdin(channel, data)
                else:
                    conn.send_stdin_eof(channel)
                    self._sel.unregister(stdin_fd)
                    stdin_fd = None
            elif data is not None and not data:
                self._sel.unregister(stdin_fd)
                stdin_fd = None
        self._flush_queue()
        return stdin_fd

    def check_alive(self) -> str | None:
        """Without blocking: None while the connection is usable, else why it is not.

        Lets an interactive front end notice a server's idle timeout or shutdown before the
        user's next command is sent into a closed connection.
        """
        if self._sock is None or self._closed:
            return "connection closed"
        why: str | None = None
        try:
            for event in self._pump(0):
                if isinstance(event, ErrorReceived) and event.channel == 0:
                    why = f"server said: {event.message}"
                elif isinstance(event, CloseReceived):
                    why = why or "the server closed the connection"
        except RexecError as exc:
            return str(exc)
        if why is None and self._conn.close_received:
            why = "the server closed the connection"
        return why

    # ---- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Send CLOSE, wait briefly for the server's, and close the socket."""
        if self._closed or self._sock is None:
            return
        self._closed = True
        try:
            self._conn.send_close()
            self._flush_queue()
            deadline = time.monotonic() + CLOSE_WAIT
            while not self._conn.close_received and time.monotonic() < deadline:
                self._pump(deadline - time.monotonic())
        except (ConnectionLost, OSError):
            pass
        finally:
            self._abort()

    def _abort(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            if not self._conn.close_received:
                # An abnormal end: reset rather than FIN, which would queue behind unsent
                # stdin that a stalled server may never read (it could not see us leave).
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self._sel.close()


class Client:
    """Synchronous API: `with rexec.Client("host", token=...) as c: c.run("uname -a")`.

    Commands run one after another on one connection. For concurrency, use the async API
    (`rexec.connect`).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | Token | None = None,
        token_file: str | None = None,
        connect_timeout: float | None = None,
        suite: Suite = Suite.AESGCM,
    ) -> None:
        resolved = resolve(target, token=token, token_file=token_file)
        self.target = resolved.name
        self._conn = BlockingConnection(
            resolved.endpoint,
            resolved.token,
            connect_timeout=connect_timeout or resolved.connect_timeout,
            suite=suite,
        )
        self.info = self._conn.connect()

    def run(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        check: bool = False,
    ) -> Result:
        """Run and collect; raises ExecError if it could not start, CommandFailed with check."""
        result = self._conn.run(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        return result.check() if check else result

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
