"""The connection's and each channel's explicit states, and the only moves between them.

docs/PROTOCOL.md section 12 as code: ConnState and ChannelState change only through
CONN_TRANSITIONS and CHANNEL_TRANSITIONS (rexec.protocol.connection applies them, for both
roles), so what a state allows is decided in one place, and tests/protocol/test_states.py
checks these tables against the document's.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

# ---- the connection's states ------------------------------------------------------------


class ConnState(Enum):
    """Where a connection is, as this end sees it."""

    HANDSHAKE = "HANDSHAKE"  # no transport keys yet
    AUTHENTICATING = "AUTHENTICATING"  # server: keys agreed, AUTH not yet verified
    OPEN = "OPEN"
    CLOSE_SENT = "CLOSE_SENT"  # we sent CLOSE; the peer has not
    CLOSE_RECEIVED = "CLOSE_RECEIVED"  # the peer sent CLOSE; we have not
    CLOSED = "CLOSED"  # both CLOSEs: only the end of the stream may follow
    PEER_ENDED = "PEER_ENDED"  # the peer sent CLOSE and ended its stream; we have not
    FAILED = "FAILED"  # input is dead (protocol error, truncation); we may still say why
    DONE = "DONE"  # nothing more to send or to receive


class ConnEvent(Enum):
    MSG1_OK = "MSG1_OK"  # server: message 1 verified, message 2 queued, keys split
    MSG2_OK = "MSG2_OK"  # client: message 2 verified, keys split, AUTH queued
    AUTH_OK = "AUTH_OK"  # server: a valid AUTH arrived
    SEND_CLOSE = "SEND_CLOSE"
    RECV_CLOSE = "RECV_CLOSE"
    RECV_EOF = "RECV_EOF"  # the peer ended its stream
    FAIL = "FAIL"  # the peer broke the protocol, or its stream ended early


_S, _E = ConnState, ConnEvent
CONN_TRANSITIONS: Mapping[tuple[ConnState, ConnEvent], ConnState] = MappingProxyType(
    {
        (_S.HANDSHAKE, _E.MSG1_OK): _S.AUTHENTICATING,
        (_S.HANDSHAKE, _E.MSG2_OK): _S.OPEN,
        (_S.AUTHENTICATING, _E.AUTH_OK): _S.OPEN,
        (_S.OPEN, _E.SEND_CLOSE): _S.CLOSE_SENT,
        (_S.OPEN, _E.RECV_CLOSE): _S.CLOSE_RECEIVED,
        (_S.CLOSE_SENT, _E.RECV_CLOSE): _S.CLOSED,
        (_S.CLOSE_RECEIVED, _E.SEND_CLOSE): _S.CLOSED,
        (_S.CLOSE_RECEIVED, _E.RECV_EOF): _S.PEER_ENDED,
        (_S.CLOSED, _E.RECV_EOF): _S.DONE,
        (_S.PEER_ENDED, _E.SEND_CLOSE): _S.DONE,
        (_S.HANDSHAKE, _E.RECV_EOF): _S.FAILED,
        (_S.AUTHENTICATING, _E.RECV_EOF): _S.FAILED,
        (_S.OPEN, _E.RECV_EOF): _S.FAILED,
        (_S.CLOSE_SENT, _E.RECV_EOF): _S.DONE,
        (_S.HANDSHAKE, _E.FAIL): _S.FAILED,
        (_S.AUTHENTICATING, _E.FAIL): _S.FAILED,
        (_S.OPEN, _E.FAIL): _S.FAILED,
        (_S.CLOSE_RECEIVED, _E.FAIL): _S.FAILED,
        (_S.CLOSE_SENT, _E.FAIL): _S.DONE,
        (_S.CLOSED, _E.FAIL): _S.DONE,
        (_S.FAILED, _E.SEND_CLOSE): _S.DONE,
    }
)


# ---- a channel's states -----------------------------------------------------------------


class ChannelState(Enum):
    """Where one channel is. UNUSED and CLOSED channels have no Channel record."""

    UNUSED = "UNUSED"  # a number above every one used so far
    STDIN_OPEN = "STDIN_OPEN"  # running; its EXEC asked for stdin and STDIN_EOF has not come
    STDIN_CLOSED = "STDIN_CLOSED"  # running; stdin at EOF (never asked for, or STDIN_EOF)
    REJECTED = "REJECTED"  # server: the EXEC was invalid; STDIN is dropped until its EXIT
    CLOSED = "CLOSED"  # EXIT sent (server) or received (client): closed for good


class ChannelEvent(Enum):
    EXEC = "EXEC"  # an EXEC without stdin
    EXEC_STDIN = "EXEC_STDIN"  # an EXEC with "stdin": true
    EXEC_REJECTED = "EXEC_REJECTED"  # server: an EXEC (or XFER) whose body is invalid
    XFER = "XFER"  # a valid XFER: a transfer channel (its stream rides in STDIN and STDOUT)
    STDIN_EOF = "STDIN_EOF"
    EXIT = "EXIT"


_C, _V = ChannelState, ChannelEvent
CHANNEL_TRANSITIONS: Mapping[tuple[ChannelState, ChannelEvent], ChannelState] = MappingProxyType(
    {
        (_C.UNUSED, _V.EXEC): _C.STDIN_CLOSED,
        (_C.UNUSED, _V.EXEC_STDIN): _C.STDIN_OPEN,
        (_C.UNUSED, _V.EXEC_REJECTED): _C.REJECTED,
        (_C.UNUSED, _V.XFER): _C.STDIN_OPEN,
        (_C.STDIN_OPEN, _V.STDIN_EOF): _C.STDIN_CLOSED,
        (_C.REJECTED, _V.STDIN_EOF): _C.REJECTED,
        (_C.STDIN_OPEN, _V.EXIT): _C.CLOSED,
        (_C.STDIN_CLOSED, _V.EXIT): _C.CLOSED,
        (_C.REJECTED, _V.EXIT): _C.CLOSED,
    }
)
