"""`rexec cp [options] SRC... DST`: copy files to and from hosts, in scp's syntax.

A remote operand is `HOST:PATH` (PATH relative to the remote home; `HOST:` alone is the
home), anything else is local; exactly one side is remote. HOST is what `rexec run` takes
as TARGET: an alias, `host:port`, `[v6addr]:port`, or a host set (`lab[01-03]`, `@group`).
One host takes the lean path (the sync rexec.Client: no asyncio, as `rexec run`); a host set
fans out in rexec.cli.cpmany. Every outcome goes through `Report`: a line per failed file
and host on stderr, `--json` lines on stdout, the progress display, the exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rexec._record import Record
from rexec.cli.common import err, open_std_fds, trace_fn
from rexec.cli.outcome import (
    EXIT_TRANSFER_FAILED,
    UsageError,
    json_line,
    of_error,
    retry_notice,
    write_stdout,
)
from rexec.cli.progress import Progress
from rexec.cli.run import (
    RUN_FLAGS,
    Option,
    RunArgs,
    check_args,
    is_option,
    names_many_hosts,
    parse_option,
    run_options,
)

if TYPE_CHECKING:
    from rexec.transfer import TransferProgress, TransferResult

PORT_FOLLOWS = ":,!&^"  # after `:digits`, one of these: the digits were a port, not a PATH

CP_HELP = """\
usage: rexec cp [-h] [-r] [-p] [--resume] [-q] [--json] [--token-file FILE]
                [--connect-timeout SECS] [--retry N] [--retry-delay SECS] [--trace]
                [--suite {aesgcm,chachapoly}] [--fanout N] [-x HOSTS]
                SRC... DST

Copy files to or from hosts, as scp: a remote operand is HOST:PATH (PATH relative to the
remote home unless absolute; HOST: alone is the home), any other operand is local (a `/`
before the first `:` makes it local: ./a:b). Exactly one side is remote. HOST is an alias,
host[:port]:PATH, [v6addr]:PATH, [v6addr]:port:PATH, or a host set (lab[01-40], @group):
an upload goes to every host, a download from several writes DST/HOST/... Every file is
verified by SHA-256 at both ends and renamed into place only then.

options:
  -h, --help            show this help message and exit
  -r, --recursive       copy directories (symlinks inside are copied as links)
  -p, --preserve        keep modes and modification times
  --resume              continue partial files from their verified prefix
  -q, --quiet           no progress display (there is none when stderr is no terminal)
  --json                one JSON object per file and host on stdout (JSON Lines)
  --token-file FILE     file holding the client token (mode 0600)
  --connect-timeout SECS
                        deadline for connecting and the handshake
  --retry N             when connecting fails, try up to N more times (as rexec run)
  --retry-delay SECS    the first retry's wait (default 1), then doubling
  --trace               print every frame's type, channel and length to stderr
  --suite {aesgcm,chachapoly}
                        Noise cipher suite (default aesgcm)
  --fanout N            hosts connected at once (default 256)
  -x HOSTS, --exclude HOSTS
                        leave these hosts out (a host set; repeatable)

exit status:
  0         every file was copied to or from every host
  1         some file failed (its line on stderr); the others were copied
  255       a host could not be reached, authenticated or spoken to (its line on stderr)
  2         usage error
  many hosts: the highest status of a host
