"""Command channels on the server (EXEC): admission, the run, stdin in and output out, audit.

This module owns a command channel the way rexec.server.transfer owns a transfer channel:
the session routes the channel's frames (stdin, credit, signals, window) and its run here;
the process itself is rexec.server.exec's. Every channel is owed an EXIT (and the audit log a
record) whatever happens: a command that cannot start gets ERROR + EXIT.

Flow control, per channel: stdin waits here (at most the channel's window) until the pipe
takes it, and only then is it credited back to the client; output leaves the pipe only when
the client's window for that channel has room and the socket is draining.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Protocol

from rexec.errors import ErrorCode, ExecError, RexecError
from rexec.log import AuditRecord
from rexec.protocol.events import Stream
from rexec.protocol.frames import HEADROOM
from rexec.protocol.messages import ExitStatus
from rexec.protocol.models import ExecRequest
from rexec.server.config import env_allowed
from rexec.server.context import ChannelHost
from rexec.server.exec import ExecOutcome, Execution
from rexec.server.policy import Decision, resolve_cwd
from rexec.server.spawn import ExecSpec

EXIT_NOT_STARTED = 255


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


class Session(ChannelHost, Protocol):
    """What a command channel uses of its Session (the session imports us, not we it)."""

    runs: dict[int, ChannelRun]


class _ChannelSink:
    """Where a channel's output goes: to the client as its window and the socket allow."""

    __slots__ = ("channel", "session")

    def __init__(self, session: Session, channel: int) -> None:
        self.session = session
        self.channel = channel

    async def __call__(self, stream: Stream, data: bytearray) -> None:
        # by channel, not `run`: run -> execution -> sink -> run would be a cycle
        await _output(self.session, self.channel, stream, data)

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


def refuse(
    session: Session,
    channel: int,
    code: ErrorCode,
    reason: str,
    req: ExecRequest | None,
    decision: Decision | None = None,
) -> None:
    """ERROR + EXIT for a command that will not run, and its audit record."""
    session.log.warning("command refused", channel=channel, code=code.name, reason=reason)
    session.conn.send_channel_error(channel, code, reason)
    session.conn.send_exit(channel, ExitStatus(EXIT_NOT_STARTED))
    error = f"{code.name.lower()}: {reason}"
    _audit(session, channel, req, time.time(), None, error=error, decision=decision)


def start_command(session: Session, channel: int, req: ExecRequest) -> None:
    """An EXEC arrived on `channel`: refuse it (ERROR + EXIT) or run it."""
    ctx = session.ctx
    limits = ctx.config.limits
    if ctx.shutting_down:
        refuse(session, channel, ErrorCode.SHUTDOWN, "server is shutting down", req)
        return
    if session.ending is not None:
        refuse(session, channel, ErrorCode.AUTH, session.ending, req)
        return
    if (refusal := ctx.exec_refusal()) is not None:  # audit_failure = "refuse"
        return refuse(session, channel, *refusal, req)
    if len(session.runs) >= limits.max_channels:
        refuse(
            session,
            channel,
            ErrorCode.LIMIT,
            f"too many commands on this connection (max_channels={limits.max_channels})",
            req,
        )
        session.log.warning("limit hit: max_channels", max_channels=limits.max_channels)
        return
    assert session.conn.key_id is not None
    try:
        decision = ctx.check_policy(
            session.conn.key_id, req, session.peer, session.peer_host, _spec(session, req)
        )
    except Exception as exc:  # a bug must not cost the channel its EXIT
        session.log.exception("policy check crashed", channel=channel)
        refuse(session, channel, ErrorCode.INTERNAL, f"internal error: {exc!r}", req)
        return
    if not decision.allowed:
        refuse(session, channel, ErrorCode.POLICY, decision.reason, req, decision)
        return
    allowlist = (*ctx.config.exec.env_allowlist, *decision.extra_env)
    denied = sorted(k for k in req.env if not env_allowed(k, allowlist))
    if denied:
        refuse(
            session,
            channel,
            ErrorCode.BAD_REQUEST,
            f"environment variable(s) not allowed by the server: {', '.join(denied)}",
            req,
            decision,
        )
        return
    run = ChannelRun(channel, req, decision=decision)
    session.runs[channel] = run
    run.task = ctx.spawn(_run(session, run))
    if len(session.runs) == 1:
        session.arm_idle()  # from the idle timeout to the keepalive watch


