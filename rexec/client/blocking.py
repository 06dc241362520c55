"""The sync API (`rexec.Client`, `SyncProcess`), used by `rexec run`, the shell and `rexec cp`.

It runs on the selector driver (rexec.client.sockdriver), which moves the bytes, over the
sans-I/O client core (rexec.client.core), which says what they mean; this module only shapes
them into the public calls (start, run, put, get) and waits.

Nothing runs in the background: the socket is served whenever the application waits on this
client (iterating output, writing stdin, wait()); several processes may run at once, and
waiting on one serves them all. The server PINGs a client that has been silent for its
`keepalive` (30 s) while commands run, and drops it after as long again: a program that
starts a command and then neither waits on it nor reads it for a minute loses it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType

from rexec.address import Endpoint
from rexec.client.connecting import DEFAULT_RETRY_DELAY, ConnectAttempts, Retry, RetryFn
from rexec.client.core import Chunk, ClientCore, Command
from rexec.client.sockdriver import OUT_HIGH_WATER, SocketDriver, jitter
from rexec.client.target import resolve_target
from rexec.errors import ConnectTimeout, RexecError, ServerRefused
from rexec.protocol.connection import TraceFn
from rexec.protocol.events import Stream
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.pty import PtyRequest
from rexec.protocol.token import Token
from rexec.result import Result
from rexec.transfer import ProgressCallback, TransferResult

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path
if TYPE_CHECKING:
    from typing import Any

Sink = Callable[[bytes | bytearray], None]  # chunks may be the buffers frames arrived in


class SyncOutputStream:
    """One output stream of a SyncProcess: `for chunk in proc.stdout`, read(), read_chunk()."""

    stream: Stream

    def __init__(self, proc: SyncProcess, stream: Stream) -> None:
        self._proc = proc
        self.stream = stream

    def read_chunk(self) -> bytes | bytearray:
        """The next chunk (a bytearray: the buffer its frame was decrypted into, not copied),
        or b"" at the end of the stream (waits for it)."""
        return self._proc._next(self.stream)[1]

    def read(self) -> bytes:
        """Everything until the end of the stream."""
        return b"".join(iter(self))

    def __iter__(self) -> Iterator[bytes | bytearray]:
        while chunk := self.read_chunk():
            yield chunk


class SyncProcess:
    """A remote command on a sync Client (from `Client.start`): the sync twin of `Process`.

    Iterate it for `(Stream, bytearray)` chunks in arrival order, or read `stdout`/`stderr`;
    read both (or iterate the process, or wait()): output not taken holds the command back.
    """

    channel: int
    command: str | tuple[str, ...]
    stdout: SyncOutputStream
    stderr: SyncOutputStream

    def __init__(self, driver: SocketDriver, cmd: Command) -> None:
        self._driver = driver
        self._core = driver.core
        self._cmd = cmd
        self.channel = cmd.channel
        self.command = cmd.command
        self.stdout = SyncOutputStream(self, Stream.STDOUT)
        self.stderr = SyncOutputStream(self, Stream.STDERR)

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once the command has ended, else None."""
        return self._cmd.status

    def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin (start it with stdin=True); waits while the server's
        window is shut. Once the command has ended, its stdin is gone: the bytes are dropped."""
        core, cmd, driver = self._core, self._cmd, self._driver
        view = memoryview(data)
        while view:
            if driver.backlog >= OUT_HIGH_WATER:
                driver.wait(lambda: cmd.done or driver.backlog < OUT_HIGH_WATER)
            n = core.write(cmd, view)  # raises if stdin is closed; drops all once cmd ended
            if n:
                view = view[n:]
                driver.flush()
            else:
                driver.wait(lambda: cmd.done or core.stdin_room(cmd) > 0)

    def feed(self, source: bytes | int) -> None:
        """Send `source` (bytes, or a file descriptor read until EOF) to stdin, then close it,
        in the background: whenever this client waits, without blocking the caller now."""
        self._driver.feed(self._cmd, source)

    def close_stdin(self) -> None:
        """EOF on the command's stdin."""
        self._core.close_stdin(self._cmd)
        self._driver.flush()

    def signal(self, signum: int) -> None:
        """Deliver a signal to the command's whole process group (if it still runs)."""
        self._core.signal(self._cmd, signum)
        self._driver.flush()

    def resize(self, rows: int, cols: int) -> None:
        """Tell a command started with `pty=` its terminal's new size (it gets SIGWINCH)."""
        self._core.resize(self._cmd, rows, cols)
        self._driver.flush()

    def _abandon(self) -> None:
        """run() gave up on it: the core kills it (ClientCore.abandon), sent as far as we can."""
        self._core.abandon(self._cmd)
        with contextlib.suppress(RexecError, OSError):
            self._driver.flush()

    def wait(self, *, stdout: Sink | None = None, stderr: Sink | None = None) -> Result:
        """Wait for the exit; returns the Result, or raises why there is none.

        Output goes to the sinks as it arrives; a stream without one is collected into the
        Result (with whatever of it was not taken before).
        """
        core, cmd = self._core, self._cmd
        sinks = (stdout, stderr)
        for stream, sink in zip(Stream, sinks, strict=True):
            if sink is None:
                core.collect(cmd, stream)
        self._driver.flush()
        if stdout is not None or stderr is not None:
            which = None if stdout and stderr else Stream.STDOUT if stdout else Stream.STDERR
            while True:
                stream, data = self._next(which)
                if not data:
                    break
                sink = sinks[stream - 1]
                assert sink is not None
                sink(data)
        else:
            self._driver.wait(lambda: cmd.done)
        return core.result(cmd)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            stream, data = self._next(None)
            if not data:
                return
            yield stream, data

    def _next(self, stream: Stream | None) -> Chunk:
        core, cmd = self._core, self._cmd
        while (item := core.take(cmd, stream)) is None:
            self._driver.wait(lambda: cmd.done or cmd.has_output(stream))
        self._driver.flush()  # output taken may have opened the server's window
        return item


