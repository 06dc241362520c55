"""The client role of rexec/1 (sans-I/O)."""

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
from rexec.protocol.connection import ChannelState, Connection, TraceFn
from rexec.protocol.events import Event, ExitReceived, HandshakeComplete, OutputReceived, Stream
from rexec.protocol.frames import (
    MAX_CHANNEL,
    MAX_MSG2_LEN,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    FrameBuffer,
    FrameType,
    Hello,
    encode_frame,
)
from rexec.protocol.noise import DHLEN, TAGLEN, NNpsk0Handshake, Suite
from rexec.protocol.notice import NOTICE_LEN, inspect_reply
from rexec.protocol.token import Token

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexec.protocol.pty import PtyRequest


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
    ) -> None:
        super().__init__(FrameBuffer(MAX_MSG2_LEN, DHLEN + TAGLEN, "handshake message"), trace)
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
            if inspect_reply(self._buf.peek(NOTICE_LEN), suite=self.hello.suite.label):
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
        pty: PtyRequest | None = None,
    ) -> int:
        """Open a channel running `command`; returns its channel number."""
        body = m.exec_request_json(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, pty=pty)
        if self.last_channel >= MAX_CHANNEL:
            raise LocalProtocolError("channel numbers exhausted: open a new connection")
        channel = self.last_channel + 1
        self._queue_frame(FrameType.EXEC, channel, body)
        self.last_channel = channel
        self.channels[channel] = ChannelState(stdin_open=stdin)
        return channel

    def _open(self, channel: int, what: str) -> ChannelState:
        state = self.channels.get(channel)
        if state is None:
            raise LocalProtocolError(f"cannot send {what}: channel {channel} is not open")
        return state

    def send_stdin(self, channel: int, data: bytes) -> None:
        state = self._open(channel, "STDIN")
        if not state.stdin_open:
            raise LocalProtocolError(f"stdin of channel {channel} is closed or was not requested")
        if data:
            self._queue_chunks(FrameType.STDIN, channel, data)

    def stdin_room(self, channel: int) -> int:
        """Bytes of stdin the server accepts on `channel` right now (its credit window).

        Placeholder until per-channel flow control lands: unbounded.
        """
        self._open(channel, "STDIN")
        return 2**62

    def output_consumed(self, channel: int, nbytes: int) -> None:
        """The application has taken `nbytes` of the channel's output (may queue CREDIT).

        Placeholder until per-channel flow control lands: nothing to grant.
        """

    def send_stdin_eof(self, channel: int) -> None:
        state = self._open(channel, "STDIN_EOF")
        if state.stdin_open:
            state.stdin_open = False
            self._queue_frame(FrameType.STDIN_EOF, channel)

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
        if self._error is None and self.channels:
            raise TruncatedError(
                f"server closed the connection with {len(self.channels)} command(s) "
                "still lacking an exit status"
            )

    def _channel_error(self, channel: int) -> None:
        if channel not in self.channels:
            raise RemoteProtocolError(f"ERROR for channel {channel}, which is not open")

    def _dispatch_role(
        self, ftype: FrameType, channel: int, payload: bytes, events: list[Event]
    ) -> None:
        if ftype is FrameType.STDOUT or ftype is FrameType.STDERR:
            if channel not in self.channels:
                raise RemoteProtocolError(f"{ftype.name} for channel {channel}, which is not open")
            stream = Stream.STDOUT if ftype is FrameType.STDOUT else Stream.STDERR
            events.append(OutputReceived(channel, stream, payload))
        elif ftype is FrameType.EXIT:
            if channel not in self.channels:
                raise RemoteProtocolError(f"EXIT for channel {channel}, which is not open")
            status = m.ExitStatus.unpack(payload)
            del self.channels[channel]
            events.append(ExitReceived(channel, status))
        else:
            raise RemoteProtocolError(f"a server may not send {ftype.name}")
