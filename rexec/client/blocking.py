"""The selector driver: the sync API (`rexec.Client`, `Process`), used by `rexec run` and the shell.

It moves bytes between a non-blocking socket and the sans-I/O client core, and waits; what
the bytes mean is the core's business (rexec.client.core). No asyncio here: `rexec run` is
a process per command, and asyncio alone would cost it ~60 ms of imports. The socket is
non-blocking with our own output buffer, so the client never deadlocks by blocking in send()
while the server waits for us to read its output.

Nothing runs in the background: the socket is served whenever the application waits on this
client (iterating output, writing stdin, wait()); several processes may run at once, and
waiting on one serves them all. The server PINGs a client that has been silent for its
`keepalive` (30 s) while commands run, and drops it after as long again: a program that
starts a command and then neither waits on it nor reads it for a minute loses it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType

from rexec.address import Endpoint
from rexec.client.core import (
    CLOSE_WAIT,
    DEFAULT_RETRY_DELAY,
    Chunk,
    ClientCore,
    Command,
    ConnectAttempts,
    Retry,
    RetryFn,
    connect_failed,
    connect_timed_out,
    connection_broke,
    is_reset,
)
from rexec.client.target import resolve_target
from rexec.errors import ConnectionLost, LocalProtocolError, RexecError, ServerRefused
from rexec.heap import BULK, keep_heap
from rexec.protocol.connection import TraceFn
from rexec.protocol.events import Stream
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.pty import PtyRequest
from rexec.protocol.token import Token
from rexec.result import Result
from rexec.transfer import ProgressCallback, TransferResult

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path
if TYPE_CHECKING:
    from typing import Any

OUT_HIGH_WATER = 4 * MAX_PAYLOAD  # unsent bytes we buffer before writers (and stdin) wait
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s (close sends a reset)

Sink = Callable[[bytes | bytearray], None]  # chunks may be the buffers frames arrived in


def open_socket(endpoint: Endpoint, timeout: float, named: float | None = None) -> socket.socket:
    """Connect with a deadline; TCP_NODELAY because every frame is one complete write.
    `named`: the timeout an expired deadline names (default: timeout)."""
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
        named = timeout if named is None else named
        raise connect_timed_out(endpoint, named, connected=False) from None
    except OSError as exc:
        raise connect_failed(endpoint, exc) from None
    return sock


def jitter() -> float:
    """A random number in [0, 1) for retry backoff (`random` would cost start-up time)."""
    return int.from_bytes(os.urandom(2), "big") / 65536


class _StdinFeed:
    """Bytes, or a file descriptor read until EOF, going to one command's stdin."""

    __slots__ = ("cmd", "data", "fd")

    def __init__(self, cmd: Command, source: bytes | int) -> None:
        self.cmd = cmd
        self.fd = source if isinstance(source, int) else None
        self.data = memoryview(source) if isinstance(source, bytes) else None


