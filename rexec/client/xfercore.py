"""A transfer (`put`/`get`) as the client runs it, written once for both drivers.

The drivers only wait and move bytes: they call `pump()` whenever `ready()`, and flush what
it queued. This module decides the rest: what the XFER request says, where local files come
from or go (scp's rules), which records go out while the channel's window has room, and the
TransferResult (files in transfer order, bytes that crossed the wire, the server's refusal
raised as what it is). The files themselves are read and written by rexec.xferengine, the
same code the server uses for the other direction.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Sequence
from typing import Any

from rexec.client.core import ClientCore, Command
from rexec.errors import TruncatedError
from rexec.heap import keep_heap
from rexec.protocol import xfer as x
from rexec.protocol.events import Stream
from rexec.protocol.frames import HEADROOM
from rexec.transfer import (
    FileResult,
    FileStatus,
    ProgressCallback,
    TransferError,
    TransferProgress,
    TransferResult,
)
from rexec.xferengine import Outcome, Receiver, Sender
from rexec.xferfs import ROOT_REFUSED, Listing, error_line

LocalPath = str | os.PathLike[str]
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def source_name(path: str) -> str:
    """A local source's name: its last part, the first part of its entries' wire paths (as
    scp names what it copies); ValueError for a source with none (`/`)."""
    name = os.path.basename(os.path.abspath(path))
    if not name:
        raise ValueError(f"{path}: {ROOT_REFUSED}")
    return name


def check_remote_source(path: str) -> str:
    """A remote source for get: ValueError for the server's root directory (`/`, `/..`),
    which has no name to land under, as a local `/` has none (the server refuses it too)."""
    if path.startswith("/") and not posixpath.normpath(path).lstrip("/"):
        raise ValueError(f"{path}: {ROOT_REFUSED}")
    return path


def _paths(value: LocalPath | Sequence[LocalPath] | str | Sequence[str]) -> list[str]:
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    items = [os.fspath(v) for v in value]
    if not items:
        raise ValueError("no source given")
    return items


class Transfer:
    """One transfer on one channel: a Sender (put) or a Receiver (get) and its results."""

    def __init__(
        self,
        core: ClientCore,
        direction: str,
        engine: Sender | Receiver,
        request: x.XferRequest,
        progress: ProgressCallback | None,
    ) -> None:
        self.core = core
        self.direction = direction
        self.engine = engine
        self.request = request
        self.started = time.monotonic()
        self._progress = progress
        self._stdin_closed = False
        self.cmd: Command | None = None
        engine.progress = self._on_progress if progress is not None else None
        keep_heap()  # 256 KiB records both ways: no page faults per frame (rexec.heap)

    # ---- set-up ----------------------------------------------------------------------

    @classmethod
    def put(
        cls,
        core: ClientCore,
        local: LocalPath | Sequence[LocalPath],
        remote: str,
        *,
        recursive: bool,
        preserve: bool,
        resume: bool,
        progress: ProgressCallback | None,
    ) -> Transfer:
        sources = _paths(local)
        names = [source_name(src) for src in sources]  # ValueError before anything opens
        listing = Listing()
        for src, name in zip(sources, names, strict=True):
            try:
                base = os.open(os.path.dirname(os.path.abspath(src)), _DIR)
            except OSError as exc:
                listing.add_error(name, "file", error_line(exc))
                continue
            # (`f/`: stat says "Not a directory" for a file, as scp's and cp's would)
            named = name + "/" if src.endswith("/") else name
            listing.add(base, named, name, recursive=recursive, follow=True)
        request = x.XferRequest(
            "put",
            (remote,),
            recursive=recursive,
            preserve=preserve,
            resume=resume,
            into=len(sources) > 1,
            window=core.conn.output_window,
        )
        return cls(core, "put", Sender(listing, resume=resume), request, progress)

    @classmethod
    def get(
        cls,
        core: ClientCore,
        remote: str | Sequence[str],
        local: LocalPath,
        *,
        recursive: bool,
        preserve: bool,
        resume: bool,
        progress: ProgressCallback | None,
    ) -> Transfer:
        sources = [remote] if isinstance(remote, str) else list(remote)
        if not sources:
            raise ValueError("no source given")
        for source in sources:
            check_remote_source(source)
        dest = os.fspath(local)
        into = x.wants_into(len(sources), os.path.isdir(dest))
        full = os.path.abspath(dest)
        where, name = (full, "") if into else os.path.split(full)
        base = os.open(where, _DIR)  # OSError: see local_failure()
        engine = Receiver(
            base,
            into=into,
            name=name,
            preserve=preserve,
            resume=resume,
            dir_named=dest.endswith("/"),
        )
        request = x.XferRequest(
            "get",
            tuple(sources),
            recursive=recursive,
            preserve=preserve,
            resume=resume,
            window=core.conn.output_window,
        )
        return cls(core, "get", engine, request, progress)

    def start(self) -> Command:
        """Queue the XFER (the driver has waited for core.can_start())."""
        name = f"{self.direction} {' '.join(self.request.paths)}"
        self.cmd = self.core.start_transfer(self.request, name)
        return self.cmd

    # ---- moving records --------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The channel has ended (its EXIT, or the connection's end)."""
        return self.cmd is not None and self.cmd.done and not self.cmd.has_output()

    def ready(self) -> bool:
        """pump() has something to do now."""
        cmd, core = self.cmd, self.core
        assert cmd is not None
        if cmd.done or cmd.has_output(Stream.STDOUT):
            return True
        room = core.stdin_room(cmd)
        engine = self.engine
        if isinstance(engine, Sender):
            return engine.can_send(room) or (engine.done_sent and not self._stdin_closed)
        if engine.replies:
            return len(engine.replies[0]) - HEADROOM <= room
        return engine.finished and not self._stdin_closed

    def pump(self) -> None:
        """Take in what arrived, send what the window allows, end our side when done."""
        cmd, core, engine = self.cmd, self.core, self.engine
        assert cmd is not None
        while (chunk := core.take(cmd, Stream.STDOUT)) is not None and chunk[1]:
            engine.on_record(chunk[1])
        if cmd.done or self._stdin_closed:
            return
        if isinstance(engine, Sender):
            while (rec := engine.next_record(core.stdin_room(cmd))) is not None:
                core.write_record(cmd, rec)
            finished = engine.done_sent
        else:
            replies = engine.replies
            while replies and len(replies[0]) - HEADROOM <= core.stdin_room(cmd):
                core.write_record(cmd, replies.popleft())
            finished = engine.finished and not replies
        if finished:
            core.close_stdin(cmd)
            self._stdin_closed = True

    # ---- the outcome -----------------------------------------------------------------

    def result(self, *, check: bool) -> TransferResult:
        """The TransferResult once done(); raises the channel's error (a refusal: PolicyError,
        RemoteError; the connection's end), or TransferError with `check` if a file FAILED."""
        cmd, engine = self.cmd, self.engine
        assert cmd is not None
        self.close()
        if cmd.error is not None:
            raise cmd.error
        if not engine.finished:
            raise TruncatedError("the server ended the transfer before it was complete")
        result = TransferResult(
            target=self.core.target or "",
            direction=self.direction,
            files=tuple(_file_result(o) for o in engine.outcomes),
            bytes=engine.bytes,
            duration=time.monotonic() - self.started,
        )
        if check and not result.ok:
            raise TransferError(result)
        return result

    def close(self) -> None:
        """Release the local files (also after an error). A transfer abandoned half-way (an
        exception in a progress callback, a cancelled task) ends our side with STDIN_EOF:
        the server then ends the channel (EXIT 1), keeping partial files for a resume, and
        what it still sends on the channel is taken as consumed."""
        self.engine.close()
        cmd = self.cmd
        if cmd is not None and not cmd.done and not self._stdin_closed:
            self._stdin_closed = True
            self.core.collect(cmd, Stream.STDOUT)
            self.core.close_stdin(cmd)

    def _on_progress(self, path: str, done: int, size: int) -> None:
        assert self._progress is not None
        engine = self.engine
        if isinstance(engine, Sender):
            total: int | None = engine.listing.total
            files: int | None = engine.listing.files
        else:
            files, total = engine.tree if engine.tree is not None else (None, None)
        self._progress(
            TransferProgress(path, done, size, engine.bytes, total, len(engine.outcomes), files)
        )


