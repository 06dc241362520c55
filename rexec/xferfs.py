"""File-system side of a transfer, shared by the client and the server: listing what to send
and writing what arrives, always relative to directory file descriptors.

Every path below a transfer's base directory is walked one component at a time with
`O_NOFOLLOW` (`openat`-style, `dir_fd=`), so a symlink inside a tree is copied as a link and
never followed out of it, and `..` never appears (rexec.protocol.xfer.check_path refuses it
on the wire). Files are written to a temporary name beside the destination
(`.NAME.rexec-part`) and renamed over it only once their SHA-256 matched the sender's; a
failed file leaves the old destination alone and its partial data in place for `resume`
(but for a full disk, where the room matters more).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat

from rexec.protocol.xfer import MAX_PATH

PART_SUFFIX = ".rexec-part"
NAME_MAX = 255  # bytes of one name (Linux's file systems, and most others)
# a source `/` (either end): it has no name for its entries' wire paths to start with
ROOT_REFUSED = "cannot copy the root directory itself (name what is in it)"
READ_CHUNK = 256 * 1024  # how the resume prefix hash reads a file
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a fifo: no hang
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def error_line(exc: OSError) -> str:
    """An OSError as the one line a FAILED file shows ("No space left on device")."""
    if exc.errno == errno.ELOOP:
        return "refusing to follow a symlink"
    return exc.strerror or str(exc)


def kind_of(mode: int) -> str | None:
    """ "file", "dir" or "symlink" for what a transfer copies, None for anything else."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None


def what_is(mode: int) -> str:
    """How a refusal names a file a transfer does not copy."""
    for test, name in (
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return f"not a regular file ({name})"
    return "not a regular file"


def open_dir_at(base: int, parts: list[str] | tuple[str, ...]) -> int:
    """Open the directory `parts` below `base`, one component at a time, following no
    symlink; the caller closes the result. OSError (ELOOP/ENOTDIR for a symlink) otherwise."""
    fd = os.dup(base)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, f"invalid path component {part!r}")
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(fd, part):
                    raise OSError(errno.ELOOP, "refusing to follow a symlink") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class DirCache:
    """The directory of the previous file stays open: a tree's files come grouped by
    directory, so most opens walk nothing."""

    def __init__(self) -> None:
        self._key: tuple[int, tuple[str, ...]] | None = None
        self._fd = -1

    def get(self, base: int, parts: tuple[str, ...]) -> int:
        if self._key == (base, parts):
            return self._fd
        self.close()
        self._fd = open_dir_at(base, parts) if parts else os.dup(base)
        self._key = (base, parts)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._key = -1, None


# ---- the sender's listing --------------------------------------------------------------


class Item:
    """One thing to send: where it is (base fd + parts), what it is, or why it cannot go."""

    __slots__ = ("base", "error", "follow", "kind", "mode", "mtime_ns", "parts", "path", "size")

    def __init__(
        self,
        path: str,
        base: int,
        parts: tuple[str, ...],
        kind: str,
        st: os.stat_result | None = None,
        error: str | None = None,
        follow: bool = False,
    ) -> None:
        self.path = path  # the wire path
        self.base = base
        self.parts = parts
        self.kind = kind
        self.size = st.st_size if st is not None and kind == "file" else 0
        self.mode = stat.S_IMODE(st.st_mode) if st is not None else 0
        self.mtime_ns = st.st_mtime_ns if st is not None else 0
        self.error = error
        self.follow = follow  # a top-level source named by the user: its symlink is followed


