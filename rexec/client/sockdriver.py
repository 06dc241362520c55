"""The selector driver under the sync API: one non-blocking socket, the sans-I/O client core
(rexec.client.core), a selector, and nothing else. It moves bytes and waits; what the bytes
mean is the core's business. No asyncio here: `rexec run` is a process per command, and
asyncio alone would cost it ~60 ms of imports. The socket is non-blocking with our own output
buffer, so the client never deadlocks by blocking in send() while the server waits for us to
read its output. rexec.client.blocking builds the public sync API (`rexec.Client`) on it.
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
from collections.abc import Callable

from rexec.address import Endpoint
from rexec.client.connecting import connect_failed, connect_timed_out
from rexec.client.core import CLOSE_WAIT, ClientCore, Command, connection_broke, is_reset
from rexec.errors import ConnectionLost, LocalProtocolError
from rexec.heap import BULK, keep_heap
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ServerInfo

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path
if TYPE_CHECKING:
    pass

OUT_HIGH_WATER = 4 * MAX_PAYLOAD  # unsent bytes we buffer before writers (and stdin) wait
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s (close sends a reset)


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
