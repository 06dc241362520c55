"""`rexec cp`'s outcomes as the user sees them, for one host (rexec.cli.cp) and many
(rexec.cli.cpmany): the parsed command line, a line per failed file and host on stderr,
`--json` lines on stdout, the progress display on a terminal, and the exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from rexec.cli.outcome import (
    EXIT_INTERRUPTED,
    EXIT_TRANSFER_FAILED,
    UsageError,
    json_line,
    of_error,
    write_stdout,
)
from rexec.cli.progress import Progress, shown
from rexec.cli.run import RunArgs

INTERRUPTED = "interrupted: closing the connection (partial files are kept for --resume)"

if TYPE_CHECKING:
    from rexec.transfer import TransferProgress, TransferResult


class CpArgs(RunArgs):
    """The parsed `rexec cp` command line: `rexec run`'s fields (so that its checks and the
    host-set selection read it as they read run's), scp's flags and the operands."""

    def __init__(self) -> None:
        super().__init__()
        self.operands: list[str] = []
        self.recursive = False
        self.preserve = False
        self.resume = False
        self.quiet = False

    def transfer_options(self, progress: Any) -> dict[str, Any]:
        """put()'s and get()'s keyword arguments for this command line; check=False: every
        file's outcome is reported, none raises."""
        return {
            "recursive": self.recursive,
            "preserve": self.preserve,
            "resume": self.resume,
            "progress": progress,
            "check": False,
        }


class Plan(NamedTuple):
    """What to copy: `put` (local sources to `dest` on `host`) or `get` (remote sources on
    `host` to local `dest`). `host` is HOST as typed: an alias, an address or a host set."""

    direction: str
    host: str
    sources: tuple[str, ...]
    dest: str

    def failed_name(
        self, host: str, f: Any, dest: str | None = None, into: bool | None = None
    ) -> str:
        """How to name a failed file (f: a rexec.FileResult) as the user wrote it: the source
        when it failed where it is read, else the destination; `HOST:` before a remote one.
        `dest`: where this host's files land when not DST itself (DST/HOST/ in a fan-out);
        `into`: whether DST was a directory to copy into, when known (a local one)."""
        if f.at_source:
            path = self.source_path(f.path)
        else:
            path = self.dest_path(f.path, self.dest if dest is None else dest, into)
        remote = (self.direction == "get") == bool(f.at_source)
        return f"{host}:{path}" if remote else path

    def source_path(self, wire: str) -> str:
        """The source path a wire path (its first part the source's own name) stands for:
        that source's directory joined to it."""
        first = wire.partition("/")[0]
        for source in self.sources:
            if source.rstrip("/").rpartition("/")[2] == first:
                if wire == first:
                    return source  # the source itself: as it was typed
                return _join(source.rstrip("/").rpartition("/")[0], wire, source)
        return wire

    def dest_path(self, wire: str, dest: str, into: bool | None = None) -> str:
        """The destination path a wire path stands for: into a directory (several sources,
        an existing directory: `into`; unknown for a remote one, so guessed from DST/, `.`
        or the home), DST joined to it; one source, DST in place of its first part (DST
        read as the new name); DST itself for "" (rexec.FileResult's rule: the destination
        could not be opened)."""
        if not wire:
            return dest.rstrip("/") or dest or "."
        _, slash, rest = wire.partition("/")
        if into is None:
            into = dest.endswith("/") or dest == "."
        if len(self.sources) > 1 or into:
            return _join(dest.rstrip("/"), wire, dest)
        return dest.rstrip("/") + slash + rest if rest else dest


def _join(parent: str, wire: str, original: str) -> str:
    """parent/wire; wire alone for the home (`.` or ``), `/wire` at the root."""
    if parent in ("", "."):
        return "/" + wire if original.startswith("/") else wire
    return f"{parent}/{wire}"


def file_json(host: str, direction: str, f: Any) -> dict[str, Any]:
    """`--json`'s object for one file of one host (f: a rexec.FileResult)."""
    error = None if f.error is None else {"kind": "file", "message": f.error}
    return {
        "host": host,
        "direction": direction,
        "path": f.path,
        "kind": f.kind,
        "size": f.size,
        "sent": f.sent,
        "sha256": f.sha256,
        "status": str(f.status),
        "error": error,
    }


def host_json(host: str | None, direction: str | None, kind: str, message: str) -> dict[str, Any]:
    """`--json`'s object for a host that failed as a whole (no connection, a broken one)."""
    return {
        "host": host,
        "direction": direction,
        "path": None,
        "kind": None,
        "size": 0,
        "sent": 0,
        "sha256": None,
        "status": "failed",
        "error": {"kind": kind, "message": message},
    }


def worth_a_line(failed: Sequence[Any]) -> list[Any]:
    """The failed files (rexec.FileResult) that get a line on stderr: all but those below a
    directory that failed at the same end, whose one line says it all (as scp's: a tree
    sent onto a file is one error, not one per entry in it). --json still lists each."""
    out: list[Any] = []
    dirs: set[tuple[str, bool]] = set()
    for f in failed:
        parent = f.path
        while (parent := parent.rpartition("/")[0]) and (parent, f.at_source) not in dirs:
            pass
        if parent:
            continue
        out.append(f)
        if f.kind == "dir":
            dirs.add((f.path, f.at_source))
    return out


def terminal_size() -> tuple[int, int] | None:
    """(columns, rows) of the terminal on stderr, None when stderr is no terminal."""
    try:
        if not os.isatty(2):
            return None
        size = os.get_terminal_size(2)
    except OSError:
        return None
    return size.columns or 80, size.lines or 24