class Listing:
    """Everything a sender will send, walked before the first byte goes out (so TREE can
    say how much). Holds the sources' base directories open until close()."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._fds: list[int] = []
        self._total: tuple[int, int] | None = None  # (items counted, their bytes)

    @property
    def files(self) -> int:
        return len(self.items)

    @property
    def total(self) -> int:
        """Bytes of all files (summed once the listing is complete: progress asks often)."""
        if self._total is None or self._total[0] != len(self.items):
            self._total = (len(self.items), sum(i.size for i in self.items))
        return self._total[1]

    def add_error(self, path: str, kind: str, error: str) -> None:
        self.items.append(Item(path, -1, (), kind, error=error))

    def add(self, base: int, name: str, wire: str, *, recursive: bool, follow: bool) -> None:
        """Add the source `name` in directory `base` (a descriptor the listing now owns) as
        wire path `wire`; with `follow`, a symlink there is followed (scp's rule for the
        sources a user names), never one inside a tree."""
        self._fds.append(base)
        found = self._stat(base, name, wire, follow)
        if found is None:
            return
        kind, st = found
        if kind == "dir" and not recursive:
            self.add_error(wire, "dir", "is a directory (use -r)")
        else:
            self.items.append(Item(wire, base, (name,), kind, st, follow=follow))
            if kind == "dir":
                try:
                    top = os.open(
                        name, _DIR_FLAGS & ~os.O_NOFOLLOW if follow else _DIR_FLAGS, dir_fd=base
                    )
                except OSError as exc:
                    self.items[-1].error = error_line(exc)
                    return
                self._fds.append(top)
                self._walk(top, (), wire)

    def _stat(
        self, fd: int, name: str, wire: str, follow: bool, into: list[Item] | None = None
    ) -> tuple[str, os.stat_result] | None:
        """`name` in directory `fd`: its kind and stat, or None once listed (in `into`, by
        default the listing) as an error (it vanished or cannot be read, or it is something
        a transfer does not copy)."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=follow)
        except OSError as exc:
            error = error_line(exc)
        else:
            kind = kind_of(st.st_mode)
            if kind is not None:
                return kind, st
            error = what_is(st.st_mode)
        (self.items if into is None else into).append(Item(wire, -1, (), "file", error=error))
        return None

    def _walk(self, base: int, parts: tuple[str, ...], wire: str) -> None:
        """Add what is below directory `parts` of `base` (pre-order, sorted by name), with a
        stack of its directories' entries, not recursion: a tree may be deeper than
        Python's stack."""
        todo = [iter(self._below(base, parts, wire))]
        while todo:
            item = next(todo[-1], None)
            if item is None:
                todo.pop()
                continue
            self.items.append(item)
            if item.kind == "dir" and item.error is None:
                todo.append(iter(self._below(base, item.parts, item.path)))

    def _below(self, base: int, parts: tuple[str, ...], wire: str) -> list[Item]:
        """The entries of directory `parts` (just listed: the last item), sorted by name.
        Those whose wire path would exceed MAX_PATH are left out, and the directory gets
        one error saying so (after what is in it that fits)."""
        try:
            fd = open_dir_at(base, parts)
        except OSError as exc:
            self.items[-1].error = error_line(exc)
            return []
        out: list[Item] = []
        too_long = False
        try:
            with os.scandir(fd) as it:
                names = sorted(e.name for e in it)
            for name in names:
                child, path = (*parts, name), f"{wire}/{name}"
                if len(path) * 4 > MAX_PATH and len(os.fsencode(path)) > MAX_PATH:
                    too_long = True
                    continue
                found = self._stat(fd, name, path, False, out)
                if found is not None:
                    out.append(Item(path, base, child, *found))
        finally:
            os.close(fd)
        if too_long:
            error = f"entries below it not copied (their paths exceed {MAX_PATH} bytes)"
            out.append(Item(wire, -1, (), "dir", error=error))
        return out

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def open_item(item: Item, dirs: DirCache) -> int:
    """Open a listed file for reading, without following a symlink below its source. It
    stays O_NONBLOCK (two fcntl calls a file saved): that flag does nothing to a regular
    file, and the caller reads only after fstat said it is one."""
    if len(item.parts) == 1:
        flags = _READ_FLAGS & ~os.O_NOFOLLOW if item.follow else _READ_FLAGS
        return os.open(item.parts[0], flags, dir_fd=item.base)
    return os.open(item.parts[-1], _READ_FLAGS, dir_fd=dirs.get(item.base, item.parts[:-1]))


def read_link(item: Item, dirs: DirCache) -> str:
    if len(item.parts) == 1:
        return os.readlink(item.parts[0], dir_fd=item.base)
    return os.readlink(item.parts[-1], dir_fd=dirs.get(item.base, item.parts[:-1]))


