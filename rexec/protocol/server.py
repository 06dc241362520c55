"""The server role of rexec/1 (sans-I/O).

Handshake rules: a HELLO naming an unknown key id is answered exactly like a wrong secret
(message 1 is checked against a dummy PSK), so timing and behaviour reveal nothing about
which key ids exist; a failed message 1 raises AuthFailed before any byte is queued. A HELLO
refused for a reason that is no secret (version, suite) queues a refusal notice first.
Until AUTH the receive buffer is small and fixed (frames.PREAUTH_RECV).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

from rexec.errors import AuthFailed, DecryptError, LocalProtocolError, RemoteProtocolError
from rexec.protocol import messages as m
from rexec.protocol.connection import ChannelState, Connection, TraceFn
from rexec.protocol.events import (
    Authenticated,
    Event,
    ExecReceived,
    ExecRejected,
    SignalReceived,
    StdinClosed,
    StdinReceived,
    WindowChanged,
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

KeyLookup = Callable[[bytes], "bytes | None"]

_DUMMY_PSK = os.urandom(32)


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
        self.authenticated = False
        self.key_id: bytes | None = None
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

    def refuse(self, code: RefusalCode, retry_after: float = 0) -> bool:
        """Queue a refusal notice in place of message 2 (docs/PROTOCOL.md 6.6); then close.

        Only for reasons that are no secret: a failed authentication is never announced.
        False, and nothing queued, once message 2 is out (the peer would read the notice as
        a frame) or a notice already is.
        """
        if self._send is not None or self.refused is not None:
            return False
        self.refused = code
        self._out.append(encode_notice(code, retry_after, VERSION))
        if self._error is None:  # nothing more is read from a refused peer
            self._error = LocalProtocolError(f"connection refused ({code.name.lower()})")
        return True

    # ---- receiving ----------------------------------------------------------------

    def _dispatch(
        self, ftype: FrameType, channel: int, payload: bytes, events: list[Event]
    ) -> None:
        if not self.authenticated:
            if ftype is not FrameType.AUTH:
                raise RemoteProtocolError(f"{ftype.name} frame before AUTH")
            self._auth(channel, payload, events)
            return
        super()._dispatch(ftype, channel, payload, events)

    def _auth(self, channel: int, payload: bytes, events: list[Event]) -> None:
        assert self._hs is not None and self._secret is not None and self.hello is not None
        if channel != 0 or len(payload) != m.AUTH_LEN:
            raise RemoteProtocolError("AUTH must be on channel 0 with a 32-byte proof")
        if not m.verify_auth_proof(self._secret, self._hs.handshake_hash, payload):
            raise AuthFailed("authentication failed: bad AUTH proof")
        self._buf.max_body = MAX_TRANSPORT_BODY  # authenticated: full-size frames, a buffer
        self._buf.limit = None  # that grows to take them
        self.authenticated = True
        self.key_id = self.hello.key_id
        events.append(Authenticated(self.hello.key_id))

    def _channel_error(self, channel: int) -> None:
        self._check_channel_number(channel)

    def _known_channel(self, ftype: FrameType, channel: int) -> ChannelState | None:
        """The open channel, or None for one that has closed (late frames are dropped)."""
        self._check_channel_number(channel)
        state = self.channels.get(channel)
        if state is None and channel > self.last_channel:
            raise RemoteProtocolError(f"{ftype.name} for channel {channel}, which was never opened")
        return state

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes, events: list[Event]
    ) -> None:
        if ftype is FrameType.EXEC:
            self._check_channel_number(channel)
            if channel <= self.last_channel:
                raise RemoteProtocolError(f"EXEC reuses channel {channel}; numbers must increase")
            self.last_channel = channel
            try:
                request = parse_exec_request(payload)
            except RemoteProtocolError as exc:
                # stdin stays "open" so the client's in-flight STDIN is dropped, not fatal
                self.channels[channel] = ChannelState(stdin_open=True)
                events.append(ExecRejected(channel, str(exc)))
                return
            self.channels[channel] = ChannelState(stdin_open=request.stdin)
            events.append(ExecReceived(channel, request))
        elif ftype is FrameType.STDIN or ftype is FrameType.STDIN_EOF:
            state = self._known_channel(ftype, channel)
            if state is None:
                return
            if not state.stdin_open:
                raise RemoteProtocolError(
                    f"{ftype.name} on channel {channel} whose stdin is closed"
                )
            if ftype is FrameType.STDIN:
                events.append(StdinReceived(channel, payload))
            else:
                if payload:
                    raise RemoteProtocolError("STDIN_EOF must be empty")
                state.stdin_open = False
                events.append(StdinClosed(channel))
        elif ftype is FrameType.SIGNAL:
            signum = m.unpack_signal(payload)
            if self._known_channel(ftype, channel) is not None:
                events.append(SignalReceived(channel, signum))
        elif ftype is FrameType.WINDOW:
            rows, cols = m.unpack_window(payload)
            if self._known_channel(ftype, channel) is not None:
                events.append(WindowChanged(channel, rows, cols))
        elif ftype is FrameType.AUTH:
            raise RemoteProtocolError("AUTH sent twice")
        else:
            raise RemoteProtocolError(f"a client may not send {ftype.name}")

    # ---- sending ------------------------------------------------------------------

    def _open(self, channel: int, what: str) -> None:
        if channel not in self.channels:
            raise LocalProtocolError(f"cannot send {what}: channel {channel} is not open")

    def send_output(self, channel: int, stream: int, data: bytes) -> None:
        """STDOUT (stream 1) or STDERR (stream 2); split into frames as needed."""
        self._open(channel, "output")
        if stream not in (1, 2):
            raise LocalProtocolError(f"output stream must be 1 or 2, not {stream}")
        if data:
            ftype = FrameType.STDOUT if stream == 1 else FrameType.STDERR
            self._queue_chunks(ftype, channel, data)

    def send_channel_error(self, channel: int, code: int, message: str) -> None:
        self._open(channel, "ERROR")
        self.send_error(channel, code, message)

    def send_exit(self, channel: int, status: m.ExitStatus) -> None:
        """EXIT closes the channel: it is always the channel's last frame."""
        self._open(channel, "EXIT")
        self._queue_frame(FrameType.EXIT, channel, status.pack())
        del self.channels[channel]
