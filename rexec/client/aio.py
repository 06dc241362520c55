"""The asyncio driver: the async API (`async with rexec.connect(target) as conn: ...`).

It moves bytes between an asyncio transport and the sans-I/O client core and wakes whoever
waits; what the bytes mean is the core's business (rexec.client.core), exactly as for the
sync driver. Several commands may run at once on one connection (one channel each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

from rexec.address import Endpoint
from rexec.client.aiowait import ClientProtocol, Waiters
from rexec.client.connecting import (
    DEFAULT_RETRY_DELAY,
    ConnectAttempts,
    Retry,
    RetryFn,
    connect_failed,
    connect_timed_out,
)
from rexec.client.core import (
    CLOSE_WAIT,
    Chunk,
    ClientCore,
    Command,
    connection_broke,
    is_reset,
)
from rexec.client.sockdriver import jitter
from rexec.client.target import resolve_target
from rexec.errors import ConnectionLost, ConnectTimeout, RexecError, ServerRefused
from rexec.heap import keep_heap
from rexec.protocol.connection import TraceFn
from rexec.protocol.events import Event, Stream
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.pty import PtyRequest
from rexec.protocol.token import Token
from rexec.result import Result
from rexec.transfer import ProgressCallback, TransferResult

Sink = Callable[[bytes | bytearray], None]  # chunks may be the buffers frames arrived in


class OutputStream:
    """One stream (stdout or stderr) of a Process: `async for chunk in proc.stdout`."""

    stream: Stream

    def __init__(self, proc: Process, stream: Stream) -> None:
        self._proc = proc
        self.stream = stream

    async def read_chunk(self) -> bytes | bytearray:
        """The next chunk (a bytearray: the buffer its frame was decrypted into, not copied),
        or b"" at the end of the stream."""
        return (await self._proc._next(self.stream))[1]

    async def read(self) -> bytes:
        """Everything until the end of the stream."""
        return b"".join([chunk async for chunk in self])

    def __aiter__(self) -> AsyncIterator[bytes | bytearray]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes | bytearray]:
        while chunk := await self.read_chunk():
            yield chunk


class Process:
    """A running remote command (from `Connection.start`).

    Iterate it (`async for stream, chunk in proc`, chunk a bytearray) for output in arrival
    order, or read `stdout`/`stderr`; read both (or iterate the process, or wait()): output
    not taken holds the command back.
    """

    channel: int
    command: str | tuple[str, ...]
    stdout: OutputStream
    stderr: OutputStream

    def __init__(self, conn: Connection, cmd: Command) -> None:
        self._conn = conn
        self._core = conn._core
        self._cmd = cmd
        self._changed = Waiters()
        self.channel = cmd.channel
        self.command = cmd.command
        self.stdout = OutputStream(self, Stream.STDOUT)
        self.stderr = OutputStream(self, Stream.STDERR)

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once the command has ended, else None."""
        return self._cmd.status

    async def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin (start it with stdin=True); waits while the server's
        window is shut or the socket is not draining. Once the command has ended, its stdin is
        gone: the bytes are dropped."""
        core, cmd, conn = self._core, self._cmd, self._conn
        view = memoryview(data)
        while view:
            n = core.write(cmd, view)  # raises if stdin is closed; drops all once cmd ended
            if n:
                view = view[n:]
                conn._flush()
                await conn._drain()
            else:
                await self._until(lambda: cmd.done or core.stdin_room(cmd) > 0)

    async def close_stdin(self) -> None:
        """EOF on the command's stdin."""
        self._core.close_stdin(self._cmd)
        self._conn._flush()

    def signal(self, signum: int) -> None:
        """Deliver a signal to the command's whole process group (if it still runs)."""
        self._core.signal(self._cmd, signum)
        self._conn._flush()

    def resize(self, rows: int, cols: int) -> None:
        """Tell a command started with `pty=` its terminal's new size (it gets SIGWINCH)."""
        self._core.resize(self._cmd, rows, cols)
        self._conn._flush()

    def _abandon(self) -> None:
        """run() gave up on it: the core kills it (ClientCore.abandon), sent as far as we can."""
        self._core.abandon(self._cmd)
        with contextlib.suppress(RexecError, OSError):
            self._conn._flush()

    async def wait(self, *, stdout: Sink | None = None, stderr: Sink | None = None) -> Result:
        """Wait for the exit; returns the Result, or raises why there is none.

        Output goes to the sinks as it arrives; a stream without one is collected into the
        Result (with whatever of it was not taken before).
        """
        core, cmd = self._core, self._cmd
        sinks = (stdout, stderr)
        for stream, sink in zip(Stream, sinks, strict=True):
            if sink is None:
                core.collect(cmd, stream)
        self._conn._flush()
        if stdout is not None or stderr is not None:
            which = None if stdout and stderr else Stream.STDOUT if stdout else Stream.STDERR
            while True:
                stream, data = await self._next(which)
                if not data:
                    break
                sink = sinks[stream - 1]
                assert sink is not None
                sink(data)
        else:
            await self._until(lambda: cmd.done)
        return core.result(cmd)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        while True:
            stream, data = await self._next(None)
            if not data:
                return
            yield stream, data

    async def _next(self, stream: Stream | None) -> Chunk:
        core, cmd = self._core, self._cmd
        while (item := core.take(cmd, stream)) is None:
            await self._until(lambda: cmd.done or cmd.has_output(stream))
        self._conn._flush()  # output taken may have opened the server's window
        return item

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()


