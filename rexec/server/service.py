"""The asyncio server: listeners, admission limits, handshake deadlines, graceful shutdown.

Shutdown order is what makes "every client gets its EXIT" true: stop accepting, let running
commands finish within the grace period, kill the rest, wait until every channel has sent
its EXIT and written its audit record, then say CLOSE to each client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from rexec.address import Endpoint
from rexec.errors import AuditLogError, ConfigError
from rexec.heap import keep_heap
from rexec.log import AuditLog
from rexec.server.auth import TokenStore
from rexec.server.config import ServerConfig, unix_gid
from rexec.server.contain import Containment, use_containment
from rexec.server.context import ServerContext
from rexec.server.sdnotify import notify
from rexec.server.session import Session
from rexec.server.spawn import prepare_signals

FINAL_WAIT = 5.0  # after the last SIGKILL, how long EXITs may take to go out


class Server:
    """Owns the listeners; `start()` binds, `shutdown()` drains and closes."""

    def __init__(self, config: ServerConfig, store: TokenStore | None = None) -> None:
        self.config = config
        self.store = (
            store if store is not None else TokenStore.load(config.server.tokens, serving=True)
        )
        self.audit = AuditLog(config.server.audit_log)
        self.ctx: ServerContext | None = None
        self.containment: Containment | None = None
        self._servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        ctx = ServerContext(self.config, self.store, self.audit)
        self.ctx = ctx
        ctx.spawn(ctx.watch_tokens())
        exec_cfg = self.config.exec
        self.containment = Containment.start(exec_cfg.cgroup, exec_cfg.keep_orphans)
        use_containment(self.containment)

        try:
            await self._listen(ctx)
        except BaseException:  # nothing started may outlive a server that never ran
            for server in self._servers:
                server.close()
            self.containment.close()  # its cgroup mover may not call back into a closed loop
            raise
        self.containment.announce(ctx.log)
        ctx.log.info(
            "listening",
            addresses=self.addresses,
            token_count=len(self.store),
            suites=[s.label for s in ctx.suites],
        )
        return self.addresses

    async def _listen(self, ctx: ServerContext) -> None:
        """Bind every endpoint; a failure names the address (`cannot listen on ...`)."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.BaseProtocol:
            return Session(ctx).protocol

        for ep in self.config.server.endpoints:
            if ep.path is not None:
                path = Path(ep.path)
                if path.is_socket():
                    if _answers(path):  # another server's: taking the path would orphan it
                        raise _listen_error(ep, OSError(errno.EADDRINUSE, "in use"))
                    path.unlink()  # stale: left by a server that died
                old_umask = os.umask(0o177)  # born 0600: no moment when others may connect
                try:
                    server = await loop.create_unix_server(factory, str(path), backlog=256)
                except OSError as exc:
                    raise _listen_error(ep, exc) from None
                finally:
                    os.umask(old_umask)
                self._socket_access(path)
                self.addresses.append(f"unix:{path}")
            else:
                assert ep.port is not None
                try:
                    server = await loop.create_server(
                        factory, ep.host, ep.port, backlog=256, reuse_address=True
                    )
                except OSError as exc:
                    raise _listen_error(ep, exc) from None
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self.addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self._servers.append(server)

    def _socket_access(self, path: Path) -> None:
        """unix_group and unix_mode: who besides us may connect (connect needs write)."""
        cfg = self.config.server
        if cfg.unix_group is not None:
            try:
                gid = unix_gid(cfg.unix_group)
            except ValueError as exc:  # deleted since the config was read
                raise ConfigError(f"server.unix_group: {exc}") from None
            os.chown(path, -1, gid)
        os.chmod(path, cfg.unix_mode)

    def request_shutdown(self, grace: float | None = None) -> None:
        """Signal-handler entry: start the graceful shutdown once; a second call hurries it."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown(grace))
        elif self.ctx is not None:
            self.ctx.log.warning("second shutdown request: killing commands now")
            self._hurry = True

    _hurry = False

    def reopen_audit(self) -> None:
        """SIGHUP: reopen the audit log at its path (after logrotate moved the file away)."""
        log = self.ctx.log if self.ctx is not None else None
        try:
            self.audit.reopen()
        except AuditLogError as exc:
            if log is not None:
                log.error("audit log reopen failed", error=str(exc))
            return
        if log is not None:
            log.info("audit log reopened", audit_log=str(self.audit.path))

    async def shutdown(self, grace: float | None = None) -> None:
        ctx = self.ctx
        if ctx is None or ctx.shutting_down:
            await self._stopped.wait()
            return
        ctx.shutting_down = True
        _notify(ctx, "STOPPING=1\nSTATUS=shutting down")
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
            await asyncio.gather(
                *(s.kill_commands() for s in list(ctx.sessions)), return_exceptions=True
            )
        await ctx.wait_idle(self.config.limits.kill_grace + FINAL_WAIT)
        for session in list(ctx.sessions):
            session.shutdown_close()
        sessions_done = [s.done.wait() for s in list(ctx.sessions)]
        if sessions_done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*sessions_done), 2.0)
        for session in list(ctx.sessions):
            session.abort()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for ep in self.config.server.endpoints:
            if ep.path is not None:
                with contextlib.suppress(OSError):
                    Path(ep.path).unlink()
        ctx.flush_usage()
        self.audit.close()
        if self.containment is not None:
            self.containment.close()
        ctx.log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _answers(path: Path) -> bool:
    """Does something listen on this unix socket? Refused or gone: a stale path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # a full backlog, no permission: someone is there
            return True
        return True


def _listen_error(ep: Endpoint, exc: OSError) -> OSError:
    """`cannot listen on ADDRESS: reason`: asyncio's own text names no unix path."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OSError(f"cannot listen on {ep}: {reason}")


def _notify(ctx: ServerContext, message: str) -> None:
    """Tell systemd (Type=notify); a failure is logged, never fatal."""
    try:
        notify(message)
    except OSError as exc:
        ctx.log.warning("cannot notify the service manager", error=str(exc))


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
    prepare_signals()  # before any handler of ours: what we inherited as ignored gets caught
    server = Server(config)
    addresses = await server.start()
    # What start-up made (config, schemas, imported modules) lives as long as the server:
    # out of the collector's sight, a full collection walks only what connections make, so
    # its pause stays short (an interactive session's keystroke waits behind it).
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        on_ready(addresses)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_shutdown)
    loop.add_signal_handler(signal.SIGHUP, server.reopen_audit)
    if ready_file is not None:
        write_ready_file(ready_file, addresses)
    if server.ctx is not None:
        _notify(server.ctx, f"READY=1\nSTATUS=listening on {' '.join(addresses)}")
    try:
        await server.wait_stopped()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0