def begin(
    core: ClientCore,
    direction: str,
    source: Any,  # (the public put/get signatures say what each may be)
    dest: Any,
    *,
    check: bool,
    recursive: bool,
    preserve: bool,
    resume: bool,
    progress: ProgressCallback | None,
) -> Transfer | TransferResult:
    """A put or get set up (nothing sent yet), or already the result of a get whose local
    destination cannot be opened. Both drivers start here."""
    opts = {"recursive": recursive, "preserve": preserve, "resume": resume}
    if direction == "put":
        return Transfer.put(core, source, dest, **opts, progress=progress)
    try:
        return Transfer.get(core, source, dest, **opts, progress=progress)
    except OSError as exc:
        return local_failure(core, "get", exc, check=check)


def local_failure(core: ClientCore, direction: str, exc: OSError, *, check: bool) -> TransferResult:
    """The result of a transfer whose local destination cannot be opened (nothing was
    sent): one FAILED entry for the transfer as a whole (path "", the FileResult rule);
    raised as TransferError with `check`."""
    failed = FileResult("", "dir", 0, 0, None, FileStatus.FAILED, error_line(exc))
    result = TransferResult(core.target or "", direction, (failed,), 0, 0.0)
    if check:
        raise TransferError(result)
    return result


_STATUS = {s.value: s for s in FileStatus}  # (FileStatus() costs ~1 us: one per file)


def _file_result(o: Outcome) -> FileResult:
    r = o.result
    return FileResult(
        r.path, o.kind, o.size, o.bytes, r.sha256, _STATUS[r.status], r.error, o.at_source
    )