class Connection:
    """An authenticated connection. Create with `await rexec.connect(...)`."""

    endpoint: Endpoint
    target: str  # as the caller named it (an alias, or an address)
    info: ServerInfo | None  # what the server said about itself; set once connected

    def __init__(
        self,
        endpoint: Endpoint,
        token: Token,
        suite: Suite = Suite.AESGCM,
        trace: TraceFn | None = None,
        target: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.target = target if target is not None else str(endpoint)
        self._core = ClientCore(token, suite, target=self.target, trace=trace)
        self._loop = asyncio.get_running_loop()
        self._proto = ClientProtocol(self._core.conn, self._on_events, self._on_lost)
        self._proto.on_bytes = lambda: self._core.heard(self._loop.time())
        self._procs: dict[int, Process] = {}
        self._ready: asyncio.Future[ServerInfo] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._slots = Waiters()  # start()s waiting for the server's max_channels
        self._closed = Waiters()  # close() waiting for the server's CLOSE
        self._timer: asyncio.TimerHandle | None = None
        self.info: ServerInfo | None = None

    async def _open(self, timeout: float, limit: float | None = None) -> None:
        """Connect and handshake within `limit` seconds (default: `timeout`, the figure an
        expired deadline names)."""
        keep_heap()
        loop = self._loop
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
                    raise connect_failed(self.endpoint, exc) from None
                self._core.initiate()
                self._flush()
                self.info = await self._ready
        except TimeoutError:
            self._proto.abort()
            connected = self._proto.transport is not None
            received = self._core.conn.reply_received
            raise connect_timed_out(
                self.endpoint, timeout, connected=connected, received=received
            ) from None
        except BaseException:
            self._proto.abort()
            raise
        self._tick()

    # ---- driving the core --------------------------------------------------------------

    def _flush(self) -> None:
        self._proto.flush()

    async def _drain(self) -> None:
        try:
            await self._proto.drain()
        except RexecError:
            raise self._core.error or ConnectionLost("connection closed") from None

    def _on_events(self, events: list[Event]) -> None:
        core = self._core
        touched = core.handle(events, self._loop.time())
        self._flush()  # our answer to a CLOSE, credit for output taken
        self._wake(touched)
        if core.info is not None and not self._ready.done():
            self._ready.set_result(core.info)

    def _on_lost(self, error: RexecError | None) -> None:
        proto = self._proto
        if proto.os_error is not None:
            # A failed write ends an asyncio transport at once, unread bytes and all: a notice
            # sent before it is lost unless the server half-closed and read (as it does).
            reset = is_reset(proto.os_error)
            error = connection_broke(self.endpoint, proto.os_error)
        else:
            reset = False
        core = self._core
        self._wake(core.connection_lost(error, reset=reset))
        if not self._ready.done():
            assert core.error is not None
            self._ready.set_exception(core.error)
            self._ready.exception()  # retrieved: the opener may already have given up
        if not self._lost.done():
            self._lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self, touched: list[Command]) -> None:
        ended = False
        for cmd in touched:
            proc = self._procs.get(cmd.channel)
            if proc is not None:
                proc._changed.wake()
                if cmd.done:
                    del self._procs[cmd.channel]
                    ended = True
        if self._core.error is not None:
            self._slots.wake()
            self._closed.wake()
        elif ended:
            self._slots.wake(one=True)

    def _tick(self) -> None:
        """The keepalive clock: the core decides, we PING or drop the connection."""
        self._timer = None
        core = self._core
        if core.error is not None or self._proto.closed:
            return
        try:
            due = core.keepalive(self._loop.time())
        except ConnectionLost:
            self._wake(list(self._procs_commands()))
            self._proto.abort()
            return
        self._flush()
        if due != float("inf"):
            self._timer = self._loop.call_at(due, self._tick)

    def _procs_commands(self) -> list[Command]:
        return [proc._cmd for proc in self._procs.values()]

    # ---- public API ----------------------------------------------------------------------

    async def start(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pty: PtyRequest | None = None,
    ) -> Process:
        """Start a command (a str runs under /bin/sh -c, a sequence is an exact argv).

        `pty`: run it on a pseudo-terminal (`PtyRequest(term, rows, cols)`): its output is
        one stream (stdout), what you write is typed on the terminal, `resize()` resizes it.

        Returns at once unless the server's max_channels commands already run on this
        connection: then it waits for one to end instead of having the server refuse.
        """
        core = self._core
        while not core.can_start():
            await self._slots.wait()
        return self._opened(
            core.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, pty=pty)
        )

    def _opened(self, cmd: Command) -> Process:
        """A channel was queued (EXEC or XFER): send it, and route its events to a Process."""
        proc = Process(self, cmd)
        self._procs[cmd.channel] = proc
        self._flush()
        if len(self._core.commands) == 1:  # the first channel starts the keepalive clock
            if self._timer is not None:
                self._timer.cancel()
            self._tick()
        return proc

    async def run(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        stdout: Sink | None = None,
        stderr: Sink | None = None,
        check: bool = False,
    ) -> Result:
        """Run to completion. Output goes to the sinks as it arrives, else into the Result.

        Raises ExecError if it could not start, CommandFailed/CommandTimeout with check.
        """
        proc = await self.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin is not None)
        feeder = None if stdin is None else asyncio.ensure_future(_feed(proc, stdin))
        try:
            result = await proc.wait(stdout=stdout, stderr=stderr)
        except BaseException:  # cancelled, a sink's error: the command must not run on
            proc._abandon()
            raise
        finally:
            if feeder is not None:
                if not feeder.done():
                    feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, RexecError):
                    await feeder
        return result.check() if check else result

    async def put(
        self,
        local: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        remote: str,
        *,
        recursive: bool = False,
        preserve: bool = False,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        check: bool = True,
    ) -> TransferResult:
        """Copy local files (directories with `recursive`) to `remote` on the server, as scp.

        `remote` is relative to the remote user's home unless absolute; an existing directory
        there (or several sources, or a trailing `/`) receives each source under its basename.
        Every file is verified by SHA-256 at both ends and renamed into place only then.
        `preserve` keeps mode and mtime; `resume` continues partial files from their verified
        prefix. With `check`, raises TransferError when any file FAILED (after the rest ran).
        """
        opts = {"recursive": recursive, "preserve": preserve, "resume": resume}
        return await self._transfer("put", local, remote, check=check, progress=progress, **opts)

    async def get(
        self,
        remote: str | Sequence[str],
        local: str | os.PathLike[str],
        *,
        recursive: bool = False,
        preserve: bool = False,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        check: bool = True,
    ) -> TransferResult:
        """Copy remote files (directories with `recursive`) from the server to `local`, as scp.

        The same rules as put(), the other way round.
        """
        opts = {"recursive": recursive, "preserve": preserve, "resume": resume}
        return await self._transfer("get", remote, local, check=check, progress=progress, **opts)

    async def _transfer(
        self, direction: str, source: object, dest: object, *, check: bool, **opts: Any
    ) -> TransferResult:
        """Run a transfer to its end: the core decides, we wait and move bytes."""
        from rexec.client.xfercore import begin  # (not on `rexec run`'s import path)

        core = self._core
        xfer = begin(core, direction, source, dest, check=check, **opts)
        if isinstance(xfer, TransferResult):
            return xfer
        try:
            while not core.can_start():
                await self._slots.wait()
            proc = self._opened(xfer.start())  # its waiters wake when the channel changes
            while True:
                xfer.pump()
                self._flush()
                if xfer.done:
                    break
                await self._drain()
                await proc._until(xfer.ready)
        finally:
            xfer.close()
            self._flush()
        return xfer.result(check=check)

    async def close(self) -> None:
        """Say CLOSE, wait briefly for the server's (it ends what still runs), and disconnect."""
        core = self._core
        if not self._lost.done():
            core.close()
            self._flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    while core.error is None and not self._lost.done():
                        await self._closed.wait()
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


