"""The asyncio plumbing under rexec.client.aio's Connection: the protocol object asyncio
feeds (bytes in, frames out, and the OS error a connection died of) and the wait primitive
that wakes a Process or a start() when the core says something they wait on changed. Kept
apart so aio reads as the API: Connection, Process and their streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from rexec.protocol.connection import Connection as ProtocolConnection
from rexec.protocol.events import Event
from rexec.transport import FramedProtocol, LostHandler


class ClientProtocol(FramedProtocol):
    """FramedProtocol that remembers the OS error a connection died of (for the core)."""

    def __init__(
        self,
        conn: ProtocolConnection,
        on_events: Callable[[list[Event]], None],
        on_lost: LostHandler,
    ) -> None:
        super().__init__(conn, on_events, on_lost)
        self.os_error: OSError | None = None
        self.on_bytes: Callable[[], None] | None = None

    def buffer_updated(self, nbytes: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes()  # any byte is a sign of life, a whole frame or not
        super().buffer_updated(nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self.os_error = exc
        super().connection_lost(exc)


class Waiters:
    """Futures woken together when something they wait on may have changed."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await fut
        except BaseException:
            # Only a cancelled waiter is still queued: wake() pops what it resolves. (A
            # deque.remove that misses builds the future's repr for its ValueError, ~10 us
            # per wake-up on the streaming path.)
            with contextlib.suppress(ValueError):
                self._futures.remove(fut)
            raise

    def wake(self, one: bool = False) -> None:
        """Wake every waiter (or the longest-waiting live one)."""
        while self._futures:
            fut = self._futures.popleft()
            if not fut.done():
                fut.set_result(None)
                if one:
                    return
