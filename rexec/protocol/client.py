"""The client role of rexec/2 (sans-I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rexec.errors import (
    AuthFailed,
    DecryptError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from rexec.protocol import messages as m
from rexec.protocol.connection import Channel, Connection, TraceFn
from rexec.protocol.events import Event, ExitReceived, HandshakeComplete, OutputReceived, Stream
from rexec.protocol.frames import (
    MAX_CHANNEL,
    MAX_MSG2_LEN,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    VERSION,
    FrameBuffer,
    FrameType,
    Hello,
    encode_frame,
)
from rexec.protocol.noise import DHLEN, TAGLEN, NNpsk0Handshake, Suite
from rexec.protocol.notice import NOTICE_LEN, inspect_reply
from rexec.protocol.states import ChannelEvent, ChannelState, ConnEvent
from rexec.protocol.token import Token

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexec.protocol.pty import PtyRequest
    from rexec.protocol.xfer import XferRequest


class ClientConnection(Connection):
    """Drive it with: initiate(), receive_data() until HandshakeComplete, then send_exec().

    AUTH is queued automatically the moment message 2 verifies, so an EXEC queued right
    after HandshakeComplete rides in the same write (one round trip to the first output).
    """

    role = "client"

    def __init__(
        self,
        token: Token,
        suite: Suite = Suite.AESGCM,
        *,
        trace: TraceFn | None = None,
        ephemeral: bytes | None = None,
        output_window: int = m.OUTPUT_WINDOW,
    ) -> None:
        super().__init__(FrameBuffer(MAX_MSG2_LEN, DHLEN + TAGLEN, "handshake message"), trace)
        self.output_window = output_window
        self._token = token
        self.hello = Hello(suite, token.key_id)
        self._hs = NNpsk0Handshake(
            suite,
            initiator=True,
            prologue=self.hello.pack(),
            psk=token.secret,
            ephemeral=ephemeral,
        )
        self._initiated = False
        self.server_info: m.ServerInfo | None = None
        self.handshake_hash: bytes | None = None

    @property
    def reply_received(self) -> int:
        """Bytes of the server's handshake reply in so far (for a connect-timeout message)."""
        return 0 if self._send is not None else len(self._buf)

    def initiate(self) -> None:
        """Queue HELLO and Noise message 1."""
        if self._initiated:
            raise LocalProtocolError("initiate() called twice")
        self._initiated = True
        self._out.append(self.hello.pack() + encode_frame(self._hs.write_message_1()))

    def _process(self) -> list[Event]:
        events: list[Event] = []
        if self._send is None:
            if not self._initiated:
                raise LocalProtocolError("receive_data before initiate()")
            # a refusal notice, SSH or HTTP in place of message 2: raise at once
            if inspect_reply(
                self._buf.peek(NOTICE_LEN), suite=self.hello.suite.label, version=VERSION
            ):
                return events
            body = self._buf.next_body()
            if body is None:
                return events
            try:
                payload = self._hs.read_message_2(body)
            except DecryptError:
                raise AuthFailed(
                    "server failed to prove it holds the token (message 2 did not verify)"
                ) from None
            info = m.ServerInfo.from_json(payload)
            self._send, self._recv = self._hs.split()
            self.handshake_hash = self._hs.handshake_hash
            self.server_info = info
            self._buf.max_body = MAX_TRANSPORT_BODY
            self._buf.min_body = MIN_TRANSPORT_BODY
            self._buf.what = "frame"
            self._to(ConnEvent.MSG2_OK)
            self._queue_frame(
                FrameType.AUTH, 0, m.auth_proof(self._token.secret, self.handshake_hash)
            )
            events.append(HandshakeComplete(info))
        self._transport_frames(events)
        return events

    # ---- sending ------------------------------------------------------------------

    def send_exec(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        window: int | None = None,
        pty: PtyRequest | None = None,
    ) -> int:
        """Open a channel running `command`; returns its channel number.

        `window`: the channel's output window (default `output_window`): how much output
        the server may send before we report it consumed (`output_consumed`). `pty`: run it
        on a pseudo-terminal (docs/PROTOCOL.md 10.2.1).
        """
        if self.server_info is None:
            raise LocalProtocolError("cannot send EXEC before the handshake is done")
        window = self.output_window if window is None else window
        body = m.exec_request_json(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, window=window, pty=pty
        )
        if self.last_channel >= MAX_CHANNEL:
            raise LocalProtocolError("channel numbers exhausted: open a new connection")
        channel = self.last_channel + 1
        self._queue_frame(FrameType.EXEC, channel, body)
        self.last_channel = channel
        ch = Channel(channel, ChannelState.UNUSED, self.server_info.window, window)
        self._channels[channel] = ch
        self._channel_to(ch, ChannelEvent.EXEC_STDIN if stdin else ChannelEvent.EXEC)
        return channel

    def send_xfer(self, request: XferRequest) -> int:
        """Open a transfer channel (docs/PROTOCOL.md section 17); returns its number. Its
        stream goes out as STDIN (within the stdin window) and comes back as STDOUT (within
        `request.window`)."""
        if self.server_info is None:
            raise LocalProtocolError("cannot send XFER before the handshake is done")
        if self.last_channel >= MAX_CHANNEL:
            raise LocalProtocolError("channel numbers exhausted: open a new connection")
        channel = self.last_channel + 1
        self._queue_frame(FrameType.XFER, channel, request.to_json())
        self.last_channel = channel
        ch = Channel(channel, ChannelState.UNUSED, self.server_info.window, request.window)
        self._channels[channel] = ch
        self._channel_to(ch, ChannelEvent.XFER)
        return channel

    def _open(self, channel: int, what: str) -> Channel:
        ch = self._channels.get(channel)
        if ch is None:
            raise LocalProtocolError(f"cannot send {what}: channel {channel} is not open")
        return ch

    def _stdin_channel(self, channel: int) -> Channel:
        ch = self._open(channel, "STDIN")
        if ch.state is not ChannelState.STDIN_OPEN:
            raise LocalProtocolError(f"stdin of channel {channel} is closed or was not requested")
        return ch

    def send_stdin(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """Queue stdin for `channel`: at most stdin_room(channel) bytes."""
        self._queue_data(FrameType.STDIN, self._stdin_channel(channel), data)

    def send_stdin_buffer(self, channel: int, buf: bytearray) -> None:
        """As send_stdin, for a payload read into a buffer behind frames.HEADROOM free bytes
        (at most MAX_PAYLOAD of it): framed in place, no copy. The buffer is ours now."""
        self._queue_data_buffer(FrameType.STDIN, self._stdin_channel(channel), buf)

    def stdin_room(self, channel: int) -> int:
        """Bytes of stdin the server accepts on `channel` right now (its credit window).

        0 once the channel's stdin is closed; CreditReceived says when it grows.
        """
        ch = self._open(channel, "STDIN")
        return ch.send_room if ch.state is ChannelState.STDIN_OPEN else 0

    def output_consumed(self, channel: int, nbytes: int) -> None:
        """The application has taken `nbytes` of the channel's output (stdout + stderr).

        Queues a CREDIT once half the channel's window is consumed. A channel that has
        ended needs no credit: calls for it are ignored.
        """
        self._consumed(channel, nbytes)

    def send_stdin_eof(self, channel: int) -> None:
        """EOF on the channel's stdin, after the stdin already queued; idempotent."""
        ch = self._open(channel, "STDIN_EOF")
        if ch.state is ChannelState.STDIN_OPEN:
            self._queue_frame(FrameType.STDIN_EOF, channel, ordered=ch)
            self._channel_to(ch, ChannelEvent.STDIN_EOF)

    def send_signal(self, channel: int, signum: int) -> None:
        self._open(channel, "SIGNAL")
        self._queue_frame(FrameType.SIGNAL, channel, m.pack_signal(signum))

    def send_window(self, channel: int, rows: int, cols: int) -> None:
        self._open(channel, "WINDOW")
        self._queue_frame(FrameType.WINDOW, channel, m.pack_window(rows, cols))

    # ---- receiving ----------------------------------------------------------------

    def receive_eof(self) -> None:
        """As the base, and a CLOSE that left our commands without an EXIT is truncation."""
        super().receive_eof()
        if self._error is None and self._channels:
            raise TruncatedError(
                f"server closed the connection with {len(self._channels)} command(s) "
                "still lacking an exit status"
            )

    def _server_channel(self, ftype: FrameType, channel: int) -> Channel:
        ch = self._channels.get(channel)
        if ch is None:
            raise RemoteProtocolError(f"{ftype.name} for channel {channel}, which is not open")
        return ch

    def _channel_error(self, channel: int) -> None:
        self._server_channel(FrameType.ERROR, channel)

    def _credited_channel(self, channel: int) -> Channel:
        return self._server_channel(FrameType.CREDIT, channel)

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes | bytearray, events: list[Event]
    ) -> None:
        if ftype is FrameType.STDOUT or ftype is FrameType.STDERR:
            ch = self._server_channel(ftype, channel)
            self._received(ftype, ch, len(payload))
            stream = Stream.STDOUT if ftype is FrameType.STDOUT else Stream.STDERR
            events.append(OutputReceived(channel, stream, payload))
        elif ftype is FrameType.EXIT:
            ch = self._server_channel(ftype, channel)
            status = m.ExitStatus.unpack(bytes(payload))
            self._channel_to(ch, ChannelEvent.EXIT)
            events.append(ExitReceived(channel, status))
        else:
            raise RemoteProtocolError(f"a server may not send {ftype.name}")