async def _feed(proc: Process, data: bytes) -> None:
    await proc.write(data)
    await proc.close_stdin()


class Connecting:
    """What `connect()` returns: await it for a Connection, or use it as `async with`."""

    def __init__(
        self,
        target: str,
        token: str | Token | None,
        token_file: str | None,
        connect_timeout: float | None,
        suite: Suite,
        trace: TraceFn | None,
        retry: int = 0,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        on_retry: RetryFn | None = None,
    ) -> None:
        Retry(retry, retry_delay, 0.0)  # bad values fail here, at the call
        self._args = (target, token, token_file, connect_timeout, suite, trace)
        self._retry = (retry, retry_delay, on_retry)
        self._conn: Connection | None = None
        self._core: ClientCore | None = None

    async def _make(self) -> Connection:
        target, token, token_file, connect_timeout = self._args[:4]
        retry, retry_delay, on_retry = self._retry
        retries = Retry(retry, retry_delay, time.monotonic())
        resolved = resolve_target(target, token=token, token_file=token_file)
        timeout = connect_timeout or resolved.connect_timeout
        while True:  # --retry: only connecting is tried again, no command has been sent yet
            try:
                return await self._attempt(
                    resolved.endpoint, resolved.token, resolved.name, timeout
                )
            except RexecError as exc:
                assert self._core is not None
                wait = retries.after(exc, self._core, time.monotonic(), jitter())
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, retries.done, wait)
                await asyncio.sleep(wait)

    async def _attempt(
        self, endpoint: Endpoint, token: Token, name: str, timeout: float
    ) -> Connection:
        """One attempt (for --retry): connect and authenticate within `timeout` seconds."""
        suite, trace = self._args[4], self._args[5]
        loop = asyncio.get_running_loop()
        attempts = ConnectAttempts(timeout, loop.time())
        while True:  # a busy server is tried again (ConnectAttempts decides)
            conn = Connection(endpoint, token, suite, trace, name)
            self._core = conn._core  # the attempt's core: did it send anything? (Retry.after)
            try:
                await conn._open(attempts.timeout, attempts.remaining(loop.time()))
                return conn
            except ConnectTimeout as exc:
                raise attempts.timed_out(exc) from None
            except ServerRefused as exc:
                delay = attempts.retry_delay(exc, loop.time())
                if delay is None:
                    raise
            await asyncio.sleep(delay)

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
    retry: int = 0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    on_retry: RetryFn | None = None,
) -> Connecting:
    """Connect and authenticate to TARGET (host[:port], unix:/path or a config alias).

    `retry=N`: up to N more attempts when connecting fails before any command was sent
    (refused, unreachable, timed out, busy; never a failed authentication), with backoff
    from `retry_delay` seconds (rexec.client.connecting.Retry); `on_retry(error, n, wait)` hears
    of each.
    """
    return Connecting(
        target, token, token_file, connect_timeout, suite, trace, retry, retry_delay, on_retry
    )
