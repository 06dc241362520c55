"""What both roles share: the transport CipherStates, frame I/O and the close rules.

Every outgoing byte goes through one queue (`data_to_send`), in the order it was
encrypted, so the wire order always matches the nonce order: a caller cannot interleave
frames wrongly. A protocol error poisons the connection: every later call raises it again.
"""

from __future__ import annotations

from collections.abc import Callable

from rexec.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from rexec.protocol import messages as m
from rexec.protocol.events import CloseReceived, ErrorReceived, Event, PongReceived
from rexec.protocol.frames import (
    INNER,
    INNER_LEN,
    LENGTH,
    MAX_CHANNEL,
    MAX_PAYLOAD,
    FrameBuffer,
    FrameType,
)
from rexec.protocol.noise import TAGLEN, CipherState

# direction ("send"/"recv"), frame type, channel, payload length
TraceFn = Callable[[str, FrameType, int, int], None]


class ChannelState:
    """One command's channel as this end sees it."""

    __slots__ = ("stdin_open",)

    def __init__(self, stdin_open: bool) -> None:
        self.stdin_open = stdin_open

    def __repr__(self) -> str:
        return f"ChannelState(stdin_open={self.stdin_open!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ChannelState:
            return NotImplemented
        assert isinstance(other, ChannelState)
        return self.stdin_open == other.stdin_open

    __hash__ = None  # type: ignore[assignment]  # mutable, as with @dataclass