class Report:
    """Every outcome of one `rexec cp` run, as the user sees it, and its exit status.

    A failed file: `rexec cp: HOST:PATH: error` on stderr; a failed host: `rexec cp: HOST:
    error`; `--json`: one object per file and per failed host on stdout. The progress
    display (a terminal only) is cleared before any line and drawn again after it.
    """

    def __init__(
        self,
        args: CpArgs,
        plan: Plan,
        hosts: Sequence[str],
        *,
        size: tuple[int, int] | None = None,
        dest_for: Callable[[str], str] | None = None,
    ) -> None:
        self.json = args.json
        self.plan = plan
        self.dest_for = dest_for  # a host's own destination (a fan-out's DST/HOST/)
        # a download's DST is a directory to copy into iff it is one now, before any copy
        self.local_into = (
            os.path.isdir(plan.dest) if plan.direction == "get" and dest_for is None else None
        )
        self.direction = plan.direction
        self.status = 0
        self.pipe_closed = False
        self._said: set[str] = set()  # the failed files' lines already on stderr
        # how each host ended, for a host set's summary line (rexec.cli.cpmany): its
        # TransferResult, or what it failed with and whether its transfer had started
        self.ended: dict[str, TransferResult | tuple[BaseException, bool]] = {}
        if size is None and not args.quiet:
            size = terminal_size()
        self.progress = None if size is None else Progress(hosts, columns=size[0], rows=size[1])

    def _stderr(self, text: str) -> None:
        if text and sys.stderr is not None:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except OSError:
                pass

    def _say(self, lines: Sequence[str]) -> None:
        """Lines on stderr, the progress display cleared before and drawn again after."""
        if not lines:
            return
        if self.progress is None:
            self._stderr("".join(f"{line}\n" for line in lines))
            return
        text = self.progress.clear() + "".join(f"{line}\n" for line in lines)
        self._stderr(text + self.progress.redraw())

    def notice(self, line: str) -> None:
        """A line on stderr (a retry, a traced frame) that is no outcome."""
        self._say([line])

    def _json(self, obj: dict[str, Any]) -> None:
        if self.json and not self.pipe_closed and not write_stdout(json_line(obj)):
            self.pipe_closed = True

    def start(self, host: str) -> None:
        if self.progress is not None:
            self.progress.start(host)

    def callback(self, host: str) -> Any:
        """The progress callback for host's transfer (None without a display)."""
        progress = self.progress
        if progress is None:
            return None

        def update(event: TransferProgress) -> None:
            progress.update(host, event)
            if progress.due():
                self._stderr(progress.frame())

        return update

    def transferred(self, host: str, result: TransferResult) -> None:
        """host's transfer ran to its end: a line per failed file, its --json lines."""
        self.ended[host] = result
        if self.progress is not None:
            self.progress.finish(host, ok=result.ok)
        for f in result.files:
            self._json(file_json(host, self.direction, f))
        dest = None if self.dest_for is None else self.dest_for(host)
        name = self.plan.failed_name
        into = self.local_into
        lines = [
            shown(f"rexec cp: {name(host, f, dest, into)}: {f.error}")
            for f in worth_a_line(result.failed)
        ]
        # a local file's failure names no host: the same line for every host, said once
        self._say([line for line in dict.fromkeys(lines) if line not in self._said])
        self._said.update(lines)
        if not result.ok:
            self.status = max(self.status, EXIT_TRANSFER_FAILED)

    def failed(self, host: str, exc: BaseException, *, started: bool = False) -> None:
        """host failed as a whole (or, for a TransferError, some of its files did)."""
        result = getattr(exc, "result", None)
        if result is not None and hasattr(result, "files"):  # rexec.TransferError
            self.transferred(host, result)
            return
        self.ended[host] = (exc, started)
        if self.progress is not None:
            self.progress.finish(host, ok=False)
        outcome = of_error(exc, started=started)
        message = outcome.message or outcome.kind or "failed"
        if isinstance(exc, KeyboardInterrupt):
            message = INTERRUPTED
        self._json(host_json(host, self.direction, outcome.kind or "internal", message))
        self._say([shown(f"rexec cp: {host}: {message}")])
        self.status = max(self.status, outcome.exit_status)

    def interrupted(self, summary: str | None = None) -> int:
        """Ctrl-C during a fan-out: every connection closes; returns the exit status."""
        self._say([f"rexec cp: {INTERRUPTED}"])
        self.close(summary)
        return EXIT_INTERRUPTED

    def close(self, summary: str | None = None) -> int:
        """The final progress frame (left on the screen), then a host set's `summary` line;
        returns the exit status."""
        if self.progress is not None:
            self._stderr(self.progress.close())
        if summary is not None:
            self._stderr(summary + "\n")
        return self.status


def usage_failure(args: CpArgs | None, exc: BaseException) -> int:
    """A failure before any copy began (usage, config): one line, its --json object."""
    outcome = of_error(exc)
    if isinstance(exc, UsageError):
        line = f"rexec cp: error: {exc}" if exc.parse else f"rexec cp: {exc}"
    else:
        line = f"rexec cp: {outcome.message}"
    if sys.stderr is not None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if args is not None and args.json:
        kind = outcome.kind or "internal"
        write_stdout(json_line(host_json(args.target, None, kind, outcome.message or "")))
    return outcome.exit_status