def hash_prefix(fd: int, length: int) -> tuple[int, bytes, hashlib._Hash]:
    """SHA-256 of the first `length` bytes of `fd` (fewer if it is shorter): (bytes hashed,
    digest, the hash object to continue from)."""
    h = hashlib.sha256()
    done = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while done < length:
        chunk = os.read(fd, min(READ_CHUNK, length - done))
        if not chunk:
            break
        h.update(chunk)
        done += len(chunk)
    return done, h.digest(), h


# ---- the receiver's files --------------------------------------------------------------


def part_name(name: str) -> str:
    """The temporary name beside `name`: `.NAME.rexec-part`, or for a name too long for
    that (the file system takes NAME_MAX bytes), its first bytes, `~` and a hash of the
    whole name: still in NAME_MAX, and the same each time (a resume finds it)."""
    part = f".{name}{PART_SUFFIX}"
    if len(part) * 4 <= NAME_MAX:  # (a character is at most 4 bytes)
        return part
    raw = os.fsencode(name)
    if len(raw) + len(part) - len(name) <= NAME_MAX:
        return part
    tag = b"~" + hashlib.sha256(raw).hexdigest()[:16].encode() + PART_SUFFIX.encode()
    return os.fsdecode(b"." + raw[: NAME_MAX - 1 - len(tag)] + tag)


def file_mode(mode: int, preserve: bool) -> int:
    """The mode a received file or directory gets: the sender's bits (never set-id), under
    our umask unless preserving, as scp does."""
    bits = mode & 0o1777
    return bits if preserve else bits & 0o777 & ~_UMASK