def _spec(session: Session, req: ExecRequest) -> ExecSpec:
    ctx = session.ctx
    limits = ctx.config.limits
    timeout = req.timeout or (limits.default_timeout or None)
    if limits.max_timeout > 0:
        timeout = min(timeout or limits.max_timeout, limits.max_timeout)
    argv = req.argv if req.argv is not None else (ctx.config.exec.shell, "-c", req.command or "")
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


async def _run(session: Session, run: ChannelRun) -> None:
    req = run.request
    assert req is not None
    channel = run.channel
    start = time.time()
    outcome: ExecOutcome | None = None
    error: str | None = None
    try:
        spec = run.decision.spec if run.decision and run.decision.spec else _spec(session, req)

        try:
            execution = await Execution.start(spec, _ChannelSink(session, channel))
        except ExecError as exc:
            error = str(exc)
            code = 127 if "not found" in error else 126
            if not session.lost:
                session.conn.send_channel_error(channel, ErrorCode.EXEC_FAILED, error)
                session.conn.send_exit(channel, ExitStatus(code))
                session.protocol.flush()
            session.log.info("command failed to start", channel=channel, reason=error)
            return
        run.execution = execution
        if run.window is not None:
            execution.resize(*run.window)
        session.log.info("command started", channel=channel, pid=execution.pid)
        if session.lost or session.ending is not None:
            execution.signal(signal.SIGKILL)
            await execution.kill()
        if req.stdin:
            run.stdin_task = session.ctx.spawn(_feed_stdin(session, run, execution))
        outcome = await execution.wait()
        if run.stdin_task is not None:
            run.stdin.put_nowait(None)
        status = ExitStatus(outcome.exit_code, outcome.signal, outcome.timed_out, outcome.duration)
        if session.ending is not None:
            error = f"killed: {session.ending}"
        if not session.lost:
            if session.ending is not None:
                session.conn.send_channel_error(channel, ErrorCode.AUTH, session.ending)
            session.conn.send_exit(channel, status)
            session.protocol.flush()
        session.log.info(
            "command finished",
            channel=channel,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            timed_out=outcome.timed_out,
            duration=round(outcome.duration, 6),
        )
    except Exception as exc:  # never lose the EXIT we owe, even on a bug
        error = f"internal error: {exc!r}"
        session.log.exception("command crashed", channel=channel)
        if not session.lost and channel in session.conn.channels:
            session.conn.send_channel_error(channel, ErrorCode.INTERNAL, error)
            session.conn.send_exit(channel, ExitStatus(EXIT_NOT_STARTED))
            session.protocol.flush()
    finally:
        _audit(session, channel, req, start, outcome, error=error, decision=run.decision)
        if run.stdin_task is not None:
            run.stdin.put_nowait(None)
            await asyncio.gather(run.stdin_task, return_exceptions=True)
        while not run.stdin.empty():  # stdin the command never took: free it now
            run.stdin.get_nowait()
        session.channel_ended(channel)


def _stdin_consumed(session: Session, channel: int, n: int) -> None:
    """The pipe took (or dropped) n bytes: credit them back to the client."""
    if not session.lost and n:
        session.conn.stdin_consumed(channel, n)
        session.protocol.flush()


async def _feed_stdin(session: Session, run: ChannelRun, execution: Execution) -> None:
    while True:
        data = await run.stdin.get()
        if data is None:
            break
        try:
            await execution.write_stdin(data)
        finally:
            run.stdin_queued -= 1
            _stdin_consumed(session, run.channel, len(data))
    await execution.close_stdin()


async def _output(session: Session, channel: int, stream: Stream, buf: bytearray) -> None:
    """Send one chunk of output (a buffer behind HEADROOM free bytes) as the client's
    window for the channel allows; returns once it is all queued and the socket drains.

    The chunk goes out framed in place; only a part cut off by a short window is copied.
    """
    conn, run = session.conn, session.runs.get(channel)
    if run is None:
        return
    while not session.lost and conn.may_send and len(buf) > HEADROOM:
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
        session.protocol.flush()
        try:
            await session.protocol.drain()
        except RexecError:
            return


def _audit(
    session: Session,
    channel: int,
    req: ExecRequest | None,
    start: float,
    outcome: ExecOutcome | None,
    *,
    error: str | None = None,
    decision: Decision | None = None,
) -> None:
    record = AuditRecord(
        conn=session.id,
        peer=session.peer,
        key_id=session.key_id,
        key_name=session.key_name,
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
    session.ctx.audit_write(record)
