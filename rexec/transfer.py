"""What a file transfer (`put`/`get`, `rexec cp`) reports: types only, no I/O.

A shared leaf like rexec.result, and lean for the same reason: rexec.Client's signatures
name these types, so `rexec run` imports this module on its start-up path, where
`dataclasses` is too slow (DESIGN.md 2a): they are frozen records (equality, hash, repr,
immutability as a frozen dataclass) with `as_dict()` for JSON. TransferError lives here
rather than in rexec.errors for the reason CommandFailed lives in rexec.result: it holds a
TransferResult, and rexec.errors sits below everything (it imports nothing).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from rexec._record import FrozenRecord, setfield
from rexec.errors import RexecError

TYPE_CHECKING = False  # not typing's: this module is on `rexec run`'s path (typing loads re)
if TYPE_CHECKING:
    from typing import Any


class FileStatus(enum.StrEnum):
    """How one file of a transfer ended."""

    OK = "ok"  # written and verified (the receiver's SHA-256 matched the sender's)
    SKIPPED = "skipped"  # nothing to write (--resume found it complete and verified)
    FAILED = "failed"  # not written; `error` says why; an older destination is untouched


class _Fields(FrozenRecord):
    __slots__ = ()

    def __init__(self, *values: object) -> None:
        for name, value in zip(self.__match_args__, values, strict=True):
            setfield(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (nested records as dicts, tuples as lists): ready for json."""
        return {name: _plain(getattr(self, name)) for name in self.__match_args__}


def _plain(value: object) -> object:
    if isinstance(value, _Fields):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class FileResult(_Fields):
    """One file, directory or symlink of a transfer.

    `path` is always the entry's wire path, whichever side failed: relative, POSIX, its
    first part the source's own name (`tree/sub/f` for a source `/src/tree`), never
    absolute. Where it lands is the destination's rule (scp's): under DST when DST is a
    directory, else with that first part renamed to DST. One entry has path "": the
    destination itself, when a local destination could not be opened (nothing was sent).
    """

    __match_args__ = ("path", "kind", "size", "sent", "sha256", "status", "error", "at_source")
    __slots__ = __match_args__
    path: str  # the wire path (see above); "" for the destination itself
    kind: str  # "file" | "dir" | "symlink"
    size: int  # bytes of the file (0 for dir/symlink)
    sent: int  # payload bytes actually sent for it (less than size after --resume)
    sha256: str | None  # hex of the whole file, verified at both ends (files only)
    status: FileStatus
    error: str | None  # one line, e.g. "No space left on device", when FAILED
    # FAILED where the file is read (missing, unreadable, vanished mid-copy: name the source)
    # rather than where it is written (disk full, permission denied: name the destination)
    at_source: bool

    def __init__(
        self,
        path: str,
        kind: str,
        size: int,
        sent: int,
        sha256: str | None,
        status: FileStatus,
        error: str | None = None,
        at_source: bool = False,
    ) -> None:
        setfield(self, "path", path)  # (unrolled: one per file of a transfer)
        setfield(self, "kind", kind)
        setfield(self, "size", size)
        setfield(self, "sent", sent)
        setfield(self, "sha256", sha256)
        setfield(self, "status", status)
        setfield(self, "error", error)
        setfield(self, "at_source", at_source)


class TransferResult(_Fields):
    """A whole transfer to or from one host."""

    __match_args__ = ("target", "direction", "files", "bytes", "duration")
    __slots__ = __match_args__
    target: str  # the host as the user named it
    direction: str  # "put" | "get"
    files: tuple[FileResult, ...]
    bytes: int  # payload bytes sent on the wire
    duration: float  # seconds

    def __init__(
        self,
        target: str,
        direction: str,
        files: tuple[FileResult, ...],
        bytes: int,
        duration: float,
    ) -> None:
        super().__init__(target, direction, files, bytes, duration)

    @property
    def ok(self) -> bool:
        """True when every file is OK or SKIPPED."""
        return all(f.status is not FileStatus.FAILED for f in self.files)

    @property
    def failed(self) -> tuple[FileResult, ...]:
        """The files that FAILED, in transfer order."""
        return tuple(f for f in self.files if f.status is FileStatus.FAILED)


class TransferProgress(_Fields):
    """Passed to the progress callback, from the driver's thread or event loop."""

    __match_args__ = ("path", "done", "size", "total_done", "total", "files_done", "files")
    __slots__ = __match_args__
    path: str  # current file
    done: int  # bytes of the current file done
    size: int  # its size
    total_done: int  # bytes done in this transfer
    total: int | None  # bytes of the whole transfer when known (get: once the tree is listed)
    files_done: int
    files: int | None

    def __init__(
        self,
        path: str,
        done: int,
        size: int,
        total_done: int,
        total: int | None,
        files_done: int,
        files: int | None,
    ) -> None:
        super().__init__(path, done, size, total_done, total, files_done, files)


ProgressCallback = Callable[[TransferProgress], None]


class TransferError(RexecError):
    """Some files of a transfer FAILED (raised with check=True, after the whole transfer ran:
    the other files were copied). `.result` is the TransferResult."""

    result: TransferResult

    def __init__(self, result: TransferResult) -> None:
        failed = result.failed
        what = f"{len(failed)} of {len(result.files)} files failed"
        if failed:
            what += f"; {failed[0].path or 'the destination'}: {failed[0].error}"
        super().__init__(f"{result.target}: {what}")
        self.result = result
