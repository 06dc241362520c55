"""Transfer channels on the server: `rexec cp` / `put` / `get` (docs/PROTOCOL.md section 17).

This module owns a transfer's file I/O the way rexec.server.exec owns a command's process:
the session routes the channel's frames here (`feed`, credit wake-ups) and gets its EXIT.
Where paths lead is decided here: relative paths start at the user's home, and a token
confined by `transfer_under` walks every path from that directory one component at a time
without following a symlink (xferfs.open_dir_at), so neither `..` nor a symlink leads out.
What is read and written is rexec.xferengine's, the code the client runs for the other
direction. One audit record per transfer: who, op, root, files, bytes, result.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import Any, Protocol

from rexec.errors import ErrorCode, RemoteProtocolError, RexecError
from rexec.log import AuditRecord
from rexec.protocol import xfer as x
from rexec.protocol.events import Stream
from rexec.protocol.frames import HEADROOM
from rexec.protocol.messages import ExitStatus
from rexec.server.context import ChannelHost
from rexec.server.policy import Decision, evaluate_transfer
from rexec.xferengine import Receiver, Sender
from rexec.xferfs import ROOT_REFUSED, Listing, error_line, open_dir_at


class ChannelRun(Protocol):
    """What a transfer uses of the session's ChannelRun (the session imports us, not we it)."""

    channel: int
    decision: Decision | None
    task: asyncio.Task[None] | None

    def wake(self) -> None: ...
    async def wait_credit(self) -> None: ...


class Session(ChannelHost, Protocol):
    """What a transfer uses of its Session."""

    runs: dict[int, Any]
    transfers: dict[int, ServerTransfer]


EXIT_REFUSED = 255
PUT_WINDOW = 8 * 1024 * 1024  # a put's stdin window: the client's output window, for symmetry
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def from_home(path: str) -> str:
    """scp's `~` and `~/...`: the home (or a confined token's root), as a relative path."""
    if path == "~":
        return ""
    return path[2:] if path.startswith("~/") else path


class Paths:
    """Where a transfer's paths lead: below `root` (confined: nothing followed) or anywhere
    (relative paths start at `home`; the user's own path is resolved as the system does)."""

    def __init__(self, root: str | None, home: str) -> None:
        self.root = root
        self.home = home

    def _parts(self, path: str) -> list[str]:
        """A confined path's parts below the root (the policy already refused `..`)."""
        assert self.root is not None
        path = from_home(path)
        if os.path.isabs(path):
            path = os.path.relpath(os.path.normpath(path), self.root)
        return [p for p in path.split("/") if p not in ("", ".")]

    def open_dir(self, path: str) -> int:
        """The directory `path` (OSError if it is none)."""
        if self.root is None:
            path = from_home(path)
            return os.open(os.path.join(self.home, path) if path else self.home, _DIR)
        return self._open_parts(self._parts(path))

    def _open_parts(self, parts: list[str]) -> int:
        assert self.root is not None
        root = os.open(self.root, _DIR)
        try:
            return open_dir_at(root, parts)
        finally:
            os.close(root)

    def parent(self, path: str) -> tuple[int, str]:
        """(the directory holding `path`, its last part); the last part is "" when `path` is
        the home or root directory itself."""
        if self.root is None:
            full = os.path.abspath(os.path.join(self.home, from_home(path)))
            head, name = os.path.split(full)
            return os.open(head, _DIR), name
        parts = self._parts(path)
        if not parts:
            return os.open(self.root, _DIR), ""
        return self._open_parts(parts[:-1]), parts[-1]


