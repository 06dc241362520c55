"""The async client API: `async with rexec.connect(target) as conn: await conn.run(...)`.

Several commands may run at once on one connection (one channel each). Output of a
streaming `Process` is buffered only up to a bound: a consumer that falls behind pauses the
socket (so the server pauses the command). `run()` and `wait()` collect everything, so they
lift that bound instead of deadlocking on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

from rexec.address import Endpoint
from rexec.client.blocking import HANDSHAKE_CLOSED, channel_error, resolve
from rexec.errors import (
    AuthError,
    ConnectionLost,
    ConnectTimeout,
    ExecError,
    LocalProtocolError,
    RemoteError,
    RexecError,
    ServerRefused,
    TruncatedError,
)
from rexec.heap import keep_heap
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
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.notice import busy_retry_delay, stalled_handshake
from rexec.protocol.token import Token
from rexec.result import Result
from rexec.transport import FramedProtocol

READ_HIGH = 8 * 1024 * 1024  # buffered, unconsumed output per connection before we pause
READ_LOW = 2 * 1024 * 1024
CLOSE_WAIT = 2.0


class OutputStream:
    """One stream (stdout or stderr) of a Process: `async for chunk in proc.stdout`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._conn._buffered(len(data))
        self._wake()

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._conn._consumed(len(data))
        return data

    async def read_chunk(self) -> bytes:
        """The next chunk, or b"" at end of stream."""
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._conn._consumed(len(data))
        return data

    async def read(self) -> bytes:
        """Everything until the end of the stream."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk


class Process:
    """A running remote command (from `Connection.start`)."""

    def __init__(self, conn: Connection, channel: int, command: str | tuple[str, ...]) -> None:
        self._conn = conn
        self.channel = channel
        self.command = command
        self.stdout = OutputStream(conn)
        self.stderr = OutputStream(conn)
        self._done: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._error: RexecError | None = None
        self._collect = False  # a waiter wants all output: never pause reading for it

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once the command has ended, else None."""
        return self._done.result() if self._done.done() and not self._done.exception() else None

    async def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin (start it with stdin=True); waits for drain."""
        await self._conn._send_stdin(self.channel, data)

    async def close_stdin(self) -> None:
        """EOF on the command's stdin."""
        self._conn._send_stdin_eof(self.channel)

    def signal(self, signum: int) -> None:
        """Deliver a signal to the command's whole process group (if it still runs)."""
        self._conn._send_signal(self.channel, signum)

    async def wait(self) -> Result:
        """Wait for the exit; the Result holds whatever output was not consumed."""
        self._conn._collecting(self)
        status = await asyncio.shield(self._done)
        if self._error is not None:
            if isinstance(self._error, ExecError):
                self._error.exit_code = status.exit_code
            raise self._error
        return Result.from_status(
            self.command, status, self.stdout._take_all(), self.stderr._take_all()
        )

    # -- called by the Connection --

    def _exited(self, status: ExitStatus) -> None:
        self.stdout._end()
        self.stderr._end()
        if not self._done.done():
            self._done.set_result(status)

    def _failed(self, exc: RexecError) -> None:
        self.stdout._end()
        self.stderr._end()
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # mark retrieved: the caller may never wait


