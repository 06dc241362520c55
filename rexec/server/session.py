"""One client connection on the server: its channel table, each channel bound to a process.

The session turns protocol events into calls on its channels: command channels
(rexec.server.command) and transfer channels (rexec.server.transfer), which it routes frames
to. It owes every channel an EXIT (and the audit log a record) whatever happens: a command
that cannot start gets ERROR + EXIT, a shutdown or a vanished client gets its processes killed.

The socket is read at all times, so a client's FIN, SIGNAL or PONG is seen at once however
stalled its commands (per-channel flow control: rexec.server.command).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

from rexec.errors import AuthError, ErrorCode, ProtocolError, RexecError
from rexec.protocol.events import (
    Authenticated,
    CloseReceived,
    CreditReceived,
    ErrorReceived,
    Event,
    ExecReceived,
    ExecRejected,
    SignalReceived,
    StdinClosed,
    StdinReceived,
    WindowChanged,
    XferReceived,
)
from rexec.protocol.notice import RefusalCode
from rexec.protocol.server import ServerConnection
from rexec.server.admission import MAX_LINGERING, REFUSAL_LINGER, source_key
from rexec.server.command import ChannelRun, refuse, start_command
from rexec.server.context import ServerContext
from rexec.server.transfer import ServerTransfer
from rexec.server.transfer import start as start_transfer
from rexec.transport import FramedProtocol

END_WAIT = 0.7  # a revoked/expired token's connection: how long its killed commands may take
_conn_ids = itertools.count(1)


class _Protocol(FramedProtocol):
    def __init__(self, session: Session) -> None:
        super().__init__(session.conn, session.on_events, session.on_lost)
        self._session: Session | None = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # from here the context holds the session; a reference back would be a cycle
        session, self._session = self._session, None
        assert session is not None
        session.started()


class Session:
    """Per-connection state; `protocol` is what asyncio's server drives."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.id = f"c{next(_conn_ids)}"
        self.conn = ServerConnection(ctx.store.lookup, ctx.info, suites=ctx.suites, trace=None)
        self.protocol = _Protocol(self)
        self.runs: dict[int, ChannelRun] = {}
        self.transfers: dict[int, ServerTransfer] = {}  # the runs that are transfer channels
        self.log = ctx.log.bind(conn=self.id)
        self.key_id = ""
        self.key_name: str | None = None
        self.authenticated = False
        self.lost = False
        self.closing = False
        self.ending: str | None = None  # why the token stopped being valid, once it has
        self._timer: asyncio.TimerHandle | None = None
        self._ping_at: float | None = None  # when we PINGed a silent client, until it answers
        self._idle_since = 0.0  # when the last command ended: idle time counts from there
        self._first_timer: asyncio.TimerHandle | None = None
        self.source = "?"
        self._lingering = False
        self.done = asyncio.Event()

    @property
    def peer(self) -> str:
        return self.protocol.peer

    @property
    def peer_host(self) -> str:
        peer = self.peer
        if peer.startswith("["):
            return peer[1 : peer.index("]")]
        return peer.rsplit(":", 1)[0] if ":" in peer else peer

    # ---- lifecycle -----------------------------------------------------------------

    def started(self) -> None:
        ctx = self.ctx
        transport = self.protocol.transport
        assert transport is not None
        self.source = source_key(
            transport.get_extra_info("socket"), transport.get_extra_info("peername")
        )
        self.log = self.log.bind(peer=self.peer)
        loop = asyncio.get_running_loop()
        ctx.sessions.add(self)
        refusal = ctx.admit(self)
        if refusal is not None:
            self.log.warning("connection refused", reason=refusal.reason, source=self.source)
            self.conn.refuse(refusal.code, refusal.retry_after)  # tell it why, then close
            self._close_refused()
            return
        limits = ctx.config.limits
        self._timer = loop.call_later(limits.handshake_timeout, self._handshake_expired)
        self._first_timer = loop.call_later(limits.first_flight_timeout, self._first_flight_expired)

    def _close_refused(self) -> None:
        """Send the queued refusal notice and close; half-close and linger first, if few
        others do (admission.REFUSAL_LINGER says why)."""
        self.protocol.flush()
        transport = self.protocol.transport
        ctx = self.ctx
        if ctx.lingering >= MAX_LINGERING or transport is None or not transport.can_write_eof():
            self.protocol.close()
            return
        ctx.lingering += 1
        self._lingering = True
        transport.write_eof()  # its bytes or EOF end the connection (a refused conn reads none)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSAL_LINGER, self.protocol.abort)

    def _first_flight_expired(self) -> None:
        """HELLO and message 1 go out together at connect: a peer still short of them is
        idle or trickling bytes to hold a handshake slot."""
        if not self.conn.handshake_done and not self.lost:
            self.log.warning(
                "first flight deadline hit; dropping connection",
                timeout=self.ctx.config.limits.first_flight_timeout,
            )
            self.protocol.abort()

    def _handshake_expired(self) -> None:
        if not self.authenticated and not self.lost:
            self.log.warning(
                "handshake deadline hit; dropping connection",
                timeout=self.ctx.config.limits.handshake_timeout,
            )
            self.protocol.abort()

    def _arm_idle(self) -> None:
        """(Re)start the liveness watch: idle timeout, or keepalive while commands run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.lost and self.authenticated:
            self._idle_check()

    def _idle_check(self) -> None:
        """Without commands, a connection silent for idle_timeout is closed. With commands,
        a client silent for `keepalive` is PINGed and, silent as long again, dropped (its
        commands killed): a running command is no proof the client is still there."""
        limits = self.ctx.config.limits
        loop = asyncio.get_running_loop()
        now = loop.time()
        last = self.protocol.last_rx
        if self._ping_at is not None and last > self._ping_at:
            self._ping_at = None  # it answered (any byte will do)
        if self.runs and limits.keepalive > 0:
            keepalive = limits.keepalive
            if self._ping_at is not None:
                if now - self._ping_at >= keepalive:
                    silent = now - last
                    self.log.warning(
                        "client stopped responding; dropping it", silent=round(silent, 1)
                    )
                    self.protocol.drop(f"client silent for {silent:.0f}s while commands ran")
                    return
                due = self._ping_at + keepalive
            elif now - last >= keepalive:
                self._ping_at = now
                self.conn.send_ping(b"keepalive")
                self.protocol.flush()
                due = now + keepalive
            else:
                due = last + keepalive
        elif not self.runs and limits.idle_timeout > 0:
            idle = limits.idle_timeout
            last = max(last, self._idle_since)
            if now - last >= idle:
                self.log.info("idle timeout; closing connection", idle_timeout=idle)
                self.conn.farewell(ErrorCode.IDLE_TIMEOUT, f"idle for {idle:g}s")
                self.protocol.flush()
                self.protocol.close()
                return
            due = last + idle
        else:
            return
        self._timer = loop.call_at(due, self._idle_check)

    def on_lost(self, error: RexecError | None) -> None:
        self.lost = True
        for timer in (self._timer, self._first_timer):
            if timer is not None:
                timer.cancel()
        ctx = self.ctx
        if self._lingering:
            self._lingering = False
            ctx.lingering -= 1
        if isinstance(error, AuthError):
            ctx.limiter.record_failure(self.source, time.monotonic())
            self.log.warning("authentication failed", reason=str(error))
        elif self.protocol.dropped is not None:
            self.log.warning(
                "connection dropped", reason=self.protocol.dropped, running=len(self.runs)
            )
        elif error is not None and self.runs:
            self.log.warning(
                "connection lost; killing its commands", reason=str(error), running=len(self.runs)
            )
        elif error is not None and not isinstance(error, ProtocolError):
            self.log.info("connection ended", reason=str(error))
        else:
            self.log.info("connection closed")
        for run in list(self.runs.values()):
            if run.execution is not None and not ctx.config.exec.keep_orphans:
                ctx.spawn(run.execution.kill())
            run.stdin.put_nowait(None)
            run.wake()
        ctx.unadmit(self)
        self._maybe_done()

    def running(self) -> int:
        return len(self.runs)

    async def kill_commands(self) -> None:
        for transfer in self.transfers.values():
            transfer.stop("server is shutting down", ErrorCode.SHUTDOWN)
        kills = [run.execution.kill() for run in list(self.runs.values()) if run.execution]
        await asyncio.gather(*kills, return_exceptions=True)

    def abort(self) -> None:
        self.protocol.abort()

    @property
    def token_key_id(self) -> bytes | None:
        return self.conn.key_id if self.authenticated else None

    def end_for_token(self, reason: str) -> None:
        """Revoked, expired or rotated out (ServerContext.check_tokens): SIGKILL the commands
        at once, give each its ERROR (AUTH, reason) and EXIT, then ERROR + CLOSE on channel 0.
        Whatever has not finished within END_WAIT ends without its EXIT (a truncation)."""
        if self.ending is not None or self.lost:
            return
        self.ending = reason
        self.closing = True
        self.log.warning("token no longer valid; closing", reason=reason, running=len(self.runs))
        for run in self.runs.values():
            if run.execution is not None:
                run.execution.signal(signal.SIGKILL)
                self.ctx.spawn(run.execution.kill())
        for transfer in self.transfers.values():
            transfer.stop(reason, ErrorCode.AUTH)
        self._close_if_idle()
        asyncio.get_running_loop().call_later(END_WAIT, self._end_now)

    def _end_now(self) -> None:
        if not self.lost:  # a command that outlived its SIGKILL (a pipe held elsewhere)
            self.conn.farewell(ErrorCode.AUTH, self.ending or "")
            self.protocol.flush()
            self.protocol.close()

    def _maybe_done(self) -> None:
        if self.lost and not self.runs and not self.done.is_set():
            self.ctx.sessions.discard(self)
            self.done.set()
            self.ctx.connection_ended()

    # ---- events --------------------------------------------------------------------

    def on_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, StdinReceived):
                self._stdin(event.channel, event.data)
            elif isinstance(event, CreditReceived):
                run = self.runs.get(event.channel)
                if run is not None:
                    run.wake()
            elif isinstance(event, ExecReceived):
                start_command(self, event.channel, event.request)
            elif isinstance(event, XferReceived):
                start_transfer(self, ChannelRun(event.channel, None), event.request)
            elif isinstance(event, StdinClosed):
                if (transfer := self.transfers.get(event.channel)) is not None:
                    transfer.feed(None)
                elif (run := self.runs.get(event.channel)) is not None:
                    run.stdin.put_nowait(None)
            elif isinstance(event, SignalReceived):
                run = self.runs.get(event.channel)
                if run is not None and run.execution is not None:
                    self.log.info("signal", channel=event.channel, signum=event.signum)
                    run.execution.signal(event.signum)
            elif isinstance(event, WindowChanged):
                self._window(event.channel, event.rows, event.cols)
            elif isinstance(event, ExecRejected):
                refuse(self, event.channel, ErrorCode.BAD_REQUEST, event.reason, None)
            elif isinstance(event, Authenticated):
                self._authenticated(event.key_id)
            elif isinstance(event, CloseReceived):
                self._client_closed()
            elif isinstance(event, ErrorReceived):
                self.log.info("client error", code=event.code, message=event.message[:200])
        self.protocol.flush()

    def _authenticated(self, key_id: bytes) -> None:
        self.authenticated = True
        self.key_id = key_id.hex()
        self.key_name = self.ctx.store.name_for(key_id)
        self.log = self.log.bind(key_id=self.key_id)
        self.log.info("authenticated", key_name=self.key_name)
        self.ctx.authenticated(self)
        self._arm_idle()

    def _client_closed(self) -> None:
        """The client said CLOSE: it wants nothing more, so stop its commands and close."""
        self.closing = True
        for run in self.runs.values():
            if run.execution is not None:
                self.ctx.spawn(run.execution.kill())
        for transfer in self.transfers.values():
            transfer.stop("the client closed the connection")
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.closing and not self.runs and not self.lost:
            if self.ending is not None:
                self.conn.farewell(ErrorCode.AUTH, self.ending)
            else:
                self.conn.send_close()
            self.protocol.flush()
            self.protocol.close()

    def shutdown_close(self) -> None:
        """Server shutdown, after every command here has its EXIT: say so and close."""
        if not self.lost:
            if self.authenticated:
                self.conn.farewell(ErrorCode.SHUTDOWN, "server is shutting down")
                self.protocol.flush()
                self.protocol.close()
            elif self.conn.refuse(RefusalCode.SHUTTING_DOWN):  # before message 2: say so
                self._close_refused()
            else:
                self.protocol.abort()

    def _window(self, channel: int, rows: int, cols: int) -> None:
        """WINDOW: resize a pty command's terminal (ignored for a command without a pty)."""
        run = self.runs.get(channel)
        if run is None or run.request is None or run.request.pty is None:
            return
        if run.execution is not None:
            run.execution.resize(rows, cols)
        else:
            run.window = (rows, cols)

    # ---- stdin ---------------------------------------------------------------------

    def _stdin(self, channel: int, data: bytes | bytearray) -> None:
        """Queue stdin for the command; the protocol bounds it by the channel's window."""
        if (transfer := self.transfers.get(channel)) is not None:
            transfer.feed(data)  # a transfer's record: its task takes it (and credits it)
            return
        run = self.runs.get(channel)
        if run is None:
            return
        if run.stdin_queued == 0 and run.execution is not None:  # a key: straight in
            n = run.execution.write_stdin_now(data)
            if n:  # credited back; on_events flushes once for all its events
                self.conn.stdin_consumed(channel, n)
            data = data[n:]
            if not data:
                return
        run.stdin_queued += 1
        run.stdin.put_nowait(data)

    def channel_ended(self, channel: int) -> None:
        """A command's or transfer's channel has its EXIT (or never will): forget it."""
        self.runs.pop(channel, None)
        if not self.runs:
            self._idle_since = asyncio.get_running_loop().time()
            self._arm_idle()  # from the keepalive watch back to the idle timeout
        self._close_if_idle()
        self._maybe_done()
        self.ctx.channel_finished()

    def arm_idle(self) -> None:
        """A first channel opened: from the idle timeout to the keepalive watch."""
        self._arm_idle()
