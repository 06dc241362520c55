"""The asyncio server: listeners, admission limits, handshake deadlines, graceful shutdown.

Shutdown order is what makes "every client gets its EXIT" true: stop accepting, let running
commands finish within the grace period, kill the rest, wait until every channel has sent
its EXIT and written its audit record, then say CLOSE to each client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rexec import __version__
from rexec.auth import AuthRateLimiter, TokenStore
from rexec.config import ServerConfig
from rexec.errors import ConfigError
from rexec.heap import keep_heap
from rexec.log import AuditLog, AuditRecord, get_logger
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ServerInfo
from rexec.session import Session

FINAL_WAIT = 5.0  # after the last SIGKILL, how long EXITs may take to go out


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
        self.sessions: set[Session] = set()
        self._admitted: set[Session] = set()
        self._unauthenticated: set[Session] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self._channel_done = asyncio.Event()

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

    def admit(self, session: Session) -> str | None:
        """None to accept the new connection, else the reason to refuse it."""
        limits = self.config.limits
        if self.shutting_down:
            return "server is shutting down"
        if not self.limiter.allowed(session.peer_host, time.monotonic()):
            return f"too many failed authentications from {session.peer_host}"
        if len(self._admitted) >= limits.max_connections:
            self.log.warning("limit hit: max_connections", max_connections=limits.max_connections)
            return "max_connections reached"
        if len(self._unauthenticated) >= limits.max_unauthenticated:
            self.log.warning(
                "limit hit: max_unauthenticated", max_unauthenticated=limits.max_unauthenticated
            )
            return "max_unauthenticated reached"
        try:
            self.store.reload_if_changed()
        except ConfigError as exc:  # keep serving with the tokens we had
            self.log.error("token store reload failed; keeping the previous tokens", error=str(exc))
        self._admitted.add(session)
        self._unauthenticated.add(session)
        return None

    def authenticated(self, session: Session) -> None:
        self._unauthenticated.discard(session)

    def unadmit(self, session: Session) -> None:
        self._admitted.discard(session)
        self._unauthenticated.discard(session)

    def audit_write(self, record: AuditRecord) -> None:
        try:
            self.audit.write(record)
        except (OSError, ValueError) as exc:
            self.log.error("audit log write failed", error=str(exc))

    def channel_finished(self) -> None:
        self._channel_done.set()

    def running(self) -> int:
        return sum(len(s.runs) for s in self.sessions)

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


class Server:
    """Owns the listeners; `start()` binds, `shutdown()` drains and closes."""

    def __init__(self, config: ServerConfig, store: TokenStore | None = None) -> None:
        self.config = config
        self.store = store if store is not None else TokenStore.load(config.server.tokens)
        self.audit = AuditLog(config.server.audit_log)
        self.ctx: ServerContext | None = None
        self._servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        ctx = ServerContext(self.config, self.store, self.audit)
        self.ctx = ctx
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.BaseProtocol:
            return Session(ctx).protocol

        for ep in self.config.server.endpoints:
            if ep.path is not None:
                path = Path(ep.path)
                if path.is_socket():
                    path.unlink()
                server = await loop.create_unix_server(factory, str(path), backlog=256)
                os.chmod(path, 0o600)
                self.addresses.append(f"unix:{path}")
            else:
                assert ep.port is not None
                server = await loop.create_server(
                    factory, ep.host, ep.port, backlog=256, reuse_address=True
                )
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self.addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self._servers.append(server)
        ctx.log.info(
            "listening",
            addresses=self.addresses,
            token_count=len(self.store),
            suites=[s.label for s in ctx.suites],
        )
        return self.addresses

    def request_shutdown(self, grace: float | None = None) -> None:
        """Signal-handler entry: start the graceful shutdown once; a second call hurries it."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown(grace))
        elif self.ctx is not None:
            self.ctx.log.warning("second shutdown request: killing commands now")
            self._hurry = True

    _hurry = False

    async def shutdown(self, grace: float | None = None) -> None:
        ctx = self.ctx
        if ctx is None or ctx.shutting_down:
            await self._stopped.wait()
            return
        ctx.shutting_down = True
        grace = self.config.limits.shutdown_grace if grace is None else grace
        for server in self._servers:
            server.close()
        ctx.log.info("shutting down", running=ctx.running(), grace=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while ctx.running() and not self._hurry and loop.time() < deadline:
            await ctx.wait_idle(min(0.25, max(0.0, deadline - loop.time())))
        if ctx.running():
            ctx.log.warning("grace period over; killing commands", running=ctx.running())
            kills = [
                run.execution.kill()
                for s in list(ctx.sessions)
                for run in list(s.runs.values())
                if run.execution is not None
            ]
            await asyncio.gather(*kills, return_exceptions=True)
        await ctx.wait_idle(self.config.limits.kill_grace + FINAL_WAIT)
        for session in list(ctx.sessions):
            session.shutdown_close()
        sessions_done = [s.done.wait() for s in list(ctx.sessions)]
        if sessions_done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*sessions_done), 2.0)
        for session in list(ctx.sessions):
            session.protocol.abort()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for ep in self.config.server.endpoints:
            if ep.path is not None:
                with contextlib.suppress(OSError):
                    Path(ep.path).unlink()
        self.audit.close()
        ctx.log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def write_ready_file(path: Path, addresses: list[str]) -> None:
    """Atomically publish the bound addresses, one per line, once we accept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{a}\n" for a in addresses))
    tmp.replace(path)


async def serve(
    config: ServerConfig,
    *,
    ready_file: Path | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit status."""
    keep_heap()
    server = Server(config)
    addresses = await server.start()
    if on_ready is not None:
        on_ready(addresses)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_shutdown)
    if ready_file is not None:
        write_ready_file(ready_file, addresses)
    try:
        await server.wait_stopped()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
