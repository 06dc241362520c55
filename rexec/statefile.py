"""Trusted state files: the one StrictModes rule for every file and directory the server trusts.

The token store decides who may run commands, the audit log records what they ran, and the
state directory holds both (and the first client token). If anyone but the server's user can
write one of them, or rename an entry of a directory on the way to it, they can plant a token
or rewrite the record. So, as sshd's StrictModes does:

- the file or state directory itself must be owned by the server's effective user, a file must
  give group and others no access (0600: the audit log holds command lines), a directory must
  not be writable by group or others;
- every directory above it, up to `/`, must be owned by root or by that user and not be
  writable by group or others. A sticky directory (mode +t, like /tmp) owned by root or by that
  user is accepted: there only an entry's owner may rename or delete it, and the entry below it
  is checked by the same rule. sshd stops its walk at the user's home directory and so never
  meets /tmp; we walk to `/`, and without the exception no state could live under /tmp.

Paths are made canonical (realpath of the directory) before the walk and the canonical path is
what gets opened, so a symbolic link in the directories cannot be swapped after the check; the
last component is opened with O_NOFOLLOW and checked with fstat on the open descriptor.
Every refusal is one line naming the path and the command that fixes it.
Standard library only: the CLI uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from rexec.errors import ConfigError

__all__ = [
    "check_owner",
    "check_parents",
    "check_state_dir",
    "make_state_dir",
    "open_trusted",
    "write_secret",
]


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_owner(path: str | os.PathLike[str], st: os.stat_result, what: str) -> None:
    """The file or directory must belong to the user the server runs as."""
    euid = os.geteuid()
    if st.st_uid != euid:
        me = _user(euid)
        raise ConfigError(
            f"{what} {os.fspath(path)} is owned by {_user(st.st_uid)} (uid {st.st_uid}), not by "
            f"{me} (uid {euid}) who runs rexec: fix it with: chown {me} {os.fspath(path)}"
        )


def _check_dir(path: str, st: os.stat_result, what: str) -> None:
    """One directory above a trusted path: root's or ours, and nobody else may write to it."""
    if stat.S_ISLNK(st.st_mode):  # only on a race: the walk starts from a realpath
        raise ConfigError(f"directory {path} above {what} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} above {what} is not a directory")
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise ConfigError(
            f"directory {path} above {what} is owned by {_user(st.st_uid)} (uid {st.st_uid}), "
            f"who could replace what it holds: fix it with: chown {_user(euid)} {path} "
            f"(or move the state elsewhere)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise ConfigError(
            f"directory {path} above {what} is writable by group or others (mode {mode:04o}): "
            f"fix it with: chmod go-w {path}"
        )


def check_parents(path: str | os.PathLike[str], what: str) -> Path:
    """Check every directory above path, up to /; return the canonical path to open.

    The last component is kept as is (it may be a symbolic link, which the open refuses).
    """
    path = Path(path)
    label = f"{what} {path}"
    parent = Path(os.path.realpath(path.parent))
    for directory in (parent, *parent.parents):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            continue  # not made yet: it holds nothing, and rexec creates it 0700
        except OSError as exc:
            raise ConfigError(f"cannot check {directory} above {label}: {exc.strerror}") from None
        _check_dir(str(directory), st, label)
    return parent / path.name


def check_state_dir(path: str | os.PathLike[str], what: str = "state directory") -> Path:
    """The directory itself (ours, not writable by group or others) and everything above it."""
    real = check_parents(path, what)
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise ConfigError(f"cannot check {what} {real}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(real))  # a link to the real directory: check that one
        return check_state_dir(real, what)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {real} is not a directory")
    check_owner(real, st, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"{what} {real} is writable by group or others (mode {mode:04o}): "
            f"fix it with: chmod go-w {real}"
        )
    return real


def make_state_dir(path: str | os.PathLike[str], what: str = "state directory") -> Path:
    """Create the directory (0700) if missing, then check_state_dir: a failure is one
    ConfigError naming the directory, not a bare OSError that says only errno."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        pass  # something else is there: check_state_dir says what is wrong with it
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {os.fspath(path)}: {exc.strerror}") from None
    return check_state_dir(path, what)


def check_file(path: str | os.PathLike[str], st: os.stat_result, what: str) -> None:
    """A trusted file: regular, ours, and no access at all for group and others."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {os.fspath(path)} is not a regular file")
    check_owner(path, st, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {os.fspath(path)} has mode {mode:04o}: group and others must have no "
            f"access; fix it with: chmod 600 {os.fspath(path)}"
        )


def open_trusted(
    path: str | os.PathLike[str], flags: int, what: str, mode: int = 0o600
) -> tuple[int, os.stat_result]:
    """Open a trusted file without following a symbolic link; check it on the descriptor.

    FileNotFoundError propagates (without O_CREAT the caller decides what a missing file
    means); every other refusal is a ConfigError naming the fix.
    """
    real = check_parents(path, what)
    try:
        fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{what} {real} is a symbolic link: refusing to follow it; "
                f"fix it with: rm {real} (rexec creates the file itself)"
            ) from None
        raise ConfigError(f"cannot open {what} {real}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        check_file(real, st, what)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def write_secret(path: str | os.PathLike[str], data: bytes, what: str) -> Path:
    """Atomically replace path with data, mode 0600; return the canonical path written.

    The bytes go to a new file made with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 (mkstemp) in
    the same directory, fsynced, then renamed over path: whatever was at path (a planted file
    of mode 0666, a symbolic link) is replaced, never written through.
    """
    real = check_parents(path, what)
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(real.parent)
    return real


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on a directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystem-specific
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
