"""asyncio glue: bytes between a socket and a sans-I/O Connection, for both ends.

Reads never pause: flow control is the protocol's (per-channel windows), so a peer that
sends too much breaks the protocol instead of growing our memory, and its FIN, PING or
SIGNAL is seen at once whatever else is queued.

Writes: control frames always go to the socket at once; data frames are pulled from the
connection (and only then encrypted) while the write buffer is under its high-water mark.
`drain()` waits until the data queued so far has left the connection and the buffer is
below that mark: that is how the exec layer's pipe reading is paused for a slow socket.
Data goes into the buffer only up to the mark (plus the one frame that crosses it), so a
peer that leaves more than MAX_BACKLOG unread on top of that is leaving control frames
unread (PINGs whose PONGs it never reads) and is dropped: the one thing it could
otherwise grow.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from rexec.errors import AuthError, ConnectionLost, ProtocolError, RexecError, TruncatedError
from rexec.protocol.connection import Connection
from rexec.protocol.events import Event

# Socket write buffer watermarks: the most data a slow peer can make us hold per connection.
# 4 MiB/1 MiB measured ~7% faster streaming than 1 MiB/256 KiB (fewer pause/resume cycles).
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024
DATA_BATCH = 1024 * 1024  # data pulled (encrypted) per write while the buffer has room
MAX_BACKLOG = 512 * 1024  # control bytes a peer may leave unread beyond WRITE_HIGH
CLOSE_LINGER = 10.0  # seconds a closing connection may spend flushing to a peer that stalls

E = TypeVar("E", bound=BaseException)
EventHandler = Callable[[list[Event]], None]
LostHandler = Callable[[RexecError | None], None]


def _no_events(events: list[Event]) -> None:
    """The handler of a connection that is gone."""


def _no_loss(error: RexecError | None) -> None:
    """The loss handler once the loss is reported."""


def _untraced(exc: E) -> E:
    """`exc` without its traceback, nor those of the errors it chains to. An error kept past
    its handling keeps the frames it was raised through: they hold the protocol and the
    connection that keep the error (a cycle), and asyncio's reading frame a view of our
    receive buffer, so up to 1 MiB per connection would wait for the next full gc."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


class FramedProtocol(asyncio.BufferedProtocol):
    """One socket bound to one Connection. Errors end the connection and reach `on_lost`.

    A BufferedProtocol: asyncio receives straight into the connection's frame buffer, so
    the kernel's copy is the only one before decryption.
    """

    def __init__(self, conn: Connection, on_events: EventHandler, on_lost: LostHandler) -> None:
        self.conn = conn
        self._on_events = on_events
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._error: RexecError | None = None
        self.closed = False
        self.peer = "?"
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_rx = 0.0  # loop time of the last bytes received (liveness)
        self.dropped: str | None = None  # why we dropped the peer, if we did

    # ---- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.last_rx = self._loop.time()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        else:
            self.peer = "unix"
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.conn.get_buffer()
        except RexecError:  # a poisoned connection: give asyncio somewhere to put bytes
            return memoryview(bytearray(65536))

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or self._error is not None:
            return
        if self._loop is not None:
            self.last_rx = self._loop.time()
        try:
            events = self.conn.buffer_updated(nbytes)
        except (ProtocolError, RexecError) as exc:
            self.fail(exc)
            return
        self.flush()
        if events:
            self._on_events(events)

    def eof_received(self) -> bool:
        try:
            self.conn.receive_eof()
        except TruncatedError as exc:
            self._error = _untraced(exc)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            _untraced(exc)
        if self._error is None and exc is not None:
            self._error = ConnectionLost(f"connection lost: {exc}")
        if self._error is None and not self.conn.close_received:
            self._error = TruncatedError("connection closed without CLOSE")
        self._wake_drainers()
        # The handlers are the owner's bound methods and the owner holds us: drop them (and
        # the kept error's frames), so that refcounting alone frees a finished connection.
        on_lost, self._on_lost, self._on_events = self._on_lost, _no_loss, _no_events
        try:
            on_lost(self._error)
        finally:
            if self._error is not None:
                _untraced(self._error)
            self.conn.release()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.flush()  # pull the data that waited for room

    # ---- for the owner -------------------------------------------------------------

    def flush(self) -> None:
        """Write what the connection has queued: all control frames, and data while the
        write buffer has room. Drops a peer that leaves too much unread."""
        transport = self.transport
        if transport is None or self.closed:
            return
        conn = self.conn
        if not conn.has_queued:  # the common call (after each chunk taken): nothing to do
            if not self._paused and self._drain_waiters:
                self._wake_drainers()
            return
        while True:
            # data only up to the high-water mark (at least one frame, so that a buffer
            # exactly at the mark still gets paused): it never crowds out MAX_BACKLOG
            room = WRITE_HIGH - transport.get_write_buffer_size()
            bufs = conn.buffers_to_send(0 if self._paused else min(DATA_BATCH, max(1, room)))
            for buf in bufs:
                transport.write(buf)
            if not bufs or self._paused or not conn.has_pending:
                break
        unsent = transport.get_write_buffer_size()
        if unsent > WRITE_HIGH + MAX_BACKLOG:
            self.drop(f"peer does not read what we send ({unsent} bytes queued for it)")
            return
        if not self._paused and not conn.has_pending:
            self._wake_drainers()

    async def drain(self) -> None:
        """Wait until everything queued has left the connection and the socket's write
        buffer is under its high-water mark."""
        while True:
            if self.closed:
                raise self._error or ConnectionLost("connection closed")
            if not self._paused and not self.conn.has_pending:
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def fail(self, exc: RexecError) -> None:
        """End the connection because of `exc` (a protocol or auth error).

        A peer that proved its identity and then broke the protocol is told why (ERROR +
        CLOSE); one that never authenticated gets nothing but the closed socket.
        """
        self._error = _untraced(exc)
        if (
            isinstance(exc, ProtocolError)
            and not isinstance(exc, AuthError)
            and getattr(self.conn, "authenticated", True)
        ):
            self.conn.farewell(exc.code, str(exc))
        self.flush()
        self.close()

    def drop(self, reason: str) -> None:
        """Abort the connection for `reason` (the owner logs it from on_lost)."""
        if self.closed:
            return
        self.dropped = reason
        self._error = ConnectionLost(reason)
        self.abort()

    def close(self) -> None:
        """Close after the write buffer is flushed; abort if that takes CLOSE_LINGER."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            asyncio.get_running_loop().call_later(CLOSE_LINGER, self._linger_expired)

    def _linger_expired(self) -> None:
        if not self.closed:
            self.drop(f"peer did not take our last {CLOSE_LINGER:g}s of output")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