class ServerTransfer:
    """One transfer channel: its engine, its inbox of client records, its outcome."""

    def __init__(self, session: Session, run: ChannelRun, req: x.XferRequest, paths: Paths) -> None:
        self.session = session
        self.run = run
        self.channel = run.channel
        self.req = req
        self.paths = paths
        self.inbox: deque[bytes | bytearray | None] = deque()
        self.ended: str | None = None  # why it was stopped (client CLOSE, token, shutdown)
        self.ended_code: ErrorCode | None = None  # the ERROR the client gets for it, if any
        self.error: str | None = None
        self.engine: Sender | Receiver = self._sender() if req.op == "get" else self._receiver()

    def _sender(self) -> Sender:
        listing = Listing()
        paths = self.paths
        for path in self.req.paths:
            try:
                base, name = paths.parent(path)
            except OSError as exc:
                listing.add_error(
                    os.path.basename(path.rstrip("/")) or path, "file", error_line(exc)
                )
                continue
            if not name and paths.root is None:  # `/`: no name to land under (nor `/` locally)
                os.close(base)
                listing.add_error("root", "dir", ROOT_REFUSED)
                continue
            if not name:  # a confined token's root directory itself: by its own name
                os.close(base)
                whole = os.path.realpath(paths.root or paths.home)
                name = os.path.basename(whole) or "root"
                base = os.open(os.path.dirname(whole), _DIR)
                follow = True
                named = name
            else:
                follow = paths.root is None  # a confined token's symlinks are copied as links
                # `f/` is "Not a directory" for a file, as locally; (not when confined: a
                # trailing slash would follow a symlink there)
                named = name + "/" if follow and path.endswith("/") else name
            listing.add(base, named, name, recursive=self.req.recursive, follow=follow)
        return Sender(listing, resume=self.req.resume)

    def _receiver(self) -> Receiver:
        req, paths = self.req, self.paths
        dest = req.paths[0]
        try:
            fd = paths.open_dir(dest)
            os.close(fd)
            is_dir = True
        except OSError:
            is_dir = False
        into = x.wants_into(2 if req.into else 1, is_dir)
        error = None
        try:
            base, name = (paths.open_dir(dest), "") if into else paths.parent(dest)
        except OSError as exc:
            base, name, error = -1, "", error_line(exc)
        engine = Receiver(
            base,
            into=into,
            name=name,
            preserve=req.preserve,
            resume=req.resume,
            dir_named=dest.endswith("/"),
        )
        engine.error = error
        return engine

    # ---- frames in -------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | None) -> None:
        """A record from the client (None: its STDIN_EOF); the task takes it."""
        self.inbox.append(data)
        self.run.wake()

    def stop(self, why: str, code: ErrorCode | None = None) -> None:
        """End early (client CLOSE, shutdown, token gone): partial files stay for resume;
        with `code`, the channel's EXIT follows an ERROR saying why."""
        self.ended, self.ended_code = why, code
        self.run.wake()

    # ---- the task --------------------------------------------------------------------

    async def serve(self) -> int:
        """Move records until both sides are done; returns the EXIT status (0: every entry
        OK or SKIPPED)."""
        session, conn, engine = self.session, self.session.conn, self.engine
        channel = self.channel
        eof = False
        try:
            while self.ended is None and not session.lost:
                moved = False
                while self.inbox and not eof:
                    data = self.inbox.popleft()
                    if data is None:
                        eof = True
                        break
                    engine.on_record(data)
                    conn.stdin_consumed(channel, len(data))
                    moved = True
                out = engine.next_record if isinstance(engine, Sender) else self._reply
                while (rec := out(conn.output_room(channel))) is not None:
                    conn.send_output_buffer(channel, Stream.STDOUT, rec)
                    moved = True
                if moved:
                    session.protocol.flush()
                    try:
                        await session.protocol.drain()
                    except RexecError:
                        break
                if eof and (not isinstance(engine, Receiver) or not engine.replies):
                    break
                if not moved:
                    await self.run.wait_credit()
        except RemoteProtocolError as exc:
            self.error = str(exc)
        finally:
            engine.close()
        return (
            0 if self.complete and all(o.result.status != "failed" for o in engine.outcomes) else 1
        )

    def _reply(self, room: int) -> bytearray | None:
        replies = self.engine.replies if isinstance(self.engine, Receiver) else None
        if replies and len(replies[0]) - HEADROOM <= room:
            return replies.popleft()
        return None

    @property
    def complete(self) -> bool:
        return self.error is None and self.ended is None and self.engine.finished

    def audit(self) -> dict[str, object]:
        """The audit record's `transfer` field."""
        outcomes = self.engine.outcomes
        failed = [o.result for o in outcomes if o.result.status == "failed"]
        out: dict[str, object] = {
            "op": self.req.op,
            "paths": list(self.req.paths),
            "root": self.paths.root or self.paths.home,
            "files": len(outcomes),
            "failed": len(failed),
            "bytes": self.engine.bytes,
            "result": "ok"
            if self.complete and not failed
            else "incomplete"
            if not self.complete
            else "failed",
        }
        if failed:
            out["first_error"] = f"{failed[0].path}: {failed[0].error}"
        if self.error or self.ended:
            out["error"] = self.error or self.ended
        return out