"""

# scp's options, then `rexec run`'s shared ones (their names, values and checks come from it)
_CP_OPTIONS: tuple[Option, ...] = (
    ("--recursive", "-r", "recursive"),
    ("--preserve", "-p", "preserve"),
    ("--resume", "", "resume"),
    ("--quiet", "-q", "quiet"),
    *run_options(
        "help",
        "json",
        "token_file",
        "connect_timeout",
        "retry",
        "retry_delay",
        "trace",
        "suite",
        "fanout",
        "exclude",
    ),
)
_CP_FLAGS = frozenset({"recursive", "preserve", "resume", "quiet"}) | RUN_FLAGS


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


class Plan(Record):
    """What to copy: `put` (local sources to `dest` on `host`) or `get` (remote sources on
    `host` to local `dest`). `host` is HOST as typed: an alias, an address or a host set."""

    __match_args__ = ("direction", "host", "sources", "dest")
    __slots__ = __match_args__
    direction: str
    host: str
    sources: tuple[str, ...]
    dest: str

    def __init__(self, direction: str, host: str, sources: Sequence[str], dest: str) -> None:
        self.direction = direction
        self.host = host
        self.sources = tuple(sources)
        self.dest = dest


# ---- operands ------------------------------------------------------------------------------


def split_operand(text: str) -> tuple[str | None, str]:
    """(HOST, PATH) of a remote operand, (None, text) of a local one.

    As scp: HOST ends at the first `:` outside brackets (`[::1]:path`); a `/` before it, a
    leading `:` or an unclosed `[` make the operand local. And as `rexec run`'s TARGET, HOST
    may hold ports: a `:` followed by digits and then `:` or a host-set operator is a port's
    (`h:8300:path`, `a:1,b:2:path`); `h:8300` alone is PATH 8300 on h, as scp reads it.
    """
    if text.startswith(":"):
        return None, text
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char == "[":
            close = text.find("]", pos)
            if close < 0:
                return None, text
            pos = close + 1
        elif char == "/":
            return None, text
        elif char == ":":
            digits = pos + 1
            while digits < end and text[digits] in "0123456789":
                digits += 1
            if digits > pos + 1 and digits < end and text[digits] in PORT_FOLLOWS:
                pos = digits  # a port: HOST goes on
                continue
            return text[:pos], text[pos + 1 :]
        else:
            pos += 1
    return None, text


def make_plan(operands: Sequence[str]) -> Plan:
    """The copy the operands ask for; UsageError says what is wrong with them."""
    if not operands:
        raise UsageError("the following arguments are required: SRC, DST")
    if len(operands) == 1:
        raise UsageError(f"missing destination after {operands[0]!r} (SRC... DST)")
    split = [split_operand(text) for text in operands]
    for (host, _), text in zip(split, operands, strict=True):
        if host == "unix":
            raise UsageError(
                f"{text}: a unix-socket server takes an alias here (client config: "
                f'[hosts.NAME] address = "unix:/path"), then NAME:PATH',
                parse=False,
            )
    *sources, (dest_host, dest_path) = split
    remote = [(host, text) for (host, _), text in zip(sources, operands, strict=False) if host]
    local = [text for (host, _), text in zip(sources, operands, strict=False) if host is None]
    if dest_host is not None and remote:
        raise UsageError(
            f"cannot copy between two remote operands ({remote[0][1]!r} and "
            f"{operands[-1]!r}): copy to a local directory first",
            parse=False,
        )
    if dest_host is not None:
        return Plan("put", dest_host, operands[:-1], dest_path or ".")
    if not remote:
        raise UsageError(
            "no remote operand: name the remote side HOST:PATH (a local name with a ':' "
            "needs a '/' before it: ./a:b)",
            parse=False,
        )
    if local:
        raise UsageError(
            f"the sources mix local and remote operands ({local[0]!r} and {remote[0][1]!r}): "
            "one side is remote, the other local",
            parse=False,
        )
    hosts = list(dict.fromkeys(host for host, _ in remote))
    if len(hosts) > 1:
        raise UsageError(
            f"the sources name different hosts ({hosts[0]!r} and {hosts[1]!r}): give one "
            "HOST (a host set copies from each of its hosts)",
            parse=False,
        )
    return Plan("get", hosts[0], [path or "." for _, path in sources], dest_path)


def parse_cp_args(argv: Sequence[str]) -> CpArgs:
    """Options anywhere among the operands (`--` ends them); raises the first UsageError,
    with `parsed` set, once the whole line is read."""
    args = CpArgs()
    rest = list(argv)
    first: UsageError | None = None
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            args.operands += rest
            break
        if not is_option(arg):
            args.operands.append(arg)
            continue
        try:
            parse_option(args, arg, rest, _CP_OPTIONS, _CP_FLAGS)
        except UsageError as exc:
            first = first or exc
        if args.help and first is None:
            return args
    if first is not None:
        first.parsed = args
        raise first
    return args


def check_cp_args(args: CpArgs) -> Plan:
    """`rexec run`'s checks of the shared options, then the operands; raises UsageError."""
    check_args(args)
    plan = make_plan(args.operands)
    args.target = plan.host
    return plan


