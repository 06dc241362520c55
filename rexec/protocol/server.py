"""The server role of rexec/2 (sans-I/O).

Handshake rules: a HELLO naming an unknown key id is answered exactly like a wrong secret
(message 1 is checked against a dummy PSK), so timing and behaviour reveal nothing about
which key ids exist; a failed message 1 raises AuthFailed before any byte is queued. A HELLO
refused for a reason that is no secret (version, suite) queues a refusal notice first.
Until AUTH the receive buffer is small and fixed (frames.PREAUTH_RECV).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Protocol, TypeVar

from rexec.errors import AuthFailed, DecryptError, LocalProtocolError, RemoteProtocolError
from rexec.protocol import messages as m
from rexec.protocol.connection import Channel, Connection, TraceFn
from rexec.protocol.events import (
    Authenticated,
    Event,
    ExecReceived,
    ExecRejected,
    SignalReceived,
    StdinClosed,
    StdinReceived,
    WindowChanged,
    XferReceived,
)
from rexec.protocol.frames import (
    HELLO_LEN,
    LENGTH,
    MAX_SERVER_INFO,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    MSG1_LEN,
    PREAUTH_RECV,
    VERSION,
    FrameBuffer,
    FrameType,
    Hello,
    encode_frame,
)
from rexec.protocol.models import parse_exec_request
from rexec.protocol.noise import NNpsk0Handshake, Suite
from rexec.protocol.notice import HelloRefused, RefusalCode, encode_notice
from rexec.protocol.states import ChannelEvent, ChannelState, ConnEvent, ConnState
from rexec.protocol.xfer import XferRequest

KeyLookup = Callable[[bytes], "bytes | None"]

_DUMMY_PSK = os.urandom(32)


class _Opening(Protocol):
    """What opens a channel (an EXEC or XFER body): it names the initial output window."""

    @property
    def window(self) -> int: ...


_Req = TypeVar("_Req", bound=_Opening)


class ServerConnection(Connection):
    """One accepted connection. Feed it bytes; send data_to_send() after every call."""

    role = "server"

    def __init__(
        self,
        lookup: KeyLookup,
        info: m.ServerInfo,
        *,
        suites: Collection[Suite] = (Suite.AESGCM, Suite.CHACHAPOLY),
        trace: TraceFn | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        super().__init__(
            FrameBuffer(MSG1_LEN, MSG1_LEN, "handshake message 1", limit=PREAUTH_RECV), trace
        )
        self._lookup = lookup
        self._info = info.to_json()
        if len(self._info) > MAX_SERVER_INFO:
            raise LocalProtocolError(f"server info is over {MAX_SERVER_INFO} bytes")
        self._suites = frozenset(suites)
        self._ephemeral = ephemeral
        self.hello: Hello | None = None
        self._secret: bytes | None = None
        self._hs: NNpsk0Handshake | None = None
        self.key_id: bytes | None = None
        self.window = info.window  # every channel's initial stdin window
        self.refused: RefusalCode | None = None

    def _process(self) -> list[Event]:
        events: list[Event] = []
        if self.hello is None:
            raw = self._buf.take_raw(HELLO_LEN)
            if raw is None:
                return events
            try:
                hello = Hello.unpack(raw)
                if hello.suite not in self._suites:
                    raise HelloRefused(
                        RefusalCode.SUITE_NOT_ALLOWED,
                        f"cipher suite {hello.suite.label} is not allowed here",
                    )
            except HelloRefused as exc:
                self.refuse(exc.refusal)
                raise
            self.hello = hello
        if self._send is None:
            body = self._buf.next_body()
            if body is None:
                return events
            self._handshake(body)
        self._transport_frames(events)
        return events

    def _handshake(self, msg1: bytes) -> None:
        hello = self.hello
        assert hello is not None
        secret = self._lookup(hello.key_id)
        hs = NNpsk0Handshake(
            hello.suite,
            initiator=False,
            prologue=hello.pack(),
            psk=secret if secret is not None else _DUMMY_PSK,
            ephemeral=self._ephemeral,
        )
        try:
            payload = hs.read_message_1(msg1)
        except DecryptError:
            raise AuthFailed("authentication failed: wrong or unknown token") from None
        if secret is None:  # pragma: no cover - the dummy PSK cannot verify
            raise AuthFailed("authentication failed: wrong or unknown token")
        if payload:
            raise RemoteProtocolError("message 1 must carry an empty payload")
        self._out.append(encode_frame(hs.write_message_2(self._info)))
        self._send, self._recv = hs.split()
        self._hs = hs
        self._secret = secret
        self._buf.max_body = PREAUTH_RECV - LENGTH.size  # AUTH is far smaller; bigger comes after
        self._buf.min_body = MIN_TRANSPORT_BODY
        self._buf.what = "frame"
        self._to(ConnEvent.MSG1_OK)

    def refuse(self, code: RefusalCode, retry_after: float = 0) -> bool:
        """Queue a refusal notice in place of message 2 (docs/PROTOCOL.md 6.6); then close.

        Only for reasons that are no secret: a failed authentication is never announced.
        False, and nothing queued, once message 2 is out (the peer would read the notice as
        a frame) or a notice already is.
        """
        if self._send is not None or self.refused is not None:
            return False
        self.refused = code
        self._out.append(encode_notice(code, retry_after, version=VERSION))
        if self._error is None:  # nothing more is read from a refused peer
            self._error = LocalProtocolError(f"connection refused ({code.name.lower()})")
        return True

    # ---- receiving ----------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """A valid AUTH arrived (whatever happened since)."""
        return self.key_id is not None

    def _dispatch(
        self, ftype: FrameType, channel: int, payload: bytes | bytearray, events: list[Event]
    ) -> None:
        if self._state is ConnState.AUTHENTICATING:
            if ftype is not FrameType.AUTH:
                raise RemoteProtocolError(f"{ftype.name} frame before AUTH")
            self._auth(channel, bytes(payload), events)
            return
        super()._dispatch(ftype, channel, payload, events)

    def _auth(self, channel: int, payload: bytes, events: list[Event]) -> None:
        assert self._hs is not None and self._secret is not None and self.hello is not None
        if channel != 0 or len(payload) != m.AUTH_LEN:
            raise RemoteProtocolError("AUTH must be on channel 0 with a 32-byte proof")
        if not m.verify_auth_proof(self._secret, self._hs.handshake_hash, payload):
            raise AuthFailed("authentication failed: bad AUTH proof")
        self._to(ConnEvent.AUTH_OK)
        self._buf.max_body = MAX_TRANSPORT_BODY  # authenticated: full-size frames, a buffer
        self._buf.limit = None  # that grows to take them
        self.key_id = self.hello.key_id
        events.append(Authenticated(self.hello.key_id))

    def _channel_error(self, channel: int) -> None:
        self._check_channel_number(channel)

    def _known_channel(self, ftype: FrameType, channel: int) -> Channel | None:
        """The open channel, or None for one that has closed (late frames are dropped)."""
        self._check_channel_number(channel)
        ch = self._channels.get(channel)
        if ch is None and channel > self.last_channel:
            raise RemoteProtocolError(f"{ftype.name} for channel {channel}, which was never opened")
        return ch

    def _credited_channel(self, channel: int) -> Channel | None:
        return self._known_channel(FrameType.CREDIT, channel)

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes | bytearray, events: list[Event]
    ) -> None:
        if ftype is FrameType.EXEC:
            request = self._open_channel(
                ftype, channel, lambda: parse_exec_request(bytes(payload)), events
            )
            if request is not None:
                event = ChannelEvent.EXEC_STDIN if request.stdin else ChannelEvent.EXEC
                self._channel_to(self._channels[channel], event)
                events.append(ExecReceived(channel, request))
        elif ftype is FrameType.XFER:
            self._xfer(channel, payload, events)
        elif ftype is FrameType.STDIN or ftype is FrameType.STDIN_EOF:
            ch = self._known_channel(ftype, channel)
            if ch is None:
                return
            if ch.state is ChannelState.STDIN_CLOSED:
                raise RemoteProtocolError(
                    f"{ftype.name} on channel {channel} whose stdin is closed"
                )
            if ftype is FrameType.STDIN:
                self._received(ftype, ch, len(payload))
                if ch.state is ChannelState.STDIN_OPEN:
                    events.append(StdinReceived(channel, payload))
            else:
                if payload:
                    raise RemoteProtocolError("STDIN_EOF must be empty")
                opened = ch.state is ChannelState.STDIN_OPEN
                self._channel_to(ch, ChannelEvent.STDIN_EOF)
                if opened:
                    events.append(StdinClosed(channel))
        elif ftype is FrameType.SIGNAL:
            signum = m.unpack_signal(bytes(payload))
            if self._known_channel(ftype, channel) is not None:
                events.append(SignalReceived(channel, signum))
        elif ftype is FrameType.WINDOW:
            rows, cols = m.unpack_window(bytes(payload))
            if self._known_channel(ftype, channel) is not None:
                events.append(WindowChanged(channel, rows, cols))
        elif ftype is FrameType.AUTH:
            raise RemoteProtocolError("AUTH sent twice")
        else:
            raise RemoteProtocolError(f"a client may not send {ftype.name}")

    def _xfer(self, channel: int, payload: bytes | bytearray, events: list[Event]) -> None:
        """XFER opens a transfer channel: the rules of EXEC with `"stdin": true`."""
        request = self._open_channel(
            FrameType.XFER, channel, lambda: XferRequest.from_json(payload), events
        )
        if request is not None:
            self._channel_to(self._channels[channel], ChannelEvent.XFER)
            events.append(XferReceived(channel, request))

    def _open_channel(
        self, ftype: FrameType, channel: int, parse: Callable[[], _Req], events: list[Event]
    ) -> _Req | None:
        """The one rule for opening a channel (EXEC or XFER): a number above every used one,
        then the body; an invalid body leaves the channel REJECTED (ERROR + EXIT follow, the
        connection goes on) and gives None; else the channel, still UNUSED, is registered."""
        self._check_channel_number(channel)
        if channel <= self.last_channel:
            raise RemoteProtocolError(
                f"{ftype.name} reuses channel {channel}; numbers must increase"
            )
        self.last_channel = channel
        try:
            request = parse()
        except RemoteProtocolError as exc:
            # the client's in-flight STDIN (within the window) is dropped, not fatal
            rejected = Channel(channel, ChannelState.UNUSED, 0, self.window)
            self._channels[channel] = rejected
            self._channel_to(rejected, ChannelEvent.EXEC_REJECTED)
            events.append(ExecRejected(channel, str(exc)))
            return None
        self._channels[channel] = Channel(channel, ChannelState.UNUSED, request.window, self.window)
        return request

    # ---- sending ------------------------------------------------------------------

    def _open(self, channel: int, what: str) -> Channel:
        ch = self._channels.get(channel)
        if ch is None:
            raise LocalProtocolError(f"cannot send {what}: channel {channel} is not open")
        return ch

    def output_room(self, channel: int) -> int:
        """Output bytes (stdout + stderr) the client accepts on `channel` now; 0 if closed."""
        return self.send_room(channel)

    @staticmethod
    def _output_type(stream: int) -> FrameType:
        if stream not in (1, 2):
            raise LocalProtocolError(f"output stream must be 1 or 2, not {stream}")
        return FrameType.STDOUT if stream == 1 else FrameType.STDERR

    def send_output(self, channel: int, stream: int, data: bytes | bytearray | memoryview) -> None:
        """STDOUT (stream 1) or STDERR (stream 2), at most output_room(channel) bytes;
        split into frames as needed."""
        ch = self._open(channel, "output")
        self._queue_data(self._output_type(stream), ch, data)

    def send_output_buffer(self, channel: int, stream: int, buf: bytearray) -> None:
        """As send_output, for a payload read into a buffer behind frames.HEADROOM free bytes
        (at most MAX_PAYLOAD of it): framed in place, no copy. The buffer is ours now."""
        ch = self._open(channel, "output")
        self._queue_data_buffer(self._output_type(stream), ch, buf)

    def stdin_consumed(self, channel: int, nbytes: int) -> None:
        """The command has taken `nbytes` of the channel's stdin (written to its pipe, or
        dropped): queues a CREDIT once half the window is consumed."""
        self._consumed(channel, nbytes)

    def grow_stdin_window(self, channel: int, size: int) -> None:
        """Make the channel's stdin window `size` bytes (if it is smaller): a CREDIT for the
        difference now, and later CREDITs batched to the bigger window."""
        ch = self._open(channel, "CREDIT")
        extra = min(size, m.MAX_WINDOW) - ch.recv_window
        if extra > 0:
            self._queue_frame(FrameType.CREDIT, channel, m.pack_credit(extra))
            ch.recv_window += extra
            ch.recv_room += extra

    def send_channel_error(self, channel: int, code: int, message: str) -> None:
        """ERROR about a command: after any output of that channel still queued."""
        ch = self._open(channel, "ERROR")
        self._queue_frame(FrameType.ERROR, channel, m.pack_error(code, message), ordered=ch)

    def send_exit(self, channel: int, status: m.ExitStatus) -> None:
        """EXIT closes the channel: it is always the channel's last frame, after any output
        still queued."""
        ch = self._open(channel, "EXIT")
        self._queue_frame(FrameType.EXIT, channel, status.pack(), ordered=ch)
        self._channel_to(ch, ChannelEvent.EXIT)