class SocketDriver:
    """One connection's socket, selector and send buffer, driving a ClientCore."""

    def __init__(self, endpoint: Endpoint, core: ClientCore) -> None:
        self.endpoint = endpoint
        self.core = core
        self._sock: socket.socket | None = None
        self._out = bytearray()
        # poll, not epoll: a stdin feed may be a regular file, which epoll refuses
        self._sel: selectors.BaseSelector = selectors.PollSelector()
        self._sock_events = 0
        self._unwritable = False  # a send failed: the socket takes nothing more
        self._feeds: dict[int, _StdinFeed] = {}  # by channel
        self._feed_fds: set[int] = set()  # feeds' fds registered in the selector now
        self._keepalive_due = 0.0

    # ---- connection --------------------------------------------------------------------

    def connect(self, timeout: float, deadline: float | None = None) -> ServerInfo:
        """Open the socket and run the handshake, all within `timeout` seconds (or by
        `deadline`, a time.monotonic() value; `timeout` is then what an expiry names)."""
        if deadline is None:
            deadline = time.monotonic() + timeout
        self._sock = open_socket(self.endpoint, max(0.001, deadline - time.monotonic()), timeout)
        self._sock.setblocking(False)
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._sock_events = selectors.EVENT_READ
        core = self.core
        try:
            core.initiate()
            if not self.wait(lambda: core.info is not None, deadline):
                received = core.conn.reply_received
                raise connect_timed_out(self.endpoint, timeout, connected=True, received=received)
        except BaseException:
            self.abort()
            raise
        assert core.info is not None
        return core.info

    def wait(self, ready: Callable[[], bool], deadline: float | None = None) -> bool:
        """Serve the connection until ready() (True) or the deadline passes (False).

        Raises the connection's error if it ends first (ready() usually notices that itself:
        the commands it waits for end with the error).
        """
        core = self.core
        while not ready():
            if core.error is not None:
                self.flush()
                raise core.error
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now >= self._keepalive_due:
                self._keepalive_due = core.keepalive(now)
            timeout = self._keepalive_due - now
            if deadline is not None:
                timeout = min(timeout, deadline - now)
            self._step(None if timeout == math.inf else max(0.0, timeout))
        self.flush()
        return True

    def poll(self) -> None:
        """Serve the connection once without waiting."""
        if self._sock is not None and self.core.error is None:
            self._step(0.0)
            self.flush()

    def started(self) -> None:
        """A command was queued: send it, and let the keepalive clock see it at the next wait."""
        self._keepalive_due = 0.0
        self.flush()

    @property
    def backlog(self) -> int:
        """Bytes queued for the server that the socket has not taken yet (ours, and the
        stdin the core still holds: at most the server's window of it)."""
        return len(self._out) + self.core.conn.pending_data

    def _step(self, timeout: float | None) -> None:
        self.flush()
        self._arm_feeds()
        sock = self._sock
        for key, mask in self._sel.select(timeout):
            if key.fileobj is not sock:
                key.data()
            else:
                if mask & selectors.EVENT_WRITE:
                    self.flush()  # and pull the data that waited for room
                if mask & selectors.EVENT_READ:
                    self._read()

    def flush(self) -> None:
        """Send what the core queued, as far as the socket takes it now.

        Data is pulled from the core only while our buffer is under OUT_HIGH_WATER: the rest
        waits there, so a SIGNAL or PONG queued later overtakes it.
        """
        core = self.core
        if not self._out and not core.conn.has_queued:  # the common call: nothing to send
            return
        while True:
            data = core.data_to_send(max(0, OUT_HIGH_WATER - len(self._out)))
            if data:
                self._out += data
            if not self._out:
                return
            self._send()
            if self._out or self._unwritable or self._sock is None or not core.conn.has_pending:
                return  # the socket is full (we wait to write), gone, or has it all

    def _send(self) -> None:
        sock = self._sock
        if sock is None or self._unwritable:
            self._out.clear()
            return
        while self._out:
            try:
                sent = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._broken(exc, sending=True)
                return
            del self._out[:sent]
        self._set_sock_events()

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        core = self.core
        try:
            with core.get_buffer() as view:
                nbytes = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(exc)
            return
        if not nbytes:
            core.receive_eof()
        else:
            if nbytes >= BULK:
                keep_heap()  # a bulk stream: worth pinning the heap (once)
            core.buffer_updated(nbytes, time.monotonic())
        if core.error is not None:
            self._set_sock_events()  # nothing more to read; only our last words to send
        self.flush()

    def _broken(self, exc: OSError, *, sending: bool = False) -> None:
        """The socket failed; a failed send in the handshake leaves reading on (the core's
        send_failed: a refusal notice may be waiting)."""
        error = connection_broke(self.endpoint, exc)
        if sending:
            self.core.send_failed(error, reset=is_reset(exc))
        else:
            self.core.connection_lost(error, reset=is_reset(exc))
        self._out.clear()
        self._unwritable = True  # what the core still queues will never leave
        self._set_sock_events()

    def _set_sock_events(self) -> None:
        sock = self._sock
        if sock is None:
            return
        events = 0 if self.core.error is not None else selectors.EVENT_READ
        if self._out:
            events |= selectors.EVENT_WRITE
        if events != self._sock_events:
            if not self._sock_events:
                self._sel.register(sock, events)
            elif not events:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, events)
            self._sock_events = events

    # ---- local file descriptors --------------------------------------------------------

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def feed(self, cmd: Command, source: bytes | int) -> None:
        if cmd.channel in self._feeds:
            raise LocalProtocolError(f"stdin of {cmd.command!r} is already being fed")
        if not cmd.stdin_open:
            raise LocalProtocolError(f"stdin of {cmd.command!r} is closed or was not requested")
        self._feeds[cmd.channel] = _StdinFeed(cmd, source)
        self._pump_bytes()

    def _arm_feeds(self) -> None:
        """Read a feed's fd only while the server takes stdin and our buffer has room."""
        if not self._feeds:
            return
        self._pump_bytes()
        core = self.core
        for channel, feed in list(self._feeds.items()):
            if feed.cmd.done or not feed.cmd.stdin_open:
                self._drop_feed(channel)
                continue
            if feed.fd is None:
                continue
            want = self.backlog < OUT_HIGH_WATER and core.stdin_room(feed.cmd) > 0
            if want and feed.fd not in self._feed_fds:
                callback = functools.partial(self._read_feed, feed)
                self._sel.register(feed.fd, selectors.EVENT_READ, callback)
                self._feed_fds.add(feed.fd)
            elif not want and feed.fd in self._feed_fds:
                self._sel.unregister(feed.fd)
                self._feed_fds.discard(feed.fd)

    def _pump_bytes(self) -> None:
        """Queue in-memory feeds as far as windows and our buffer allow."""
        core = self.core
        for channel, feed in list(self._feeds.items()):
            data = feed.data
            if data is None or feed.cmd.done:
                continue
            while data and self.backlog < OUT_HIGH_WATER:
                n = core.write(feed.cmd, data)
                if not n:
                    break
                data = data[n:]
                self.flush()
            feed.data = data
            if not data:
                core.close_stdin(feed.cmd)
                self._drop_feed(channel)

    def _read_feed(self, feed: _StdinFeed) -> None:
        assert feed.fd is not None
        core = self.core
        room = min(core.stdin_room(feed.cmd), MAX_PAYLOAD)
        if not room:
            return
        try:
            data = os.read(feed.fd, room)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # an unreadable stdin ends like an empty one
        if len(data) >= BULK:
            keep_heap()
        if data:
            core.write(feed.cmd, data)
        else:
            core.close_stdin(feed.cmd)
            self._drop_feed(feed.cmd.channel)

    def _drop_feed(self, channel: int) -> None:
        feed = self._feeds.pop(channel)
        if feed.fd is not None and feed.fd in self._feed_fds:
            self._sel.unregister(feed.fd)
            self._feed_fds.discard(feed.fd)

    # ---- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Say CLOSE, wait briefly for the server's, and close the socket."""
        if self._sock is None:
            return
        core = self.core
        try:
            core.close()
            self.wait(lambda: core.error is not None, time.monotonic() + CLOSE_WAIT)
        except Exception:  # noqa: S110 - the connection is going away either way
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket now. Without the server's CLOSE, with a reset rather than a FIN,
        which would queue behind unsent stdin that a stalled server may never read."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            if not self.core.conn.close_received:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
            self._sel.close()
        if self.core.error is None:
            self.core.connection_lost(ConnectionLost("connection closed"))

    @property
    def closed(self) -> bool:
        return self._sock is None


