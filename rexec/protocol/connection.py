"""What both roles share: explicit states, frame I/O, per-channel flow control, close rules.

States (docs/PROTOCOL.md section 12): the connection's ConnState and each channel's
ChannelState move only through their transition tables (rexec.protocol.states), applied
here, so what a state allows is decided in one place.

Output: control frames are encrypted when they are queued. Data frames (STDIN, STDOUT,
STDERR) wait, unencrypted, in a pending queue and are encrypted only when the driver pulls
bytes (`data_to_send(limit)`), after every control frame queued so far. So a SIGNAL, PONG or
CREDIT never waits behind data the socket cannot take yet, and the wire order is still the
nonce order. A frame that ends something its data must precede (EXIT, STDIN_EOF, CLOSE)
joins the pending queue when data is pending before it.

Flow control: every channel has a window per direction. We may send only as many data bytes
as the peer granted (`send_room`); we grant more (CREDIT) as the application consumes what
arrived, once half the window is consumed. A peer that sends beyond its window breaks the
protocol. A protocol error poisons the connection: every later call raises it again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType

from rexec.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from rexec.protocol import messages as m
from rexec.protocol.events import (
    CloseReceived,
    CreditReceived,
    ErrorReceived,
    Event,
    PongReceived,
)
from rexec.protocol.frames import (
    HEADROOM,
    INNER,
    INNER_LEN,
    LENGTH,
    MAX_CHANNEL,
    MAX_PAYLOAD,
    FrameBuffer,
    FrameType,
    payload_buffer,
)
from rexec.protocol.noise import TAGLEN, CipherState
from rexec.protocol.states import (
    CHANNEL_TRANSITIONS,
    CONN_TRANSITIONS,
    ChannelEvent,
    ChannelState,
    ConnEvent,
    ConnState,
)

# direction ("send"/"recv"), frame type, channel, payload length
TraceFn = Callable[[str, FrameType, int, int], None]

DATA_FRAMES = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR})
_SMALL = 64 * 1024  # frames up to this size are joined into one write; bigger ones stay apart
_FRAME_TYPES = {int(t): t for t in FrameType}

_S = ConnState
# States in which frames may be sent (the server may PING before AUTH; it has no channels).
_MAY_SEND = frozenset({_S.AUTHENTICATING, _S.OPEN, _S.CLOSE_RECEIVED, _S.PEER_ENDED})
_MAY_CLOSE = frozenset(state for state, event in CONN_TRANSITIONS if event is ConnEvent.SEND_CLOSE)


# ---- a channel --------------------------------------------------------------------------


class Channel:
    """One open channel: its state and both windows, as this end sees them.

    send_room: data bytes we may still send (the client's stdin, the server's output).
    recv_room: data bytes the peer may still send us before our next CREDIT.
    recv_window: the window we grant; CREDIT goes out once half of it is consumed.
    consumed: bytes the application consumed that no CREDIT has returned yet.
    """

    __slots__ = ("_state", "consumed", "number", "pending", "recv_room", "recv_window", "send_room")

    def __init__(self, number: int, state: ChannelState, send_room: int, recv_window: int) -> None:
        self.number = number
        self._state = state
        self.send_room = send_room
        self.recv_room = recv_window
        self.recv_window = recv_window
        self.consumed = 0
        self.pending = 0  # our frames of this channel in the pending queue

    @property
    def state(self) -> ChannelState:
        """Read-only: only the connection moves it, through CHANNEL_TRANSITIONS."""
        return self._state

    @property
    def stdin_open(self) -> bool:
        return self._state is ChannelState.STDIN_OPEN

    def __repr__(self) -> str:
        return (
            f"Channel({self.number}, {self.state.name}, send_room={self.send_room}, "
            f"recv_room={self.recv_room})"
        )


# ---- the connection ---------------------------------------------------------------------


class Connection:
    """Base of ClientConnection and ServerConnection (never used directly)."""

    role = "?"

    def __init__(self, buf: FrameBuffer, trace: TraceFn | None = None) -> None:
        """`buf` is set up for the role's first handshake message; it serves all along."""
        self._out: list[bytes | bytearray] = []  # encrypted, in nonce order
        self._pending: deque[tuple[FrameType, Channel | None, bytearray]] = deque()
        self._pending_bytes = 0
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._buf = buf
        self._error: ProtocolError | None = None
        self._trace = trace
        self._state = ConnState.HANDSHAKE
        self._channels: dict[int, Channel] = {}
        self.channels: Mapping[int, Channel] = MappingProxyType(self._channels)
        self.last_channel = 0
        self._eof = False  # facts behind the compatibility properties below
        self._peer_closed = False

    # ---- states --------------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        return self._state

    def _to(self, event: ConnEvent) -> None:
        new = CONN_TRANSITIONS.get((self._state, event))
        if new is None:
            raise LocalProtocolError(f"{event.name} is not allowed in state {self._state.name}")
        self._state = new

    def _channel_to(self, ch: Channel, event: ChannelEvent) -> None:
        new = CHANNEL_TRANSITIONS.get((ch.state, event))
        if new is None:
            raise LocalProtocolError(
                f"{event.name} is not allowed on channel {ch.number} in state {ch.state.name}"
            )
        ch._state = new
        if new is ChannelState.CLOSED:
            del self._channels[ch.number]

    def channel_state(self, channel: int) -> ChannelState:
        ch = self._channels.get(channel)
        if ch is not None:
            return ch.state
        return ChannelState.CLOSED if 1 <= channel <= self.last_channel else ChannelState.UNUSED

    @property
    def may_send(self) -> bool:
        """Frames may be queued now (keys agreed, no CLOSE sent, not poisoned)."""
        return self._state in _MAY_SEND and self._error is None

    @property
    def handshake_done(self) -> bool:
        return self._send is not None

    @property
    def close_sent(self) -> bool:
        return self._state in (_S.CLOSE_SENT, _S.CLOSED, _S.DONE)

    @property
    def close_received(self) -> bool:
        """The peer's CLOSE arrived (whatever happened since)."""
        return self._peer_closed

    @property
    def eof_received(self) -> bool:
        return self._eof

    # ---- output --------------------------------------------------------------------

    @property
    def pending_data(self) -> int:
        """Payload bytes of data frames queued and not yet pulled by data_to_send()."""
        return self._pending_bytes

    @property
    def has_queued(self) -> bool:
        """Anything to send: frames sealed and not yet taken, or pending data frames."""
        return bool(self._out) or bool(self._pending)

    @property
    def has_pending(self) -> bool:
        """Frames wait in the pending queue (data, and what must follow it)."""
        return bool(self._pending)

    def buffers_to_send(self, limit: int | None = None) -> list[bytes | bytearray]:
        """Queued bytes in wire order, as a few buffers (small frames joined, big ones apart).

        Every control frame comes out; data frames only while the total is under `limit`
        (None: all of them). Writing each buffer in turn keeps the wire order.
        """
        self._pull(limit)
        out, self._out = self._out, []
        if len(out) <= 1:
            return out
        merged: list[bytes | bytearray] = []
        run: list[bytes | bytearray] = []
        for buf in out:
            if len(buf) > _SMALL:
                if run:
                    merged.append(run[0] if len(run) == 1 else b"".join(run))
                    run = []
                merged.append(buf)
            else:
                run.append(buf)
        if run:
            merged.append(run[0] if len(run) == 1 else b"".join(run))
        return merged

    def data_to_send(self, limit: int | None = None) -> bytes | bytearray:
        """As buffers_to_send, joined into one buffer."""
        self._pull(limit)
        out, self._out = self._out, []
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _pull(self, limit: int | None) -> None:
        """Encrypt pending data frames, oldest first, while under `limit` bytes of output."""
        pending = self._pending
        if not pending:
            return
        total = sum(len(b) for b in self._out) if limit is not None else 0
        while pending and (limit is None or total < limit):
            # sealed before it leaves the queue: an exception between the steps (Ctrl-C's
            # KeyboardInterrupt can land on any line) costs the peer a nonce, which it
            # refuses; a frame popped and never sealed would leave a silent hole in the stream
            ftype, ch, plain = pending[0]
            frame = self._seal(ftype, 0 if ch is None else ch.number, plain)
            pending.popleft()
            if ftype in DATA_FRAMES:
                self._pending_bytes -= len(plain) - HEADROOM
            if ch is not None:
                ch.pending -= 1
            self._out.append(frame)
            total += len(frame)

    def _seal(self, ftype: FrameType, channel: int, plain: bytearray) -> bytearray:
        """Frame `plain` (HEADROOM free bytes, then the payload): header in place, encrypt."""
        assert self._send is not None
        INNER.pack_into(plain, 0, ftype, 0, 0, channel)
        size = len(plain) + TAGLEN
        frame = bytearray(4 + size)  # length prefix and ciphertext: one buffer, one write
        LENGTH.pack_into(frame, 0, size)
        with memoryview(frame) as view:
            self._send.encrypt_into(b"", plain, view[4:])
        if self._trace is not None:
            self._trace("send", ftype, channel, len(plain) - HEADROOM)
        return frame

    def _check_send(self, ftype: FrameType) -> None:
        if self._error is not None:
            raise self._error
        if self._send is None:
            raise LocalProtocolError(f"cannot send {ftype.name} before the handshake is done")
        if self._state not in _MAY_SEND:
            raise LocalProtocolError(f"cannot send {ftype.name} in state {self._state.name}")

    def _queue_frame(
        self,
        ftype: FrameType,
        channel: int,
        payload: bytes = b"",
        *,
        ordered: Channel | None = None,
    ) -> None:
        """Queue a control frame. With `ordered`, it must follow that channel's pending data
        (EXIT, STDIN_EOF): it joins the pending queue if any is there."""
        self._check_send(ftype)
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{ftype.name} payload of {len(payload)} bytes is too big")
        self._put(ftype, channel, payload, ordered)

    def _put(self, ftype: FrameType, channel: int, payload: bytes, ordered: Channel | None) -> None:
        if ordered is not None and ordered.pending:
            ordered.pending += 1
            self._pending.append((ftype, ordered, payload_buffer(payload)))
        elif ftype is FrameType.CLOSE and self._pending:
            self._pending.append((ftype, None, payload_buffer(payload)))
        else:
            self._out.append(self._seal(ftype, channel, payload_buffer(payload)))

    def _queue_data(
        self, ftype: FrameType, ch: Channel, data: bytes | bytearray | memoryview
    ) -> None:
        """Queue data frames (split at MAX_PAYLOAD), charging them to the channel's window."""
        self._check_send(ftype)
        size = len(data)
        if not size:
            return
        if size > ch.send_room:
            raise LocalProtocolError(
                f"{ftype.name} of {size} bytes exceeds channel {ch.number}'s window "
                f"({ch.send_room} bytes of room)"
            )
        ch.send_room -= size
        if size <= MAX_PAYLOAD:
            self._pend(ftype, ch, payload_buffer(data))
            return
        with memoryview(data) as view:
            for off in range(0, size, MAX_PAYLOAD):
                self._pend(ftype, ch, payload_buffer(view[off : off + MAX_PAYLOAD]))

    def _queue_data_buffer(self, ftype: FrameType, ch: Channel, buf: bytearray) -> None:
        """As _queue_data for a payload already behind HEADROOM bytes (no copy): the buffer
        is ours from now on."""
        self._check_send(ftype)
        size = len(buf) - HEADROOM
        if not 0 <= size <= MAX_PAYLOAD:
            raise LocalProtocolError(f"{ftype.name} buffer of {len(buf)} bytes is not a payload")
        if size > ch.send_room:
            raise LocalProtocolError(
                f"{ftype.name} of {size} bytes exceeds channel {ch.number}'s window "
                f"({ch.send_room} bytes of room)"
            )
        ch.send_room -= size
        self._pend(ftype, ch, buf)

    def _pend(self, ftype: FrameType, ch: Channel, plain: bytearray) -> None:
        ch.pending += 1
        self._pending_bytes += len(plain) - HEADROOM
        self._pending.append((ftype, ch, plain))

    def send_room(self, channel: int) -> int:
        """Data bytes we may send on `channel` now (0 for a channel that is not open)."""
        ch = self._channels.get(channel)
        return 0 if ch is None else ch.send_room

    def _consumed(self, channel: int, nbytes: int) -> None:
        """The application took `nbytes` of what the peer sent on `channel`: grant them back
        once half the window is consumed (fewer, larger CREDITs, as SSH does)."""
        ch = self._channels.get(channel)
        if ch is None or nbytes <= 0:
            return  # the channel has ended: nothing more will come on it
        ch.consumed += nbytes
        if ch.consumed >= max(1, ch.recv_window // 2) and self._state in _MAY_SEND:
            grant = min(ch.consumed, m.MAX_WINDOW - ch.recv_room)
            if grant > 0:
                self._queue_frame(FrameType.CREDIT, ch.number, m.pack_credit(grant))
                ch.recv_room += grant
                ch.consumed -= grant

    def send_ping(self, payload: bytes = b"") -> None:
        if len(payload) > m.MAX_PING:
            raise LocalProtocolError(f"PING payload is limited to {m.MAX_PING} bytes")
        self._queue_frame(FrameType.PING, 0, payload)

    def send_error(self, channel: int, code: int, message: str) -> None:
        self._queue_frame(FrameType.ERROR, channel, m.pack_error(code, message))

    def send_close(self) -> None:
        """Say we will send nothing more (after any data already queued); idempotent."""
        if self._state in _MAY_CLOSE and self._error is None:
            self._queue_frame(FrameType.CLOSE, 0)
            self._to(ConnEvent.SEND_CLOSE)

    def farewell(self, code: int, message: str) -> None:
        """Queue a last ERROR (channel 0) and CLOSE, even after the peer broke the protocol.

        Our sending direction is unaffected by the peer's bad bytes, so we can still say why
        we are closing. Does nothing before the handshake or after CLOSE.
        """
        if self._send is None or self._state not in _MAY_CLOSE:
            return
        self._put(FrameType.ERROR, 0, m.pack_error(code, message), None)
        self._put(FrameType.CLOSE, 0, b"", None)
        self._to(ConnEvent.SEND_CLOSE)

    def release(self) -> None:
        """The stream is gone: free the receive buffer and whatever waits to be sent."""
        self._buf.release()
        self._pending.clear()
        self._pending_bytes = 0
        self._out.clear()

    # ---- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete.

        Raises a ProtocolError subclass for any bad byte; the connection is then dead.
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise LocalProtocolError("receive_data after receive_eof")
        if data:
            self._buf.feed(data)
        return self._run_process()

    def get_buffer(self) -> memoryview:
        """Zero-copy input: receive into this view, then call buffer_updated(n)."""
        if self._error is not None:
            raise self._error
        return self._buf.get_buffer()

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """`nbytes` were received into the last get_buffer() view; as receive_data."""
        if self._error is not None:
            raise self._error
        self._buf.buffer_updated(nbytes)
        return self._run_process()

    def _run_process(self) -> list[Event]:
        try:
            return self._process()
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        if (self._state, ConnEvent.FAIL) in CONN_TRANSITIONS:
            self._to(ConnEvent.FAIL)

    def receive_eof(self) -> None:
        """The peer closed its side. Raises TruncatedError unless that was expected."""
        if self._eof:
            return
        self._eof = True
        if self._error is not None or self._state in (_S.FAILED, _S.DONE):
            return
        if self._state in (_S.CLOSE_RECEIVED, _S.CLOSED):
            if len(self._buf):
                self._to(ConnEvent.FAIL)
                raise TruncatedError(f"connection ended inside a frame ({len(self._buf)} bytes)")
            self._to(ConnEvent.RECV_EOF)
            return
        what = "before the handshake finished" if self._send is None else "without CLOSE"
        self._to(ConnEvent.RECV_EOF)
        raise TruncatedError(self._truncation_message(what))

    def _truncation_message(self, what: str) -> str:
        open_ = len(self._channels)
        extra = f" ({open_} command(s) had not ended)" if open_ else ""
        return f"connection closed by the peer {what}{extra}"

    def _process(self) -> list[Event]:
        raise NotImplementedError

    def _transport_frames(self, events: list[Event]) -> None:
        recv = self._recv
        assert recv is not None
        buf = self._buf
        while (body := buf.next_view()) is not None:
            with body:
                # decrypt into a buffer of our own and drop the header by moving the start
                # of the bytearray (O(1)): the payload is never copied
                plain = bytearray(len(body) - TAGLEN)
                recv.decrypt_into(b"", body, plain)
            ftype_raw, flags, reserved, channel = INNER.unpack_from(plain)
            if flags or reserved:
                raise RemoteProtocolError("frame flags and reserved bits must be zero")
            ftype = _FRAME_TYPES.get(ftype_raw)  # (a dict: FrameType() costs ~1 us a frame)
            if ftype is None:
                raise RemoteProtocolError(f"unknown frame type {ftype_raw}")
            del plain[:INNER_LEN]
            if self._trace is not None:
                self._trace("recv", ftype, channel, len(plain))
            if self._state not in (_S.AUTHENTICATING, _S.OPEN, _S.CLOSE_SENT):
                raise RemoteProtocolError(f"{ftype.name} frame after CLOSE")
            if ftype in DATA_FRAMES:
                self._dispatch(ftype, channel, plain, events)
            else:
                self._dispatch(ftype, channel, bytes(plain), events)

    def _dispatch(
        self, ftype: FrameType, channel: int, payload: bytes | bytearray, events: list[Event]
    ) -> None:
        if ftype is FrameType.PING:
            if channel or len(payload) > m.MAX_PING:
                raise RemoteProtocolError("PING must be on channel 0 with at most 64 bytes")
            if self._state in _MAY_SEND:
                self._queue_frame(FrameType.PONG, 0, bytes(payload))
        elif ftype is FrameType.PONG:
            if channel or len(payload) > m.MAX_PING:
                raise RemoteProtocolError("PONG must be on channel 0 with at most 64 bytes")
            events.append(PongReceived(bytes(payload)))
        elif ftype is FrameType.CLOSE:
            if channel or payload:
                raise RemoteProtocolError("CLOSE must be on channel 0 and empty")
            self._to(ConnEvent.RECV_CLOSE)
            self._peer_closed = True
            events.append(CloseReceived())
        elif ftype is FrameType.ERROR:
            code, text = m.unpack_error(bytes(payload))
            if channel:
                self._channel_error(channel)
            events.append(ErrorReceived(channel, code, text))
        elif ftype is FrameType.CREDIT:
            increment = m.unpack_credit(bytes(payload))
            ch = self._credited_channel(channel)
            if ch is not None:
                if ch.send_room + increment > m.MAX_WINDOW:
                    raise RemoteProtocolError(
                        f"CREDIT grows channel {channel}'s window beyond {m.MAX_WINDOW} bytes"
                    )
                ch.send_room += increment
                events.append(CreditReceived(channel, ch.send_room))
        else:
            self._dispatch_role(ftype, channel, payload, events)

    def _received(self, ftype: FrameType, ch: Channel, size: int) -> None:
        """Charge `size` data bytes the peer sent to the channel's window."""
        if size > ch.recv_room:
            raise RemoteProtocolError(
                f"{ftype.name} of {size} bytes on channel {ch.number} exceeds the window "
                f"({ch.recv_room} bytes left)"
            )
        ch.recv_room -= size

    def _channel_error(self, channel: int) -> None:
        """Check an ERROR's channel is valid for this role (overridden)."""

    def _credited_channel(self, channel: int) -> Channel | None:
        """The open channel a CREDIT is for, or None to drop it (overridden)."""
        raise NotImplementedError

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes | bytearray, events: list[Event]
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_channel_number(channel: int) -> None:
        if not 1 <= channel <= MAX_CHANNEL:
            raise RemoteProtocolError(f"channel {channel} is not a command channel")
