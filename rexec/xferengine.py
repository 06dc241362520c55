"""The two ends of a transfer's record stream, shared by client and server: the Sender
(reads local files into records) and the Receiver (writes records into local files).

put: the client sends, the server receives; get: the other way round. Neither does network
I/O: the client drivers and the server session move their records (the sender's only while
the channel's window has room: `next_record(room)`), so memory stays bounded whatever the
file size. The record order is rexec.protocol.xfer's; the file rules are rexec.xferfs's.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import deque
from collections.abc import Callable, Generator

from rexec.protocol import xfer as x
from rexec.protocol.frames import HEADROOM
from rexec.xferfs import (
    DirCache,
    Incoming,
    Item,
    Listing,
    error_line,
    file_mode,
    hash_prefix,
    make_dir,
    make_symlink,
    open_item,
    read_into,
    read_link,
    set_dir_meta,
    what_is,
)

# (path, bytes of it done, its size): per DATA record, and once more as each entry ends
Progress = Callable[[str, int, int], None]
SMALL = 64 * 1024  # files below this go as one FILE record each (without resume)


class Outcome:
    """One entry's end, as either side saw it: what it was, the bytes that crossed, and the
    receiver's RESULT; `at_source`: the sender failed it (FAIL or ABORT), not the receiver."""

    __slots__ = ("at_source", "bytes", "kind", "result", "size")

    def __init__(
        self, kind: str, size: int, nbytes: int, result: x.Result, at_source: bool = False
    ) -> None:
        self.kind = kind
        self.size = size
        self.bytes = nbytes
        self.result = result
        self.at_source = at_source


_WAIT = bytearray()  # the generator's "nothing until the receiver's HAVE arrives"


