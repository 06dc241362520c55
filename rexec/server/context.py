"""What every session of one server shares: config, tokens, audit log, limits, counters.

Sessions appear here only as `Member`s (a Protocol), so this module does not import the
session module and the session module can import this one: no cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from rexec import __version__, heap
from rexec.errors import AuditLogError, ConfigError, ErrorCode
from rexec.log import AuditLog, AuditRecord, get_logger
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ServerInfo
from rexec.protocol.models import ExecRequest
from rexec.protocol.notice import RefusalCode
from rexec.protocol.server import ServerConnection
from rexec.server.admission import BUSY_RETRY_AFTER, Admission, Refusal
from rexec.server.auth import REVOKED, AuthRateLimiter, TokenStore
from rexec.server.config import ServerConfig
from rexec.server.policy import Decision, evaluate
from rexec.server.spawn import ExecSpec
from rexec.server.usage import LastUsed, Learned
from rexec.transport import FramedProtocol

TOKEN_CHECK = 0.5  # seconds between token checks: revocation and expiry act within ~1 s


class Member(Protocol):
    """What the context needs of a session."""

    @property
    def peer_host(self) -> str: ...

    @property
    def source(self) -> str:
        """What per-source limits count it under (admission.source_key)."""
        ...

    @property
    def done(self) -> asyncio.Event:
        """Set once the connection is gone and every channel has its EXIT."""
        ...

    def running(self) -> int:
        """How many commands run on this connection."""
        ...

    async def kill_commands(self) -> None:
        """Kill every command of this connection (shutdown's grace period is over)."""
        ...

    def shutdown_close(self) -> None:
        """Say the server is shutting down, and close."""
        ...

    def abort(self) -> None:
        """Drop the connection now."""
        ...

    @property
    def token_key_id(self) -> bytes | None:
        """The key id this connection authenticated with; None before AUTH."""
        ...

    def end_for_token(self, reason: str) -> None:
        """Its token stopped being valid (revoked, expired, rotated out): kill, say why, close."""
        ...


class ChannelHost(Protocol):
    """What a channel, command (server.command) or transfer (server.transfer), uses of its
    session: the session imports those modules, so they see it through this."""

    log: Any
    id: str
    key_id: str
    key_name: str | None
    lost: bool
    ending: str | None

    @property
    def ctx(self) -> ServerContext: ...
    @property
    def conn(self) -> ServerConnection: ...
    @property
    def protocol(self) -> FramedProtocol: ...
    @property
    def peer(self) -> str: ...
    @property
    def peer_host(self) -> str: ...
    def channel_ended(self, channel: int) -> None: ...
    def arm_idle(self) -> None: ...


def _base_env(config: ServerConfig) -> dict[str, str]:
    """The environment every command starts from: who we are, then the config's base_env."""
    user = pwd.getpwuid(os.getuid())
    env = {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": config.exec.shell,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(config.exec.base_env)
    return env


class ServerContext:
    """What every session shares: config, token store, audit log, limits and counters."""

    def __init__(self, config: ServerConfig, store: TokenStore, audit: AuditLog) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.log = get_logger()
        limits = config.limits
        self.limiter = AuthRateLimiter(limits.auth_failures, limits.auth_window)
        self.admission = Admission(
            limits.max_unauthenticated,
            limits.drop_start,
            limits.unauthenticated_drop_rate,
            limits.per_source,
        )
        self.suites = config.server.allowed_suites()
        self.base_env = _base_env(config)
        user = pwd.getpwuid(os.getuid()).pw_name
        self.info = ServerInfo(
            server=f"rexec {__version__}",
            user=user,
            host=socket.gethostname(),
            max_payload=MAX_PAYLOAD,
            max_channels=limits.max_channels,
            default_timeout=limits.default_timeout or None,
            max_timeout=limits.max_timeout or None,
        )
        self.sessions: set[Member] = set()
        self._admitted: set[Member] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self.lingering = 0  # refused connections waiting for their peer's close
        self._channel_done = asyncio.Event()
        self._trim: asyncio.TimerHandle | None = None
        self.last_used = LastUsed(store.used_path)
        self.learned = Learned(store.learned_path)
        self.log_disabled_tokens()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task we keep a reference to (and whose crash is logged, never lost)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed", error=repr(task.exception()))

    def admit(self, session: Member) -> Refusal | None:
        """None to accept the new connection, else why it is refused (and what to tell it)."""
        limits = self.config.limits
        if self.shutting_down:
            return Refusal(RefusalCode.SHUTTING_DOWN, 0, "server is shutting down")
        if not self.limiter.allowed(session.source, time.monotonic()):
            return Refusal(
                RefusalCode.RATE_LIMITED,
                limits.auth_window,  # an upper bound: the oldest failure may expire sooner
                f"too many failed authentications from {session.source}",
            )
        refusal: Refusal | None
        if len(self._admitted) >= limits.max_connections:
            refusal = Refusal(
                RefusalCode.BUSY,
                BUSY_RETRY_AFTER,
                "max_connections reached",
                "max_connections",
                limits.max_connections,
            )
        else:
            refusal = self.admission.enter(session, session.source)
        if refusal is not None:
            hit = {refusal.limit: refusal.value}
            self.log.warning(f"limit hit: {refusal.limit}", source=session.source, **hit)
            return refusal
        self.reload_tokens()
        self._admitted.add(session)
        return None

    def authenticated(self, session: Member) -> None:
        self.admission.leave(session)
        key_id = session.token_key_id
        name = self.store.name_for(key_id) if key_id is not None else None
        if name is not None:
            self.last_used.touch(name, time.time())

    # ---- tokens: reload, revocation and expiry, policy, usage -------------------------

    def reload_tokens(self) -> None:
        try:
            if self.store.reload_if_changed():
                self.log_disabled_tokens()
        except ConfigError as exc:  # keep serving with the tokens we had
            self.log.error("token store reload failed; keeping the previous tokens", error=str(exc))

    def log_disabled_tokens(self) -> None:
        for name, reason in self.store.disabled.items():
            self.log.error("token refused at load", key_name=name, reason=reason)

    async def watch_tokens(self) -> None:
        """The one place revocation, rotation overlap and expiry reach live connections:
        every TOKEN_CHECK s (an mtime poll, no inotify), reload the store if it changed and
        end each session whose key is no longer valid; flush last-used times now and then."""
        while not self.shutting_down:
            await asyncio.sleep(TOKEN_CHECK)
            self.check_tokens(time.time())

    def check_tokens(self, now: float) -> None:
        self.reload_tokens()
        for session in list(self.sessions):
            key_id = session.token_key_id
            if key_id is not None:
                reason = self.store.invalid_reason(key_id, now)
                if reason is not None:
                    session.end_for_token(reason)
        try:
            self.last_used.maybe_flush(now)
        except OSError as exc:
            self.log.error("last-used file write failed", error=str(exc))

    def flush_usage(self) -> None:
        """Shutdown: write the last-used times still in memory."""
        try:
            self.last_used.flush()
        except OSError as exc:
            self.log.error("last-used file write failed", error=str(exc))

    def check_policy(
        self, key_id: bytes, req: ExecRequest, peer: str, peer_host: str, spec: ExecSpec
    ) -> Decision:
        """The token's policy on one EXEC (rexec.server.policy); learn mode records here."""
        policy = self.store.policy_for(key_id)
        if policy is None:  # revoked a moment ago; check_tokens closes the session
            return Decision(False, "token", REVOKED)
        decision = evaluate(policy, req, peer, peer_host, spec)
        if decision.learn:
            name = self.store.name_for(key_id) or key_id.hex()
            try:
                if decision.plain is not None:  # learned as the argv it ran as
                    self.learned.record(name, decision.plain, None)
                else:
                    self.learned.record(name, req.argv, req.command)
            except OSError as exc:
                self.log.error("learned file write failed", error=str(exc))
        return decision

    def unadmit(self, session: Member) -> None:
        self._admitted.discard(session)
        self.admission.leave(session)

    def audit_write(self, record: AuditRecord) -> None:
        try:
            self.audit.write(record)
        except (AuditLogError, ValueError) as exc:
            self.log.error("audit log write failed", error=str(exc))

    def exec_refusal(self) -> tuple[ErrorCode, str] | None:
        """Why no new command may start now, or None: audit_failure = "refuse" and the audit
        log cannot take records (the command would run unrecorded)."""
        if self.config.server.audit_failure != "refuse":
            return None
        problem = self.audit.check()
        if problem is None:
            return None
        return ErrorCode.INTERNAL, f"audit log unavailable, commands refused: {problem}"

    def channel_finished(self) -> None:
        self._channel_done.set()

    def connection_ended(self) -> None:
        """Give the buffers a finished connection freed back to the OS within a second (one
        trim per second at most, however many connections end)."""
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(1.0, self._release)

    def _release(self) -> None:
        self._trim = None
        heap.release()

    def running(self) -> int:
        return sum(s.running() for s in self.sessions)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no command runs anywhere, or timeout; True if idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.running():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._channel_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._channel_done.wait(), min(remaining, 0.5))
        return True
