"""Admission before authentication: who may hold one of the server's handshake slots.

Connections that have not authenticated cost the server a slot and cost the peer nothing,
so they are rationed the way OpenSSH rations them (MaxStartups start:rate:full and
PerSourceMaxStartups): each source (an IP address, or a local user on a unix socket) may
hold at most `per_source` of them, so one source cannot fill the table; past `start` in
total, new ones are dropped with a probability rising from `rate` percent to 100 % at
`full`; at `full`, every new one is. A refused peer is told "busy" in a refusal notice.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rexec.protocol.notice import RefusalCode

BUSY_RETRY_AFTER = 1  # seconds: the hint in a "busy" notice; handshakes take milliseconds
# After a notice the server half-closes and waits this long for the peer's first bytes or
# EOF before it closes: closing with the peer's HELLO unread resets a TCP connection, and on
# a unix socket fails the peer's write, either of which can lose the notice. Only so many
# refused connections wait at once (the rest close at once), so a flood costs few fds.
REFUSAL_LINGER = 1.0
MAX_LINGERING = 64
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Refusal:
    """Why a new connection is turned away: what the peer is told, and what the log says."""

    code: RefusalCode
    retry_after: float  # seconds, 0 = no hint
    reason: str  # for the log: names the limit
    limit: str = ""  # the config key that refused it, if one did
    value: int = 0  # and its value


def source_key(sock: Any, peername: Any) -> str:
    """The key limits and the failed-auth rate limiter count a peer under.

    TCP: its IP address (an IPv4-mapped IPv6 address as the IPv4 one). Unix socket: its uid
    from SO_PEERCRED, so one local user's failures or floods never lock out another.
    """
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        try:
            _, uid, _ = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except (OSError, AttributeError, struct.error):
            return "unix"
        return f"uid:{uid}"
    if isinstance(peername, tuple) and peername:
        host = str(peername[0])
        return host.removeprefix("::ffff:") if "." in host else host
    return "?"


class Admission:
    """Counts unauthenticated connections, in total and per source, and decides on new ones.

    `enter` admits (and counts) a member or returns the Refusal; `leave` uncounts it, once,
    when it authenticates or goes away. Memory: one entry per counted member and per source
    that has one, so it is bounded by `full`.
    """

    def __init__(
        self,
        full: int,
        start: int,
        rate: int,
        per_source: int,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not (1 <= start <= full and per_source >= 1 and 0 <= rate <= 100):
            raise ValueError("need 1 <= start <= full, per_source >= 1 and 0 <= rate <= 100")
        self.full = full
        self.start = start
        self.rate = rate
        self.per_source = per_source
        self._rng = rng
        self._members: dict[object, str] = {}
        self._sources: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._members)

    def count(self, source: str) -> int:
        return self._sources.get(source, 0)

    def drop_probability(self, n: int) -> float:
        """The chance a newcomer is dropped while n connections are unauthenticated."""
        if n < self.start:
            return 0.0
        if n >= self.full:
            return 1.0
        return (self.rate + (100 - self.rate) * (n - self.start) / (self.full - self.start)) / 100

    def enter(self, member: object, source: str) -> Refusal | None:
        if member in self._members:
            return None
        n = len(self._members)
        mine = self._sources.get(source, 0)
        if n >= self.full:
            return Refusal(
                RefusalCode.BUSY,
                BUSY_RETRY_AFTER,
                "max_unauthenticated reached",
                "max_unauthenticated",
                self.full,
            )
        if mine >= self.per_source:
            return Refusal(
                RefusalCode.BUSY,
                BUSY_RETRY_AFTER,
                "max_unauthenticated_per_source reached",
                "max_unauthenticated_per_source",
                self.per_source,
            )
        if n >= self.start and self._rng() < self.drop_probability(n):
            return Refusal(
                RefusalCode.BUSY,
                BUSY_RETRY_AFTER,
                f"dropped early: {n} connections in the handshake",
                "unauthenticated_drop_start",
                self.start,
            )
        self._members[member] = source
        self._sources[source] = mine + 1
        return None

    def leave(self, member: object) -> None:
        source = self._members.pop(member, None)
        if source is None:
            return
        left = self._sources[source] - 1
        if left:
            self._sources[source] = left
        else:
            del self._sources[source]