class SyncOutputStream:
    """One output stream of a SyncProcess: `for chunk in proc.stdout`, read(), read_chunk()."""

    stream: Stream

    def __init__(self, proc: SyncProcess, stream: Stream) -> None:
        self._proc = proc
        self.stream = stream

    def read_chunk(self) -> bytes | bytearray:
        """The next chunk, or b"" at the end of the stream (waits for it)."""
        return self._proc._next(self.stream)[1]

    def read(self) -> bytes:
        """Everything until the end of the stream."""
        return b"".join(iter(self))

    def __iter__(self) -> Iterator[bytes | bytearray]:
        while chunk := self.read_chunk():
            yield chunk


class SyncProcess:
    """A remote command on a sync Client (from `Client.start`): the sync twin of `Process`.

    Iterate it for `(Stream, bytes)` chunks in arrival order, or read `stdout`/`stderr`; read
    both (or iterate the process, or wait()): output not taken holds the command back.
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
    to N more times when it fails before any command was sent (see rexec.client.core.Retry);
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
        while True:  # a busy server is tried again (the core's ConnectAttempts decides)
            core = ClientCore(token, suite, target=self.target, trace=trace)
            self._driver = SocketDriver(self.endpoint, core)
            try:
                self.info = self._driver.connect(attempts.timeout, attempts.deadline)
                return
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
        if stdin is not None:
            proc.feed(stdin)
        result = proc.wait(stdout=stdout, stderr=stderr)
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
