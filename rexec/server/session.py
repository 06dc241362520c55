"""One client connection on the server: its channel table, each channel bound to a process.

The session turns protocol events into exec-layer calls and process output into frames.
It owes every channel an EXIT (and the audit log a record) whatever happens: a command that
cannot start gets ERROR + EXIT, a shutdown or a vanished client gets its processes killed.

Flow control, per channel: stdin waits here (at most the channel's window) until the pipe
takes it, and only then is it credited back to the client; output leaves the pipe only when
the client's window for that channel has room and the socket is draining. The socket is read
at all times, so a client's FIN, SIGNAL or PONG is seen at once however stalled its commands.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from dataclasses import dataclass, field

from rexec.errors import AuthError, ErrorCode, ExecError, ProtocolError, RexecError
from rexec.log import AuditRecord
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
    Stream,
    WindowChanged,
    XferReceived,
)
from rexec.protocol.frames import HEADROOM
from rexec.protocol.messages import ExitStatus
from rexec.protocol.models import ExecRequest
from rexec.protocol.notice import RefusalCode
from rexec.protocol.server import ServerConnection
from rexec.server.admission import MAX_LINGERING, REFUSAL_LINGER, source_key
from rexec.server.config import env_allowed
from rexec.server.context import ServerContext
from rexec.server.exec import ExecOutcome, ExecSpec, Execution
from rexec.server.policy import Decision, resolve_cwd
from rexec.server.transfer import ServerTransfer
from rexec.server.transfer import start as start_transfer
from rexec.transport import FramedProtocol

EXIT_NOT_STARTED = 255
END_WAIT = 0.7  # a revoked/expired token's connection: how long its killed commands may take
_conn_ids = itertools.count(1)


@dataclass
class ChannelRun:
    """A command in flight: its request, its process once started, its stdin queue (at most
    the channel's stdin window), and the output sink's wait for credit."""

    channel: int
    request: ExecRequest | None
    execution: Execution | None = None
    stdin: asyncio.Queue[bytes | bytearray | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    stdin_task: asyncio.Task[None] | None = None
    decision: Decision | None = None  # the token policy's verdict, with the spec to run
    credit: asyncio.Future[None] | None = None

    async def wait_credit(self) -> None:
        """Until the client grants more output window (both output pumps may wait)."""
        if self.credit is None:
            self.credit = asyncio.get_running_loop().create_future()
        await self.credit

    def wake(self) -> None:
        credit, self.credit = self.credit, None
        if credit is not None and not credit.done():
            credit.set_result(None)

    window: tuple[int, int] | None = None  # a pty's size from WINDOW before it started
    stdin_queued: int = 0  # stdin chunks queued or being written (0: may write directly)


class _ChannelSink:
    """Where a channel's output goes: to the client as its window and the socket allow."""

    __slots__ = ("channel", "session")

    def __init__(self, session: Session, channel: int) -> None:
        self.session = session
        self.channel = channel

    async def __call__(self, stream: Stream, data: bytearray) -> None:
        # by channel, not `run`: run -> execution -> sink -> run would be a cycle
        await self.session._output(self.channel, stream, data)

    def send_now(self, stream: Stream, data: bytearray) -> bool:
        """Send at once (a keystroke's echo) if the window has room and nothing waits to be
        written; else False. `data` is a buffer behind HEADROOM free bytes, as for _output."""
        session, channel = self.session, self.channel
        conn = session.conn
        if session.lost or not conn.may_send or channel not in conn.channels:
            return True  # nobody to send it to: dropped, as _output drops it
        transport = session.protocol.transport
        if conn.output_room(channel) < len(data) - HEADROOM or (
            transport is None or transport.get_write_buffer_size()
        ):
            return False
        conn.send_output_buffer(channel, stream, data)
        session.protocol.flush()
        return True


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
                self._exec(event.channel, event.request)
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
                self._refuse(event.channel, ErrorCode.BAD_REQUEST, event.reason, None)
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

    def _stdin_consumed(self, channel: int, n: int) -> None:
        """The pipe took (or dropped) n bytes: credit them back to the client."""
        if not self.lost and n:
            self.conn.stdin_consumed(channel, n)
            self.protocol.flush()

    async def _feed_stdin(self, run: ChannelRun, execution: Execution) -> None:
        while True:
            data = await run.stdin.get()
            if data is None:
                break
            try:
                await execution.write_stdin(data)
            finally:
                run.stdin_queued -= 1
                self._stdin_consumed(run.channel, len(data))
        await execution.close_stdin()

    # ---- exec ----------------------------------------------------------------------

    def _refuse(
        self,
        channel: int,
        code: ErrorCode,
        reason: str,
        req: ExecRequest | None,
        decision: Decision | None = None,
    ) -> None:
        self.log.warning("command refused", channel=channel, code=code.name, reason=reason)
        self.conn.send_channel_error(channel, code, reason)
        self.conn.send_exit(channel, ExitStatus(EXIT_NOT_STARTED))
        error = f"{code.name.lower()}: {reason}"
        self._audit(channel, req, time.time(), None, error=error, decision=decision)

    def _exec(self, channel: int, req: ExecRequest) -> None:
        ctx = self.ctx
        limits = ctx.config.limits
        if ctx.shutting_down:
            self._refuse(channel, ErrorCode.SHUTDOWN, "server is shutting down", req)
            return
        if self.ending is not None:
            self._refuse(channel, ErrorCode.AUTH, self.ending, req)
            return
        if (refusal := ctx.exec_refusal()) is not None:  # audit_failure = "refuse"
            return self._refuse(channel, *refusal, req)
        if len(self.runs) >= limits.max_channels:
            self._refuse(
                channel,
                ErrorCode.LIMIT,
                f"too many commands on this connection (max_channels={limits.max_channels})",
                req,
            )
            self.log.warning("limit hit: max_channels", max_channels=limits.max_channels)
            return
        assert self.conn.key_id is not None
        try:
            decision = ctx.check_policy(
                self.conn.key_id, req, self.peer, self.peer_host, self._spec(req)
            )
        except Exception as exc:  # a bug must not cost the channel its EXIT
            self.log.exception("policy check crashed", channel=channel)
            self._refuse(channel, ErrorCode.INTERNAL, f"internal error: {exc!r}", req)
            return
        if not decision.allowed:
            self._refuse(channel, ErrorCode.POLICY, decision.reason, req, decision)
            return
        allowlist = (*ctx.config.exec.env_allowlist, *decision.extra_env)
        denied = sorted(k for k in req.env if not env_allowed(k, allowlist))
        if denied:
            self._refuse(
                channel,
                ErrorCode.BAD_REQUEST,
                f"environment variable(s) not allowed by the server: {', '.join(denied)}",
                req,
                decision,
            )
            return
        run = ChannelRun(channel, req, decision=decision)
        self.runs[channel] = run
        run.task = ctx.spawn(self._run(run))
        if len(self.runs) == 1:
            self._arm_idle()  # from the idle timeout to the keepalive watch

    def _spec(self, req: ExecRequest) -> ExecSpec:
        ctx = self.ctx
        limits = ctx.config.limits
        timeout = req.timeout or (limits.default_timeout or None)
        if limits.max_timeout > 0:
            timeout = min(timeout or limits.max_timeout, limits.max_timeout)
        argv = (
            req.argv if req.argv is not None else (ctx.config.exec.shell, "-c", req.command or "")
        )
        env = dict(ctx.base_env)
        env.update(req.env)
        cwd = resolve_cwd(req.cwd or None, env.get("HOME"))
        return ExecSpec(
            argv=tuple(argv),
            env=env,
            cwd=cwd,
            stdin=req.stdin,
            timeout=timeout,
            kill_grace=limits.kill_grace,
            headroom=HEADROOM,
            pty=req.pty.request() if req.pty is not None else None,
        )

    async def _run(self, run: ChannelRun) -> None:
        req = run.request
        assert req is not None
        channel = run.channel
        start = time.time()
        outcome: ExecOutcome | None = None
        error: str | None = None
        try:
            spec = run.decision.spec if run.decision and run.decision.spec else self._spec(req)

            try:
                execution = await Execution.start(spec, _ChannelSink(self, channel))
            except ExecError as exc:
                error = str(exc)
                code = 127 if "not found" in error else 126
                if not self.lost:
                    self.conn.send_channel_error(channel, ErrorCode.EXEC_FAILED, error)
                    self.conn.send_exit(channel, ExitStatus(code))
                    self.protocol.flush()
                self.log.info("command failed to start", channel=channel, reason=error)
                return
            run.execution = execution
            if run.window is not None:
                execution.resize(*run.window)
            self.log.info("command started", channel=channel, pid=execution.pid)
            if self.lost or self.ending is not None:
                execution.signal(signal.SIGKILL)
                await execution.kill()
            if req.stdin:
                run.stdin_task = self.ctx.spawn(self._feed_stdin(run, execution))
            outcome = await execution.wait()
            if run.stdin_task is not None:
                run.stdin.put_nowait(None)
            status = ExitStatus(
                outcome.exit_code, outcome.signal, outcome.timed_out, outcome.duration
            )
            if self.ending is not None:
                error = f"killed: {self.ending}"
            if not self.lost:
                if self.ending is not None:
                    self.conn.send_channel_error(channel, ErrorCode.AUTH, self.ending)
                self.conn.send_exit(channel, status)
                self.protocol.flush()
            self.log.info(
                "command finished",
                channel=channel,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                timed_out=outcome.timed_out,
                duration=round(outcome.duration, 6),
            )
        except Exception as exc:  # never lose the EXIT we owe, even on a bug
            error = f"internal error: {exc!r}"
            self.log.exception("command crashed", channel=channel)
            if not self.lost and channel in self.conn.channels:
                self.conn.send_channel_error(channel, ErrorCode.INTERNAL, error)
                self.conn.send_exit(channel, ExitStatus(EXIT_NOT_STARTED))
                self.protocol.flush()
        finally:
            self._audit(channel, req, start, outcome, error=error, decision=run.decision)
            if run.stdin_task is not None:
                run.stdin.put_nowait(None)
                await asyncio.gather(run.stdin_task, return_exceptions=True)
            while not run.stdin.empty():  # stdin the command never took: free it now
                run.stdin.get_nowait()
            self.channel_ended(channel)

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

    async def _output(self, channel: int, stream: Stream, buf: bytearray) -> None:
        """Send one chunk of output (a buffer behind HEADROOM free bytes) as the client's
        window for the channel allows; returns once it is all queued and the socket drains.

        The chunk goes out framed in place; only a part cut off by a short window is copied.
        """
        conn, run = self.conn, self.runs.get(channel)
        if run is None:
            return
        while not self.lost and conn.may_send and len(buf) > HEADROOM:
            room = conn.output_room(channel)
            if room <= 0:
                if channel not in conn.channels:
                    return
                await run.wait_credit()
                continue
            size = len(buf) - HEADROOM
            if room >= size:
                conn.send_output_buffer(channel, stream, buf)
                buf = bytearray(HEADROOM)
            else:
                with memoryview(buf) as view:
                    conn.send_output(channel, stream, view[HEADROOM : HEADROOM + room])
                del buf[:room]  # the sent bytes' tail becomes the rest's headroom
            self.protocol.flush()
            try:
                await self.protocol.drain()
            except RexecError:
                return

    def _audit(
        self,
        channel: int,
        req: ExecRequest | None,
        start: float,
        outcome: ExecOutcome | None,
        *,
        error: str | None = None,
        decision: Decision | None = None,
    ) -> None:
        record = AuditRecord(
            conn=self.id,
            peer=self.peer,
            key_id=self.key_id,
            key_name=self.key_name,
            channel=channel,
            argv=req.argv if req is not None else None,
            command=req.command if req is not None else None,
            cwd=req.cwd if req is not None else None,
            env=tuple(req.env) if req is not None else (),
            start=start,
            duration=outcome.duration if outcome else time.time() - start,
            exit_code=outcome.exit_code if outcome else None,
            signal=outcome.signal if outcome else None,
            timed_out=outcome.timed_out if outcome else False,
            bytes_out=outcome.stdout_bytes if outcome else 0,
            bytes_err=outcome.stderr_bytes if outcome else 0,
            error=error,
            extra={
                **({"policy": decision.audit()} if decision is not None else {}),
                **({"pty": req.pty.term} if req is not None and req.pty is not None else {}),
            },
        )
        self.ctx.audit_write(record)