# ---- what the user sees --------------------------------------------------------------------


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
    ) -> None:
        self.json = args.json
        self.direction = plan.direction
        self.status = 0
        self.pipe_closed = False
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

    def _say(self, lines: Sequence[str], redraw: bool = True) -> None:
        """Lines on stderr, the progress display cleared before and drawn again after."""
        if not lines:
            return
        if self.progress is None:
            self._stderr("".join(f"{line}\n" for line in lines))
            return
        text = self.progress.clear() + "".join(f"{line}\n" for line in lines)
        self._stderr(text + (self.progress.frame() if redraw else ""))

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
        if self.progress is not None:
            self.progress.finish(host, ok=result.ok)
        for f in result.files:
            self._json(file_json(host, self.direction, f))
        self._say([f"rexec cp: {host}:{f.path or '.'}: {f.error}" for f in result.failed])
        if not result.ok:
            self.status = max(self.status, EXIT_TRANSFER_FAILED)

    def failed(self, host: str, exc: BaseException, *, started: bool = False) -> None:
        """host failed as a whole (or, for a TransferError, some of its files did)."""
        result = getattr(exc, "result", None)
        if result is not None and hasattr(result, "files"):  # rexec.TransferError
            self.transferred(host, result)
            return
        if self.progress is not None:
            self.progress.finish(host, ok=False)
        outcome = of_error(exc, started=started)
        message = outcome.message or outcome.kind or "failed"
        self._json(host_json(host, self.direction, outcome.kind or "internal", message))
        self._say([f"rexec cp: {host}: {message}"])
        self.status = max(self.status, outcome.exit_status)

    def close(self) -> int:
        """The final progress frame (left on the screen); returns the exit status."""
        if self.progress is not None:
            self._stderr(self.progress.close())
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


# ---- one host --------------------------------------------------------------------------


def cmd_cp(argv: list[str]) -> int:
    open_std_fds()
    try:
        args = parse_cp_args(argv)
    except UsageError as exc:
        return usage_failure(exc.parsed, exc)
    if args.help:
        sys.stdout.write(CP_HELP)
        return 0
    try:
        plan = check_cp_args(args)
    except UsageError as exc:
        return usage_failure(args, exc)
    if names_many_hosts(args):  # a host set: asyncio, in rexec.cli.cpmany (never for one)
        from rexec.cli.cpmany import copy_many

        code = copy_many(args, plan)
        if code is not None:
            return code  # else the set was one plain host (lab[7]): args.target names it
    assert args.target is not None
    return copy_one(args, plan, args.target)


def copy_one(args: CpArgs, plan: Plan, host: str) -> int:
    """The copy to or from one host, on the sync client."""
    from rexec.client.core import DEFAULT_RETRY_DELAY
    from rexec.errors import RexecError

    report = Report(args, plan, [host])
    client = None
    started = False
    try:
        from rexec import Client, Suite

        def notice(exc: RexecError, n: int, wait: float) -> None:
            err(retry_notice(exc, n, args.retry, wait))

        client = Client(
            host,
            token_file=args.token_file,
            connect_timeout=args.connect_timeout,
            suite=Suite.AESGCM if args.suite == "aesgcm" else Suite.CHACHAPOLY,
            trace=trace_fn() if args.trace else None,
            retry=args.retry,
            retry_delay=args.retry_delay or DEFAULT_RETRY_DELAY,
            on_retry=notice,
        )
        report.start(host)
        started = True
        options: dict[str, Any] = {
            "recursive": args.recursive,
            "preserve": args.preserve,
            "resume": args.resume,
            "progress": report.callback(host),
            "check": False,
        }
        if plan.direction == "put":
            result = client.put(plan.sources, plan.dest, **options)
        else:
            result = client.get(plan.sources, plan.dest, **options)
        client.close()
        report.transferred(host, result)
    except (RexecError, KeyboardInterrupt) as exc:
        report.failed(host, exc, started=started)
    finally:
        if client is not None:
            client.abort()
    return report.close()