def start(session: Session, run: ChannelRun, req: x.XferRequest) -> None:
    """An XFER arrived (`run` is its would-be channel): refuse it (ERROR + EXIT, as an EXEC
    is refused) or run it."""
    channel = run.channel
    ctx = session.ctx
    refusal: tuple[ErrorCode, str] | None = None
    decision: Decision | None = None
    if ctx.shutting_down:
        refusal = (ErrorCode.SHUTDOWN, "server is shutting down")
    elif session.ending is not None:
        refusal = (ErrorCode.AUTH, session.ending)
    elif (audit_refusal := ctx.exec_refusal()) is not None:
        refusal = audit_refusal
    elif len(session.runs) >= ctx.config.limits.max_channels:
        limit = ctx.config.limits.max_channels
        refusal = (ErrorCode.LIMIT, f"too many channels on this connection (max_channels={limit})")
    else:
        assert session.conn.key_id is not None
        policy = ctx.store.policy_for(session.conn.key_id)
        if policy is None:
            refusal = (ErrorCode.AUTH, "token revoked")
        else:
            decision = evaluate_transfer(policy, req.op, req.paths, session.peer, session.peer_host)
            if not decision.allowed:
                refusal = (ErrorCode.POLICY, decision.reason)
    home = ctx.base_env.get("HOME") or os.path.expanduser("~")
    paths = Paths(decision.root if decision is not None else None, home)
    if refusal is not None:
        code, reason = refusal
        session.log.warning("transfer refused", channel=channel, code=code.name, reason=reason)
        session.conn.send_channel_error(channel, code, reason)
        session.conn.send_exit(channel, ExitStatus(EXIT_REFUSED))
        error = f"{code.name.lower()}: {reason}"
        _audit(session, channel, req, time.time(), EXIT_REFUSED, decision, error=error)
        return
    run.decision = decision
    session.runs[channel] = run
    try:
        transfer = ServerTransfer(session, run, req, paths)
    except OSError as exc:  # (listing and opening report per file; this is unexpected)
        session.runs.pop(channel, None)
        session.conn.send_channel_error(channel, ErrorCode.INTERNAL, error_line(exc))
        session.conn.send_exit(channel, ExitStatus(EXIT_REFUSED))
        return
    session.transfers[channel] = transfer
    if req.op == "put":  # deeper pipelining for bulk data: the server buffers at most this
        session.conn.grow_stdin_window(channel, PUT_WINDOW)
    run.task = ctx.spawn(_serve(session, transfer))
    if len(session.runs) == 1:
        session.arm_idle()


async def _serve(session: Session, transfer: ServerTransfer) -> None:
    channel, start_time = transfer.channel, time.time()
    session.log.info("transfer started", channel=channel, op=transfer.req.op)
    status = 1
    try:
        status = await transfer.serve()
        if not session.lost and channel in session.conn.channels:
            if transfer.error is not None:
                session.conn.send_channel_error(channel, ErrorCode.BAD_REQUEST, transfer.error)
            elif transfer.ended is not None and transfer.ended_code is not None:
                session.conn.send_channel_error(channel, transfer.ended_code, transfer.ended)
        if not session.lost and channel in session.conn.channels:
            session.conn.send_exit(channel, ExitStatus(status, duration=time.time() - start_time))
            session.protocol.flush()
    except Exception as exc:  # never lose the EXIT we owe, even on a bug
        transfer.error = f"internal error: {exc!r}"
        session.log.exception("transfer crashed", channel=channel)
        if not session.lost and channel in session.conn.channels:
            session.conn.send_channel_error(channel, ErrorCode.INTERNAL, transfer.error)
            session.conn.send_exit(channel, ExitStatus(EXIT_REFUSED))
            session.protocol.flush()
    finally:
        info = transfer.audit()
        session.log.info(
            "transfer finished",
            channel=channel,
            **{k: info[k] for k in ("files", "failed", "bytes", "result")},
        )
        _audit(
            session,
            channel,
            transfer.req,
            start_time,
            status,
            transfer.run.decision,
            info=info,
            nbytes=transfer.engine.bytes,
            error=transfer.error or transfer.ended,
        )
        session.transfers.pop(channel, None)
        session.channel_ended(channel)


def _audit(
    session: Session,
    channel: int,
    req: x.XferRequest,
    start: float,
    status: int,
    decision: Decision | None,
    *,
    info: dict[str, object] | None = None,
    nbytes: int = 0,
    error: str | None,
) -> None:
    """One audit record per transfer: who, op, paths, root, files, bytes, result."""
    extra: dict[str, object] = {"transfer": info or {"op": req.op, "paths": list(req.paths)}}
    if decision is not None:
        extra["policy"] = decision.audit()
    session.ctx.audit_write(
        AuditRecord(
            conn=session.id,
            peer=session.peer,
            key_id=session.key_id,
            key_name=session.key_name,
            channel=channel,
            command=f"rexec-transfer {req.op} {' '.join(req.paths)}",
            start=start,
            duration=time.time() - start,
            exit_code=status,
            bytes_out=nbytes if req.op == "get" else 0,
            error=error,
            extra=extra,
        )
    )
