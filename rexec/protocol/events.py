"""Events that `receive_data` returns: what the peer said, decoded and checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rexec.protocol.messages import ExitStatus, ServerInfo

if TYPE_CHECKING:
    from rexec.protocol.models import ExecRequest


class Event:
    """Base class of every protocol event."""

    __slots__ = ()


# --- client side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Message 2 verified: the server knows our token. AUTH is already queued to send."""

    info: ServerInfo


@dataclass(frozen=True, slots=True)
class OutputReceived(Event):
    """STDOUT (stream 1) or STDERR (stream 2) bytes of a channel."""

    channel: int
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExitReceived(Event):
    """The channel's last frame: the command ended."""

    channel: int
    status: ExitStatus


# --- server side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """A valid AUTH proof arrived: commands may run from now on."""

    key_id: bytes


@dataclass(frozen=True, slots=True)
class ExecReceived(Event):
    """A valid EXEC opened a channel."""

    channel: int
    request: ExecRequest


@dataclass(frozen=True, slots=True)
class ExecRejected(Event):
    """An EXEC whose body failed validation; the channel is open and must be answered.

    The server answers with ERROR (BAD_REQUEST) and EXIT on that channel, and keeps the
    connection: one bad request should not cost the client its other commands.
    """

    channel: int
    reason: str


@dataclass(frozen=True, slots=True)
class StdinReceived(Event):
    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StdinClosed(Event):
    channel: int


@dataclass(frozen=True, slots=True)
class SignalReceived(Event):
    channel: int
    signum: int


@dataclass(frozen=True, slots=True)
class WindowChanged(Event):
    channel: int
    rows: int
    cols: int


# --- both sides --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorReceived(Event):
    """An ERROR frame; channel 0 means the whole connection."""

    channel: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived(Event):
    """The peer sent CLOSE: it will send nothing more."""
