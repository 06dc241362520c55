"""Opening an async connection: `rexec.connect(target)`, awaited or used as `async with`.

It resolves the target, then connects and authenticates a rexec.client.aio.Connection,
trying a busy server again within one connect deadline (ConnectAttempts) and, with
`retry=N`, a failed connect again after a backoff (Retry): the rules are
rexec.client.connecting's, the waiting is asyncio's. Once open, the connection is aio's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from types import TracebackType
from typing import Any

from rexec.address import Endpoint
from rexec.client.aio import Connection
from rexec.client.connecting import DEFAULT_RETRY_DELAY, ConnectAttempts, Retry, RetryFn
from rexec.client.core import ClientCore
from rexec.client.sockdriver import jitter
from rexec.client.target import resolve_target
from rexec.errors import RexecError, ServerRefused
from rexec.protocol.connection import TraceFn
from rexec.protocol.noise import Suite
from rexec.protocol.token import Token


class Connecting:
    """What `connect()` returns: await it for a Connection, or use it as `async with`."""

    def __init__(
        self,
        target: str,
        token: str | Token | None,
        token_file: str | None,
        connect_timeout: float | None,
        suite: Suite,
        trace: TraceFn | None,
        retry: int = 0,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        on_retry: RetryFn | None = None,
    ) -> None:
        Retry(retry, retry_delay, 0.0)  # bad values fail here, at the call
        self._args = (target, token, token_file, connect_timeout, suite, trace)
        self._retry = (retry, retry_delay, on_retry)
        self._conn: Connection | None = None
        self._core: ClientCore | None = None

    async def _make(self) -> Connection:
        target, token, token_file, connect_timeout = self._args[:4]
        retry, retry_delay, on_retry = self._retry
        retries = Retry(retry, retry_delay, time.monotonic())
        resolved = resolve_target(target, token=token, token_file=token_file)
        timeout = connect_timeout or resolved.connect_timeout
        while True:  # --retry: only connecting is tried again, no command has been sent yet
            try:
                return await self._attempt(
                    resolved.endpoint, resolved.token, resolved.name, timeout
                )
            except RexecError as exc:
                assert self._core is not None
                wait = retries.after(exc, self._core, time.monotonic(), jitter())
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, retries.done, wait)
                await asyncio.sleep(wait)

    async def _attempt(
        self, endpoint: Endpoint, token: Token, name: str, timeout: float
    ) -> Connection:
        """One attempt (for --retry): connect and authenticate within `timeout` seconds."""
        suite, trace = self._args[4], self._args[5]
        loop = asyncio.get_running_loop()
        attempts = ConnectAttempts(timeout, loop.time())
        while True:  # a busy server is tried again (ConnectAttempts decides)
            conn = Connection(endpoint, token, suite, trace, name)
            self._core = conn._core  # the attempt's core: did it send anything? (Retry.after)
            try:
                await conn._open(attempts.timeout, attempts.remaining(loop.time()))
                return conn
            except ServerRefused as exc:
                delay = attempts.retry_delay(exc, loop.time())
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._make().__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await self._make()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(
    target: str,
    *,
    token: str | Token | None = None,
    token_file: str | None = None,
    connect_timeout: float | None = None,
    suite: Suite = Suite.AESGCM,
    trace: TraceFn | None = None,
    retry: int = 0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    on_retry: RetryFn | None = None,
) -> Connecting:
    """Connect and authenticate to TARGET (host[:port], unix:/path or a config alias).

    `retry=N`: up to N more attempts when connecting fails before any command was sent
    (refused, unreachable, timed out, busy; never a failed authentication), with backoff
    from `retry_delay` seconds (rexec.client.connecting.Retry); `on_retry(error, n, wait)` hears
    of each.
    """
    return Connecting(
        target, token, token_file, connect_timeout, suite, trace, retry, retry_delay, on_retry
    )
