"""Events that `receive_data` returns: what the peer said, decoded and checked.

Plain __slots__ classes, not dataclasses: the client imports this module on the `rexec run`
start-up path (DESIGN.md 2a). Events are values: compare them, never modify them.
"""

from __future__ import annotations

from enum import IntEnum

from rexec._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexec.protocol.messages import ExitStatus, ServerInfo
    from rexec.protocol.models import ExecRequest
    from rexec.protocol.xfer import XferRequest


class Stream(IntEnum):
    """Which output stream bytes belong to: the numbers are the file descriptors'."""

    STDOUT = 1
    STDERR = 2


class Event(Record):
    """Base class of every protocol event."""

    __slots__ = ()


# --- client side -------------------------------------------------------------------------


class HandshakeComplete(Event):
    """Message 2 verified: the server knows our token. AUTH is already queued to send."""

    __match_args__ = ("info",)
    __slots__ = __match_args__
    info: ServerInfo

    def __init__(self, info: ServerInfo) -> None:
        self.info = info


class OutputReceived(Event):
    """STDOUT or STDERR bytes of a channel.

    `data` is the bytearray the frame was decrypted into (no copy). Once the application
    has taken it, report that with `ClientConnection.output_consumed` so the server may
    send more.
    """

    __match_args__ = ("channel", "stream", "data")
    __slots__ = __match_args__
    channel: int
    stream: Stream
    data: bytes | bytearray

    def __init__(self, channel: int, stream: Stream, data: bytes | bytearray) -> None:
        self.channel = channel
        self.stream = stream
        self.data = data


class ExitReceived(Event):
    """The channel's last frame: the command ended."""

    __match_args__ = ("channel", "status")
    __slots__ = __match_args__
    channel: int
    status: ExitStatus

    def __init__(self, channel: int, status: ExitStatus) -> None:
        self.channel = channel
        self.status = status


class CreditReceived(Event):
    """The peer opened more of a channel's window: `room` bytes may be sent on it now.

    On the client the window is the channel's stdin; on the server, its output.
    """

    __match_args__ = ("channel", "room")
    __slots__ = __match_args__
    channel: int
    room: int

    def __init__(self, channel: int, room: int) -> None:
        self.channel = channel
        self.room = room


# --- server side -------------------------------------------------------------------------


class Authenticated(Event):
    """A valid AUTH proof arrived: commands may run from now on."""

    __match_args__ = ("key_id",)
    __slots__ = __match_args__
    key_id: bytes

    def __init__(self, key_id: bytes) -> None:
        self.key_id = key_id


class ExecReceived(Event):
    """A valid EXEC opened a channel."""

    __match_args__ = ("channel", "request")
    __slots__ = __match_args__
    channel: int
    request: ExecRequest

    def __init__(self, channel: int, request: ExecRequest) -> None:
        self.channel = channel
        self.request = request


class XferReceived(Event):
    """A valid XFER: open a transfer channel (docs/PROTOCOL.md section 17)."""

    __match_args__ = ("channel", "request")
    __slots__ = __match_args__
    channel: int
    request: XferRequest

    def __init__(self, channel: int, request: XferRequest) -> None:
        self.channel = channel
        self.request = request


class ExecRejected(Event):
    """An EXEC whose body failed validation; the channel is open and must be answered.

    The server answers with ERROR (BAD_REQUEST) and EXIT on that channel, and keeps the
    connection: one bad request should not cost the client its other commands.
    """

    __match_args__ = ("channel", "reason")
    __slots__ = __match_args__
    channel: int
    reason: str

    def __init__(self, channel: int, reason: str) -> None:
        self.channel = channel
        self.reason = reason


class StdinReceived(Event):
    """STDIN bytes (a bytearray, as OutputReceived's); report them with `stdin_consumed`
    once the command has them, so the client may send more."""

    __match_args__ = ("channel", "data")
    __slots__ = __match_args__
    channel: int
    data: bytes | bytearray

    def __init__(self, channel: int, data: bytes | bytearray) -> None:
        self.channel = channel
        self.data = data


class StdinClosed(Event):
    __match_args__ = ("channel",)
    __slots__ = __match_args__
    channel: int

    def __init__(self, channel: int) -> None:
        self.channel = channel


class SignalReceived(Event):
    __match_args__ = ("channel", "signum")
    __slots__ = __match_args__
    channel: int
    signum: int

    def __init__(self, channel: int, signum: int) -> None:
        self.channel = channel
        self.signum = signum


class WindowChanged(Event):
    __match_args__ = ("channel", "rows", "cols")
    __slots__ = __match_args__
    channel: int
    rows: int
    cols: int

    def __init__(self, channel: int, rows: int, cols: int) -> None:
        self.channel = channel
        self.rows = rows
        self.cols = cols


# --- both sides --------------------------------------------------------------------------


class ErrorReceived(Event):
    """An ERROR frame; channel 0 means the whole connection."""

    __match_args__ = ("channel", "code", "message")
    __slots__ = __match_args__
    channel: int
    code: int
    message: str

    def __init__(self, channel: int, code: int, message: str) -> None:
        self.channel = channel
        self.code = code
        self.message = message


class PongReceived(Event):
    __match_args__ = ("payload",)
    __slots__ = __match_args__
    payload: bytes

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class CloseReceived(Event):
    """The peer sent CLOSE: it will send nothing more."""

    __slots__ = ()