class Connection:
    """An authenticated connection. Create with `await rexec.connect(...)`."""

    def __init__(self, endpoint: Endpoint, token: Token, suite: Suite, trace: TraceFn | None):
        self.endpoint = endpoint
        self._conn = ClientConnection(token, suite, trace=trace)
        self._proto = FramedProtocol(self._conn, self._on_events, self._on_lost)
        self._procs: dict[int, Process] = {}
        self._ready: asyncio.Future[ServerInfo] = asyncio.get_running_loop().create_future()
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._error: RexecError | None = None
        self._buffered_bytes = 0
        self._held = False
        self._collect_all = 0
        self._slots: asyncio.Semaphore | None = None  # the server's max_channels
        self.info: ServerInfo | None = None

    async def _open(self, timeout: float, limit: float | None = None) -> None:
        """Connect and handshake within `limit` seconds (default: timeout, the figure an
        expired deadline names)."""
        keep_heap()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout if limit is None else limit):
                try:
                    if self.endpoint.path is not None:
                        await loop.create_unix_connection(lambda: self._proto, self.endpoint.path)
                    else:
                        host, port = self.endpoint.host, self.endpoint.port
                        assert host is not None and port is not None
                        await loop.create_connection(lambda: self._proto, host, port)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise ConnectionLost(f"cannot connect to {self.endpoint}: {reason}") from None
                self._conn.initiate()
                self._proto.flush()
                self.info = await self._ready
                self._slots = asyncio.Semaphore(self.info.max_channels)
        except TimeoutError:
            self._proto.abort()
            if self._proto.transport is not None:  # connected: the handshake stalled
                stalled = stalled_handshake(str(self.endpoint), timeout, self._conn.reply_received)
                raise ConnectTimeout(stalled) from None
            raise ConnectTimeout(
                f"connecting to {self.endpoint} timed out after {timeout:g}s"
            ) from None
        except BaseException:
            self._proto.abort()
            raise

    # ---- protocol callbacks ----------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, OutputReceived):
                proc = self._procs.get(event.channel)
                if proc is not None:
                    (proc.stdout if event.stream == 1 else proc.stderr)._feed(event.data)
            elif isinstance(event, ExitReceived):
                proc = self._procs.pop(event.channel, None)
                if proc is not None:
                    proc._exited(event.status)
                    self._uncollect(proc)
                    assert self._slots is not None
                    self._slots.release()
            elif isinstance(event, ErrorReceived):
                if event.channel == 0:
                    self._error = RemoteError(event.code, event.message)
                else:
                    proc = self._procs.get(event.channel)
                    if proc is not None:
                        err = channel_error(event.code, event.message)
                        assert isinstance(err, RexecError)
                        proc._error = err
            elif isinstance(event, HandshakeComplete):
                if not self._ready.done():
                    self._ready.set_result(event.info)
            elif isinstance(event, CloseReceived):
                self._conn.send_close()
                self._proto.flush()

    def _on_lost(self, error: RexecError | None) -> None:
        if not self._ready.done():
            if error is None or isinstance(error, TruncatedError):
                error = AuthError(HANDSHAKE_CLOSED)
            self._ready.set_exception(error)
            self._ready.exception()
        if error is None and self._procs:
            error = TruncatedError("server closed the connection before the command's exit")
        if error is not None and self._error is None:
            self._error = error
        failure = self._error or ConnectionLost("connection closed")
        for proc in list(self._procs.values()):
            proc._failed(failure)
        self._procs.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    # ---- flow control ------------------------------------------------------------------

    def _buffered(self, n: int) -> None:
        self._buffered_bytes += n
        if self._buffered_bytes > READ_HIGH and not self._held and not self._collect_all:
            self._held = True
            self._proto.hold()

    def _consumed(self, n: int) -> None:
        self._buffered_bytes -= n
        if self._held and self._buffered_bytes < READ_LOW:
            self._held = False
            self._proto.release()

    def _collecting(self, proc: Process) -> None:
        """A waiter wants everything: reading must not pause on its account."""
        if not proc._collect:
            proc._collect = True
            self._collect_all += 1
            if self._held:
                self._held = False
                self._proto.release()

    def _uncollect(self, proc: Process) -> None:
        if proc._collect:
            proc._collect = False
            self._collect_all -= 1

    # ---- sending -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lost.done() or self._conn.close_sent:
            raise self._error or ConnectionLost("connection is closed")

    async def _send_stdin(self, channel: int, data: bytes) -> None:
        self._check_open()
        if channel not in self._conn.channels:
            return  # the command already ended: its stdin is gone, as with a closed pipe
        self._conn.send_stdin(channel, data)
        self._proto.flush()
        await self._proto.drain()

    def _send_stdin_eof(self, channel: int) -> None:
        if channel in self._conn.channels and not self._lost.done():
            self._conn.send_stdin_eof(channel)
            self._proto.flush()

    def _send_signal(self, channel: int, signum: int) -> None:
        if channel in self._conn.channels and not self._lost.done():
            self._conn.send_signal(channel, signum)
            self._proto.flush()

    # ---- public API ----------------------------------------------------------------------

    async def start(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> Process:
        """Start a command; stream its output from the Process.

        Returns at once unless the server's max_channels commands already run on this
        connection: then it waits for a slot instead of having the server refuse.
        """
        assert self._slots is not None
        await self._slots.acquire()
        try:
            self._check_open()
        except BaseException:
            self._slots.release()
            raise
        name: str | tuple[str, ...] = command if isinstance(command, str) else tuple(command)
        channel = self._conn.send_exec(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        proc = Process(self, channel, name)
        self._procs[channel] = proc
        self._proto.flush()
        return proc

    async def run(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        check: bool = False,
    ) -> Result:
        """Run a command to completion and collect its output (a str runs under /bin/sh -c)."""
        proc = await self.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin is not None)
        self._collecting(proc)
        if stdin is not None:
            await proc.write(stdin)
            await proc.close_stdin()
        result = await proc.wait()
        return result.check() if check else result

    async def close(self) -> None:
        """Say CLOSE, wait briefly for the server's, and close the socket."""
        if not self._lost.done():
            with contextlib.suppress(LocalProtocolError):
                self._conn.send_close()
            self._proto.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_WAIT)
            self._proto.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_WAIT)
        self._proto.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Connect:
    """What `connect()` returns: await it, or use it as `async with`."""

    def __init__(self, coro_args: dict[str, Any]) -> None:
        self._args = coro_args
        self._conn: Connection | None = None

    async def _make(self) -> Connection:
        args = self._args
        resolved = resolve(args["target"], token=args["token"], token_file=args["token_file"])
        timeout = args["connect_timeout"] or resolved.connect_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        retries = 0
        while True:  # a busy server is tried again a few times, within the timeout
            conn = Connection(resolved.endpoint, resolved.token, args["suite"], args["trace"])
            try:
                await conn._open(timeout, deadline - loop.time())
                return conn
            except ServerRefused as exc:
                delay = busy_retry_delay(exc, retries, deadline - loop.time())
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            retries += 1

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._make().__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await self._make()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(
    target: str,
    *,
    token: str | Token | None = None,
    token_file: str | None = None,
    connect_timeout: float | None = None,
    suite: Suite = Suite.AESGCM,
    trace: TraceFn | None = None,
) -> _Connect:
    """Connect and authenticate to TARGET (host[:port], unix:/path or a config alias)."""
    return _Connect(
        {
            "target": target,
            "token": token,
            "token_file": token_file,
            "connect_timeout": connect_timeout,
            "suite": suite,
            "trace": trace,
        }
    )