class Incoming:
    """One file being received: its temporary file in the destination directory, its hash.

    write() raises OSError for a full disk and the like (the file then FAILED); finish()
    verifies and renames into place; drop() leaves the partial data for a later resume.
    """

    def __init__(self, dirfd: int, name: str, size: int) -> None:
        self.dirfd = dirfd  # the directory's descriptor (a DirCache's: not ours to close)
        self.name = name
        self.part = part_name(name)
        self.size = size
        self.fd = -1
        self.hash = hashlib.sha256()
        self.written = 0
        self.from_dest = False  # resume found the destination itself complete
        self.kept: os.stat_result | None = None  # the regular file this one replaces

    @classmethod
    def open(cls, base: int, parts: list[str], size: int, dirs: DirCache) -> Incoming:
        dirfd = dirs.get(base, tuple(parts[:-1]))
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        inc = cls(dirfd, name, size)
        if st is not None and stat.S_ISREG(st.st_mode):
            inc.kept = st
        return inc

    def mode_for(self, mode: int, preserve: bool) -> int:
        """The mode the file gets: the sender's `mode` (file_mode) with preserve or for a new
        file; else the mode of the file it replaces, as scp and rsync keep it (a 0600 file
        overwritten stays 0600, a script stays executable), never set-id."""
        if preserve or self.kept is None:
            return file_mode(mode, preserve)
        return stat.S_IMODE(self.kept.st_mode) & 0o1777

    def start(self, offset: int = 0) -> None:
        """Open the temporary file: truncated, or kept up to `offset` (resume; the hash must
        already hold those bytes: see offer())."""
        if self.from_dest:
            return
        if self.fd < 0:  # a fresh one: whatever had the name goes (a planted hard link too)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self.fd = _locked(os.open(self.part, flags, 0o600, dir_fd=self.dirfd))
            except FileExistsError:
                self._check_unused()
                os.unlink(self.part, dir_fd=self.dirfd)
                self.fd = _locked(os.open(self.part, flags, 0o600, dir_fd=self.dirfd))
            if not offset:  # created empty and at 0: no truncate, no seek
                self.hash = hashlib.sha256()
                self.written = 0
                return
        os.ftruncate(self.fd, offset)
        os.lseek(self.fd, offset, os.SEEK_SET)
        if not offset:
            self.hash = hashlib.sha256()
        self.written = offset

    def offer(self) -> tuple[int, bytes]:
        """For resume: what we already have (offset, SHA-256 of those bytes): the partial
        file, else a destination of the right size (perhaps complete already)."""
        for name, dest in ((self.part, False), (self.name, True)):
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd)
            except OSError:
                continue
            st = os.fstat(fd)
            usable = stat.S_ISREG(st.st_mode) and (
                st.st_size == self.size if dest else st.st_size <= self.size and st.st_nlink == 1
            )
            if not usable:
                os.close(fd)
                continue
            if dest:
                self.from_dest = True
            else:
                _locked(fd)  # another transfer still writing it: EBUSY, not a torn prefix
            n, digest, self.hash = hash_prefix(fd, st.st_size)
            if dest:
                os.close(fd)
            else:
                self.fd = fd
            return n, digest
        return 0, hashlib.sha256().digest()

    def _check_unused(self) -> None:
        """An existing temporary file may be replaced unless a live transfer writes it."""
        try:
            fd = os.open(self.part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd)
        except OSError:
            return  # a symlink, gone meanwhile...: replaced below all the same
        os.close(_locked(fd))

    def write(self, data: memoryview) -> None:
        self.hash.update(data)
        view = data
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += len(data)

    def finish(self, digest: bytes, mode: int, mtime_ns: int | None) -> bool:
        """Verify against the sender's `digest`; on a match set mode (and mtime) and rename
        into place. False: the hash differs (the temporary file is removed)."""
        try:
            if self.hash.digest() != digest:
                if self.fd >= 0:
                    os.unlink(self.part, dir_fd=self.dirfd)
                return False
            if self.from_dest:
                fd = os.open(
                    self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd
                )
                try:
                    _set_meta(fd, mode, mtime_ns)
                finally:
                    os.close(fd)
                return True
            if self.kept is not None:
                _keep_owner(self.fd, self.kept)
            _set_meta(self.fd, mode, mtime_ns)
            os.rename(self.part, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            return True
        finally:
            self.drop()

    def discard(self) -> None:
        """Close and remove the temporary file (a full disk: its space is needed more than
        its bytes)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.part, dir_fd=self.dirfd)
        self.drop()

    def drop(self) -> None:
        """Close, keeping whatever was written as the partial file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _locked(fd: int) -> int:
    """fd, with the lock every transfer holds on the temporary file it writes (released when
    it closes): two transfers to one destination at once (a resume started while the
    interrupted transfer is still winding down) would otherwise write one file together."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, "another transfer is writing it; retry later") from None
    return fd


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """The replaced file's owner and group, as far as we may give them (root: both; a user:
    a group of theirs); the file keeps ours otherwise."""
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except OSError:
        with contextlib.suppress(OSError):
            os.fchown(fd, -1, old.st_gid)


def _set_meta(fd: int, mode: int, mtime_ns: int | None) -> None:
    os.fchmod(fd, mode)
    if mtime_ns is not None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))


def make_dir(base: int, parts: list[str], mode: int) -> None:
    """Create the directory (or accept an existing one; never through a symlink)."""
    fd = open_dir_at(base, parts[:-1])
    try:
        try:
            os.mkdir(parts[-1], mode | 0o700, dir_fd=fd)
        except FileExistsError:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a directory") from None
    finally:
        os.close(fd)


def set_dir_meta(base: int, parts: list[str], mode: int, mtime_ns: int | None) -> None:
    """A directory's mode and mtime, set after its contents arrived (they change its mtime)."""
    fd = open_dir_at(base, parts)
    try:
        _set_meta(fd, mode, mtime_ns)
    finally:
        os.close(fd)


def make_symlink(base: int, parts: list[str], target: str, mtime_ns: int | None) -> None:
    """Create (or replace) a symlink atomically: made under a temporary name, renamed."""
    fd = open_dir_at(base, parts[:-1])
    name = parts[-1]
    tmp = part_name(name)
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=fd)
        os.symlink(target, tmp, dir_fd=fd)
        if mtime_ns is not None:
            with contextlib.suppress(OSError):  # not every system sets a link's own times
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def read_into(fd: int, buf: bytearray, at: int, size: int | None = None) -> int:
    """Fill buf[at:at + size] (default: to the end) from fd (a regular file); returns bytes
    read (fewer only at EOF)."""
    view = memoryview(buf)[at : None if size is None else at + size]
    total = 0
    with view:
        while total < len(view):
            n = os.readv(fd, [view[total:]])
            if not n:
                break
            total += n
    return total