class Sender:
    """Turns a Listing into records: `next_record(room)` gives the next one that fits in
    `room` bytes of window (None: nothing now), `on_record` takes the receiver's replies."""

    def __init__(self, listing: Listing, *, resume: bool, progress: Progress | None = None) -> None:
        self.listing = listing
        self.resume = resume
        self.progress = progress
        self.stream = x.SenderStream()
        self.outcomes: list[Outcome] = []
        self.bytes = 0  # DATA bytes sent
        self.done_sent = False
        self._room = 0
        self._held: bytearray | None = None
        self._gen = self._records()
        self._have: tuple[int, bytes] | None = None
        # (kind, size, bytes, failed here) per RESULT due
        self._open: deque[tuple[str, int, int, bool]] = deque()
        self._dirs = DirCache()

    @property
    def finished(self) -> bool:
        """DONE is out and every RESULT is in."""
        return self.done_sent and self.stream.outstanding == 0

    def can_send(self, room: int) -> bool:
        """next_record(room) would give a record (or end the generator's wait) now."""
        if self._held is not None:
            return len(self._held) - HEADROOM <= room
        return not self.done_sent and not self.stream.awaiting_have and room > 0

    def next_record(self, room: int) -> bytearray | None:
        if self._held is None:
            if self.done_sent or self.stream.awaiting_have or room <= 0:
                return None
            self._room = room
            self._held = next(self._gen, None)
            if self._held is None or self._held is _WAIT:
                self._held = None
                return None
        if len(self._held) - HEADROOM > room:
            return None
        rec, self._held = self._held, None
        if rec[HEADROOM] == x.Rec.DONE:
            self.done_sent = True
            self.close()
        return rec

    def on_record(self, payload: bytes | bytearray) -> None:
        what, value = self.stream.feed(payload)
        if what == "have":
            self._have = value
            return
        kind, size, nbytes, here = self._open.popleft()
        self.outcomes.append(Outcome(kind, size, nbytes, value, here))
        if self.progress is not None:  # an entry is done (files_done moved)
            self.progress(value.path, size, size)

    def close(self) -> None:
        self._gen.close()
        self._dirs.close()
        self.listing.close()

    def _announce(
        self, kind: str, size: int, path: str, *, have: bool = False, failed: bool = False
    ) -> None:
        self.stream.sent(path, want_have=have)
        self._open.append((kind, size, 0, failed))

    def _aborted(self) -> None:
        """The current file ended in ABORT: its failure is this side's."""
        kind, size, sent, _ = self._open[-1]
        self._open[-1] = (kind, size, sent, True)

    def _records(self) -> Generator[bytearray, None, None]:
        listing = self.listing
        yield x.tree(listing.files, listing.total)
        for item in listing.items:
            if item.error is not None:
                self._announce(item.kind, 0, item.path, failed=True)
                yield x.fail(item.path, item.kind, item.error)
            elif item.kind == "dir":
                self._announce("dir", 0, item.path)
                yield x.entry(x.Entry(item.path, "dir", 0, item.mode, item.mtime_ns))
            elif item.kind == "symlink":
                try:
                    target = read_link(item, self._dirs)
                except OSError as exc:
                    self._announce("symlink", 0, item.path, failed=True)
                    yield x.fail(item.path, "symlink", error_line(exc))
                    continue
                self._announce("symlink", 0, item.path)
                yield x.entry(x.Entry(item.path, "symlink", 0, item.mode, item.mtime_ns, target))
            else:
                yield from self._file(item)
        yield x.done()

    def _file(self, item: Item) -> Generator[bytearray, None, None]:
        try:
            fd = open_item(item, self._dirs)
        except OSError as exc:
            self._announce("file", item.size, item.path, failed=True)
            yield x.fail(item.path, "file", error_line(exc))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._announce("file", 0, item.path, failed=True)
                yield x.fail(item.path, "file", what_is(st.st_mode))
                return
            size = st.st_size
            e = x.Entry(item.path, "file", size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            if not self.resume and size < SMALL and (whole := self._whole(fd, e)) is not None:
                self._announce("file", size, item.path)
                self._set_sent(size)
                yield whole
                return
            self._announce("file", size, item.path, have=self.resume)
            yield x.entry(e)
            h = hashlib.sha256()
            start = 0
            if self.resume:
                while self._have is None:
                    yield _WAIT
                (have, digest), self._have = self._have, None
                if 0 < have <= size:
                    n, mine, state = hash_prefix(fd, have)
                    if n == have and mine == digest:
                        h, start = state, have
                os.lseek(fd, start, os.SEEK_SET)
                yield x.offset(start)
            left, sent = size - start, 0
            while left:
                n = min(x.MAX_DATA, left, max(1, self._room - 1))
                buf = x.data_buffer(n)
                try:
                    got = read_into(fd, buf, x.DATA_AT)
                except OSError as exc:
                    self._aborted()
                    yield x.abort(error_line(exc))
                    return
                if got < n:
                    self._aborted()
                    yield x.abort("file shrank while it was being sent")
                    return
                with memoryview(buf) as view:
                    h.update(view[x.DATA_AT :])
                left -= n
                sent += n
                self.bytes += n
                self._set_sent(sent)
                if self.progress is not None:
                    self.progress(item.path, start + sent, size)
                yield buf
            yield x.end(h.digest())
        finally:
            os.close(fd)

    def _whole(self, fd: int, e: x.Entry) -> bytearray | None:
        """A small file as one FILE record (ENTRY, DATA and END at once), or None: it does
        not fit, or it changed under us (the usual records then say what happens)."""
        made = x.small_file(e, e.size)
        if made is None or len(made[0]) - HEADROOM > self._room:
            return None
        buf, at = made
        try:
            got = read_into(fd, buf, at, e.size)
        except OSError:
            got = -1
        if got != e.size:
            os.lseek(fd, 0, os.SEEK_SET)
            return None
        self.bytes += e.size
        if self.progress is not None and e.size:
            self.progress(e.path, e.size, e.size)
        with memoryview(buf) as view:
            return x.seal_file(buf, hashlib.sha256(view[at : at + e.size]).digest())

    def _set_sent(self, sent: int) -> None:
        """The bytes sent so far for the file whose RESULT is due last (the current one)."""
        kind, size, _, here = self._open[-1]
        self._open[-1] = (kind, size, sent, here)


class Receiver:
    """Writes what a Sender sends under the directory `base` (a descriptor it owns).

    `into`: entries keep their wire paths below base; else the first part (the single
    source's name) becomes `name` (scp's "copy to this name"). Replies (HAVE, RESULT) wait
    in `replies` for the driver to send.
    """

    def __init__(
        self,
        base: int,
        *,
        into: bool,
        name: str,
        preserve: bool,
        resume: bool,
        progress: Progress | None = None,
        dir_named: bool = False,
    ) -> None:
        self.base = base
        self.into = into
        self.name = name
        # the destination was written `NAME/` and is not there: the source may become it
        # only if it is a directory (scp's, cp's rule); a file there fails
        self.dir_named = dir_named and not into
        self.preserve = preserve
        self.progress = progress
        self.stream = x.ReceiverStream(resume)
        self.replies: deque[bytearray] = deque()
        self.outcomes: list[Outcome] = []
        self.tree: tuple[int, int] | None = None  # the TREE record: (files, bytes)
        self.bytes = 0  # DATA bytes received
        self.error: str | None = None  # set: the destination is unusable, every entry fails
        self._dir_meta: list[tuple[list[str], int, int | None]] = []
        self._entry: x.Entry | None = None
        self._inc: Incoming | None = None
        self._error: str | None = None
        self._got = 0  # DATA bytes of the current file
        self._start = 0  # where its data began (resume)
        self._offered = 0  # what our HAVE offered (resume)
        self._dirs = DirCache()  # the directory files are being written to

    @property
    def finished(self) -> bool:
        return self.stream.finished

    def on_record(self, payload: bytes | bytearray) -> None:
        what, value = self.stream.feed(payload)
        if what == "data":
            self._data(value)
        elif what == "entry":
            self._on_entry(value)
        elif what == "offset":
            self._offset(value)
        elif what == "end":
            self._end(value)
        elif what == "abort":
            self._fail_file(value, at_source=True)
        elif what == "fail":
            path, kind, error = value
            self._reply(kind, 0, x.Result(path, "failed", None, error), at_source=True)
        elif what == "file":  # a small file whole: its ENTRY, DATA and END
            e, data, digest = value
            self._on_entry(e)
            if data:
                self._data(data)
            self._end(digest)
        elif what == "tree":
            self.tree = value
        else:  # done
            self._finish_dirs()

    def close(self) -> None:
        if self._inc is not None:
            self._inc.drop()
            self._inc = None
        self._dirs.close()
        if self.base >= 0:
            os.close(self.base)
            self.base = -1

    def _parts(self, path: str) -> list[str]:
        return x.placed(path, self.into, self.name)

    def _reply(
        self, kind: str, size: int, result: x.Result, nbytes: int = 0, *, at_source: bool = False
    ) -> None:
        self.outcomes.append(Outcome(kind, size, nbytes, result, at_source))
        self.replies.append(x.result(result))
        if self.progress is not None:  # an entry is done (files_done moved)
            self.progress(result.path, size, size)

    def _on_entry(self, e: x.Entry) -> None:
        error = self.error
        if error is None and self.dir_named and e.kind != "dir" and "/" not in e.path:
            error = self._no_dir()
        if error is not None:
            if e.kind == "file":
                self._entry, self._inc, self._error, self._got, self._start = (
                    e,
                    None,
                    error,
                    0,
                    0,
                )
                if self.stream.resume:
                    self.replies.append(x.have(0, hashlib.sha256().digest()))
            else:
                self._reply(e.kind, 0, x.Result(e.path, "failed", None, error))
            return
        parts = self._parts(e.path)
        mtime = e.mtime_ns if self.preserve else None
        if e.kind == "file":
            self._entry, self._error, self._got, self._start = e, None, 0, 0
            try:
                self._inc = Incoming.open(self.base, parts, e.size, self._dirs)
            except OSError as exc:
                self._inc, self._error = None, error_line(exc)
            if self.stream.resume:
                offer = (0, hashlib.sha256().digest())
                if self._inc is not None:
                    try:
                        offer = self._inc.offer()
                        self._offered = offer[0]
                    except OSError as exc:
                        self._error = error_line(exc)
                self.replies.append(x.have(*offer))
            else:
                self._start_file(0)
            return
        try:
            if e.kind == "dir":
                make_dir(self.base, parts, file_mode(e.mode, self.preserve))
                if self.preserve:
                    self._dir_meta.append((parts, file_mode(e.mode, True), mtime))
            else:
                assert e.target is not None
                make_symlink(self.base, parts, e.target, mtime)
        except OSError as exc:
            self._reply(e.kind, 0, x.Result(e.path, "failed", None, error_line(exc)))
            return
        self._reply(e.kind, 0, x.Result(e.path, "ok", None, None))

    def _no_dir(self) -> str:
        """Why a file cannot go to `NAME/`: no such directory, or a non-directory has it."""
        try:
            os.stat(self.name, dir_fd=self.base, follow_symlinks=False)
        except OSError:
            return os.strerror(errno.ENOENT)
        return os.strerror(errno.ENOTDIR)

    def _start_file(self, offset: int) -> None:
        inc = self._inc
        if inc is None or self._error is not None:
            return
        try:
            inc.start(offset)
        except OSError as exc:
            self._error = error_line(exc)
            inc.drop()
            self._inc = None

    def _offset(self, n: int) -> None:
        self._start = n
        inc = self._inc
        if inc is None or self._error is not None:
            return
        if n and n == self._offered:
            if not inc.from_dest:  # (a complete destination: END verifies it, nothing written)
                self._start_file(n)
        else:
            inc.from_dest = False
            self._start_file(0)

    def _data(self, view: memoryview) -> None:
        self._got += len(view)
        self.bytes += len(view)
        inc = self._inc
        if inc is not None and self._error is None:
            try:
                inc.write(view)
            except OSError as exc:
                self._error = error_line(exc)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    inc.discard()  # the rest of the transfer needs the room more
                else:
                    inc.drop()  # what was written stays, for a resume
                self._inc = None
        if self.progress is not None and self._entry is not None:
            self.progress(self._entry.path, self._start + self._got, self._entry.size)

    def _end(self, digest: bytes) -> None:
        e, inc = self._entry, self._inc
        assert e is not None
        self._inc = None
        if inc is None or self._error is not None:
            self._fail_file(self._error or "not written")
            return
        skipped = inc.from_dest
        mode = inc.mode_for(e.mode, self.preserve)
        try:
            ok = inc.finish(digest, mode, e.mtime_ns if self.preserve else None)
        except OSError as exc:
            self._fail_file(error_line(exc))
            return
        sha = digest.hex()
        if not ok:
            self._fail_file("SHA-256 mismatch: the received bytes differ from the source")
            return
        status = "skipped" if skipped else "ok"
        self._reply("file", e.size, x.Result(e.path, status, sha, None), self._got)

    def _fail_file(self, error: str, *, at_source: bool = False) -> None:
        e = self._entry
        assert e is not None
        if self._inc is not None:
            self._inc.drop()
            self._inc = None
        result = x.Result(e.path, "failed", None, error)
        self._reply("file", e.size, result, self._got, at_source=at_source)

    def _finish_dirs(self) -> None:
        """Directories' modes and mtimes last (their contents changed them), deepest first."""
        for parts, mode, mtime in reversed(self._dir_meta):
            try:
                set_dir_meta(self.base, parts, mode, mtime)
            except OSError:
                continue  # the directory's RESULT already went out as ok