class Client:
    """Synchronous API: `with rexec.Client("host", token=...) as c: c.run("uname -a")`.

    One authenticated connection; commands run on it one after another, or several at once
    with `start()` (waiting on any of them serves them all). `retry=N` tries connecting up
    to N more times when it fails before any command was sent (see rexec.client.connecting.Retry);
    `on_retry(error, n, wait)` hears of each retry.
    """

    target: str  # as the caller named it (an alias, or an address)
    endpoint: Endpoint
    info: ServerInfo  # what the server said about itself in the handshake

    def __init__(
        self,
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
    ) -> None:
        retries = Retry(retry, retry_delay, time.monotonic())
        resolved = resolve_target(target, token=token, token_file=token_file)
        self.target = resolved.name
        self.endpoint = resolved.endpoint
        timeout = connect_timeout or resolved.connect_timeout
        while True:  # --retry: only connecting is tried again, no command has been sent yet
            try:
                self._connect(resolved.token, suite, trace, timeout)
                return
            except RexecError as exc:
                wait = retries.after(exc, self._driver.core, time.monotonic(), jitter())
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, retries.done, wait)
                time.sleep(wait)

    def _connect(self, token: Token, suite: Suite, trace: TraceFn | None, timeout: float) -> None:
        """One attempt (for --retry): connect and authenticate within `timeout` seconds."""
        attempts = ConnectAttempts(timeout, time.monotonic())
        while True:  # a busy server is tried again (ConnectAttempts decides)
            core = ClientCore(token, suite, target=self.target, trace=trace)
            self._driver = SocketDriver(self.endpoint, core)
            try:
                self.info = self._driver.connect(attempts.timeout, attempts.deadline)
                return
            except ConnectTimeout as exc:
                raise attempts.timed_out(exc) from None
            except ServerRefused as exc:
                delay = attempts.retry_delay(exc, time.monotonic())
                if delay is None:
                    raise
            time.sleep(delay)

    def start(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pty: PtyRequest | None = None,
    ) -> SyncProcess:
        """Start a command (a str runs under /bin/sh -c, a sequence is an exact argv).

        `pty`: run it on a pseudo-terminal (`PtyRequest(term, rows, cols)`): its output is
        one stream (stdout), what you write is typed on the terminal, `resize()` resizes it.

        Returns at once unless the server's max_channels commands already run on this
        connection: then it waits for one to end instead of having the server refuse.
        """
        core = self._driver.core
        self._driver.wait(core.can_start)
        cmd = core.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, pty=pty)
        self._driver.started()
        return SyncProcess(self._driver, cmd)

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
        check: bool = False,
    ) -> Result:
        """Run to completion. Output goes to the sinks as it arrives, else into the Result.

        stdin: bytes, a file descriptor to stream until EOF, or None (EOF at once).
        Raises ExecError if it could not start, CommandFailed/CommandTimeout with check.
        """
        if isinstance(stdin, bool):
            raise TypeError("stdin must be bytes, a file descriptor or None")
        proc = self.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin is not None)
        try:
            if stdin is not None:
                proc.feed(stdin)
            result = proc.wait(stdout=stdout, stderr=stderr)
        except BaseException:  # Ctrl-C, a sink's error: the command must not run on
            proc._abandon()
            raise
        return result.check() if check else result

    def put(
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
        return self._transfer("put", local, remote, check=check, progress=progress, **opts)

    def get(
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
        return self._transfer("get", remote, local, check=check, progress=progress, **opts)

    def _transfer(
        self, direction: str, source: object, dest: object, *, check: bool, **opts: Any
    ) -> TransferResult:
        """Run a transfer to its end: the core decides, we wait and move bytes."""
        from rexec.client.xfercore import begin  # (not on `rexec run`'s import path)

        driver = self._driver
        xfer = begin(driver.core, direction, source, dest, check=check, **opts)
        if isinstance(xfer, TransferResult):
            return xfer
        try:
            driver.wait(driver.core.can_start)
            xfer.start()
            driver.started()
            while True:
                xfer.pump()
                driver.flush()
                if xfer.done:
                    break
                driver.wait(xfer.ready)
        finally:
            xfer.close()
            driver.flush()
        return xfer.result(check=check)

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        """Call `callback()` whenever `fd` is readable while this client waits (say, a signal
        wake-up pipe: `rexec run` forwards Ctrl-C this way). An exception it raises ends the
        wait and reaches the waiter."""
        self._driver.watch(fd, callback)

    def unwatch(self, fd: int) -> None:
        self._driver.unwatch(fd)

    def check_alive(self) -> str | None:
        """Without blocking: None while the connection is usable, else why it is not.

        Lets an interactive front end notice a server's idle timeout or shutdown before the
        user's next command goes into a closed connection.
        """
        driver = self._driver
        with contextlib.suppress(Exception):
            driver.poll()
        error = driver.core.error
        if error is None and driver.closed:
            return "connection closed"
        return None if error is None else str(error)

    def close(self) -> None:
        """Say CLOSE, wait briefly for the server's (it ends what still runs), and disconnect."""
        self._driver.close()

    def abort(self) -> None:
        """Disconnect now, without the CLOSE exchange; the server kills what still runs."""
        self._driver.abort()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