class Connection:
    """Base of ClientConnection and ServerConnection (never used directly)."""

    role = "?"

    def __init__(self, buf: FrameBuffer, trace: TraceFn | None = None) -> None:
        """`buf` is set up for the role's first handshake message; it serves all along."""
        self._out: list[bytes | bytearray] = []
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._buf = buf
        self._error: ProtocolError | None = None
        self._trace = trace
        self.channels: dict[int, ChannelState] = {}
        self.last_channel = 0
        self.close_sent = False
        self.close_received = False
        self.eof_received = False

    # ---- output --------------------------------------------------------------------

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued since the last call, in wire order."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _queue_frame(
        self, ftype: FrameType, channel: int, payload: bytes = b"", *, force: bool = False
    ) -> None:
        if self._error is not None and not force:
            raise self._error
        if self._send is None:
            raise LocalProtocolError(f"cannot send {ftype.name} before the handshake is done")
        if self.close_sent:
            raise LocalProtocolError(f"cannot send {ftype.name} after CLOSE")
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{ftype.name} payload of {len(payload)} bytes is too big")
        size = INNER_LEN + len(payload) + TAGLEN
        frame = bytearray(4 + size)  # length prefix and ciphertext: one buffer, one write
        LENGTH.pack_into(frame, 0, size)
        with memoryview(frame) as view:
            self._send.encrypt_into(b"", INNER.pack(ftype, 0, 0, channel) + payload, view[4:])
        self._out.append(frame)
        if self._trace is not None:
            self._trace("send", ftype, channel, len(payload))

    def _queue_chunks(self, ftype: FrameType, channel: int, data: bytes) -> None:
        if len(data) <= MAX_PAYLOAD:
            self._queue_frame(ftype, channel, data)
            return
        view = memoryview(data)
        for off in range(0, len(data), MAX_PAYLOAD):
            self._queue_frame(ftype, channel, bytes(view[off : off + MAX_PAYLOAD]))

    def send_ping(self, payload: bytes = b"") -> None:
        if len(payload) > m.MAX_PING:
            raise LocalProtocolError(f"PING payload is limited to {m.MAX_PING} bytes")
        self._queue_frame(FrameType.PING, 0, payload)

    def send_error(self, channel: int, code: int, message: str) -> None:
        self._queue_frame(FrameType.ERROR, channel, m.pack_error(code, message))

    def send_close(self) -> None:
        """Say we will send nothing more; idempotent."""
        if not self.close_sent and self._error is None and self._send is not None:
            self._queue_frame(FrameType.CLOSE, 0)
            self.close_sent = True

    def farewell(self, code: int, message: str) -> None:
        """Queue a last ERROR (channel 0) and CLOSE, even after the peer broke the protocol.

        Our sending direction is unaffected by the peer's bad bytes, so we can still say why
        we are closing. Does nothing before the handshake or after CLOSE.
        """
        if self._send is None or self.close_sent:
            return
        self._queue_frame(FrameType.ERROR, 0, m.pack_error(code, message), force=True)
        self._queue_frame(FrameType.CLOSE, 0, force=True)
        self.close_sent = True

    @property
    def handshake_done(self) -> bool:
        return self._send is not None

    # ---- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete.

        Raises a ProtocolError subclass for any bad byte; the connection is then dead.
        """
        if self._error is not None:
            raise self._error
        if self.eof_received:
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
            self._error = exc
            raise

    def receive_eof(self) -> None:
        """The peer closed its side. Raises TruncatedError unless that was expected."""
        self.eof_received = True
        if self._error is not None:
            return
        if not self.close_received:
            what = "before the handshake finished" if self._send is None else "without CLOSE"
            raise TruncatedError(self._truncation_message(what))
        if len(self._buf):
            raise TruncatedError(f"connection ended inside a frame ({len(self._buf)} bytes)")

    def _truncation_message(self, what: str) -> str:
        open_ = len(self.channels)
        extra = f" ({open_} command(s) still running)" if open_ else ""
        return f"connection closed by the peer {what}{extra}"

    def _process(self) -> list[Event]:
        raise NotImplementedError

    def _transport_frames(self, events: list[Event]) -> None:
        recv = self._recv
        assert recv is not None
        buf = self._buf
        while (body := buf.next_view()) is not None:
            with body:
                plain = recv.decrypt(b"", body)
            ftype_raw, flags, reserved, channel = INNER.unpack_from(plain)
            if flags or reserved:
                raise RemoteProtocolError("frame flags and reserved bits must be zero")
            try:
                ftype = FrameType(ftype_raw)
            except ValueError:
                raise RemoteProtocolError(f"unknown frame type {ftype_raw}") from None
            payload = plain[INNER_LEN:]
            if self._trace is not None:
                self._trace("recv", ftype, channel, len(payload))
            if self.close_received:
                raise RemoteProtocolError(f"{ftype.name} frame after CLOSE")
            self._dispatch(ftype, channel, payload, events)

    def _dispatch(
        self, ftype: FrameType, channel: int, payload: bytes, events: list[Event]
    ) -> None:
        if ftype is FrameType.PING:
            if channel or len(payload) > m.MAX_PING:
                raise RemoteProtocolError("PING must be on channel 0 with at most 64 bytes")
            if not self.close_sent:
                self._queue_frame(FrameType.PONG, 0, payload)
        elif ftype is FrameType.PONG:
            if channel or len(payload) > m.MAX_PING:
                raise RemoteProtocolError("PONG must be on channel 0 with at most 64 bytes")
            events.append(PongReceived(payload))
        elif ftype is FrameType.CLOSE:
            if channel or payload:
                raise RemoteProtocolError("CLOSE must be on channel 0 and empty")
            self.close_received = True
            events.append(CloseReceived())
        elif ftype is FrameType.ERROR:
            code, text = m.unpack_error(payload)
            if channel:
                self._channel_error(channel)
            events.append(ErrorReceived(channel, code, text))
        else:
            self._dispatch_role(ftype, channel, payload, events)

    def _channel_error(self, channel: int) -> None:
        """Check an ERROR's channel is valid for this role (overridden)."""

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes, events: list[Event]
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_channel_number(channel: int) -> None:
        if not 1 <= channel <= MAX_CHANNEL:
            raise RemoteProtocolError(f"channel {channel} is not a command channel")
