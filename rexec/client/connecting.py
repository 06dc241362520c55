"""Connecting, for both client drivers: what a failed attempt is called, and whether and when
to try again. Sans-I/O like rexec.client.core (its other half): the drivers connect, sleep
and pass the time in; the rules are here, once.

- a connect() the OS refused is `ConnectionLost` in the errno's words (`connect_failed`), a
  deadline that expires is `ConnectTimeout` (`connect_timed_out`: in connect(), or in the
  handshake, saying whether the server answered at all);
- a "busy" server is tried again a few times within one connect deadline (`ConnectAttempts`);
- retries (`Retry`): whether and when to connect again after a failed attempt. Only a
  connection that never sent an EXEC is retried: the drivers wrap nothing but connect()
  (socket and handshake) in the retry loop, and `Retry.after` refuses a core that started
  a command, so a command never runs twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from rexec.errors import (
    AuthError,
    ConnectionLost,
    ConnectTimeout,
    LocalProtocolError,
    NotRexecServer,
    ProtocolError,
    RexecError,
    ServerRefused,
)
from rexec.protocol.notice import RefusalCode, busy_retry_delay, stalled_handshake

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path
if TYPE_CHECKING:
    from rexec.client.core import ClientCore

DEFAULT_RETRY_DELAY = 1.0  # seconds before the first retry; each next wait doubles
RETRY_WAIT_MAX = 30.0  # no wait between two attempts is longer (a ServerRefused's too)
RETRY_TOTAL = 300.0  # no attempt starts later than this after the first one


def connect_failed(endpoint: object, exc: OSError) -> ConnectionLost:
    """The error for a connect() the OS refused (one wording for both drivers: asyncio's
    own "Connect call failed (...)" text is replaced by the errno's, as the socket says it)."""
    code = exc.errno
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else exc.strerror
    return ConnectionLost(f"cannot connect to {endpoint}: {reason or exc}")


def connect_timed_out(
    endpoint: object, timeout: float, *, connected: bool, received: int = 0
) -> ConnectTimeout:
    """The error for the client's connect deadline: in connect(), or in the handshake (then
    `received`, the bytes of the server's reply in so far, says whether it answered at all)."""
    if connected:
        return ConnectTimeout(stalled_handshake(str(endpoint), timeout, received))
    return ConnectTimeout(f"connecting to {endpoint} timed out after {timeout:g}s")


class ConnectAttempts:
    """One connect deadline over every attempt: a server that says it is busy is tried again
    (notice.busy_retry_delay: a few times, with jitter), never past the deadline. The drivers
    sleep and reconnect, each attempt with a fresh ClientCore."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout  # the figure a ConnectTimeout names
        self.deadline = now + timeout
        self.retries = 0
        self.refused: ServerRefused | None = None  # the refusal that led to the retry

    def remaining(self, now: float) -> float:
        return self.deadline - now

    def retry_delay(self, exc: ServerRefused, now: float) -> float | None:
        """Seconds to wait before the next attempt after `exc`, or None: raise it."""
        delay = busy_retry_delay(exc, self.retries, self.deadline - now)
        if delay is not None:
            self.retries += 1
            self.refused = exc
        return delay

    def timed_out(self, exc: ConnectTimeout) -> RexecError:
        """The error to raise when an attempt ran out of time: after a busy refusal, that
        refusal (the server's own word, and why there was little time left), else `exc`."""
        return self.refused if self.refused is not None else exc


RetryFn = Callable[[RexecError, int, float], object]  # (error, retry number, wait) per retry
_PASSING_REFUSALS = frozenset(
    {RefusalCode.BUSY, RefusalCode.RATE_LIMITED, RefusalCode.SHUTTING_DOWN}
)


def retryable(exc: BaseException) -> bool:
    """A failure to connect that another attempt may not meet: refused or unreachable, a
    connect or handshake timeout, a busy, rate-limited or stopping server, a handshake broken
    off.

    Never an authentication failure (a wrong token stays wrong, and every attempt counts
    against the server's failed-auth limit), a config or usage error, a non-rexec server, nor
    a refusal that stays (a cipher suite or protocol version the server does not take).
    """
    if isinstance(exc, ServerRefused):
        return exc.code in _PASSING_REFUSALS
    if isinstance(exc, AuthError | LocalProtocolError | NotRexecServer):
        return False
    return isinstance(exc, ConnectionLost | ProtocolError)


class Retry:
    """When to connect again after a failed attempt: exponential backoff with jitter, bounded.

    Sans-I/O, as the rest of this module: a driver asks `after()` and does the waiting. The
    n-th retry waits `delay * 2**(n-1)`, plus up to half of that at random (clients that
    failed together do not come back together), at most RETRY_WAIT_MAX, and no less than a
    refusal's `retry_after`; none starts past RETRY_TOTAL seconds after the first attempt.
    """

    def __init__(self, retries: int, delay: float, now: float) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retry must be a whole number >= 0, got {retries!r}")
        if not (delay > 0 and math.isfinite(delay)):
            raise ValueError(f"retry_delay must be a positive number of seconds, got {delay!r}")
        self.retries = retries
        self.delay = float(delay)
        self.done = 0  # retries made so far
        self._first = now

    def after(
        self, exc: BaseException, core: ClientCore, now: float, jitter: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise `exc`.

        `core` is the failed attempt's: once it sent an EXEC, the command may have run, and
        nothing is retried (the drivers only retry connect(), so this is a safety net).
        `jitter` is a random number in [0, 1) (the driver's, as the time is).
        """
        if self.done >= self.retries or core.exec_sent or not retryable(exc):
            return None
        wait = min(self.delay * 2.0 ** min(self.done, 16) * (1 + jitter / 2), RETRY_WAIT_MAX)
        retry_after: object = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > wait:
            wait = min(float(retry_after), RETRY_WAIT_MAX)
        if now + wait - self._first > RETRY_TOTAL:
            return None
        self.done += 1
        return wait
