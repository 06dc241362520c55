"""`rexec cp [options] SRC... DST`: copy files to and from hosts, in scp's syntax.

A remote operand is `HOST:PATH` (PATH relative to the remote home; `HOST:` alone is the
home), anything else is local; exactly one side is remote. HOST is what `rexec run` takes
as TARGET: an alias, `host:port`, `[v6addr]:port`, or a host set (`lab[01-03]`, `@group`).
One host takes the lean path (the sync rexec.Client: no asyncio, as `rexec run`); a host set
fans out in rexec.cli.cpmany. Both report through rexec.cli.cpreport.Report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rexec.cli.common import open_std_fds
from rexec.cli.cpreport import CpArgs, Plan, Report, usage_failure
from rexec.cli.outcome import UsageError
from rexec.cli.run import (
    RUN_FLAGS,
    Option,
    check_args,
    is_option,
    names_many_hosts,
    open_client,
    parse_option,
    run_options,
)

PORT_FOLLOWS = ":,!&^"  # after `:digits`, one of these: the digits were a port, not a PATH

CP_HELP = """\
usage: rexec cp [-h] [-r] [-p] [--resume] [-q] [--json] [--token-file FILE]
                [--connect-timeout SECS] [--retry N] [--retry-delay SECS] [--trace]
                [--suite {aesgcm,chachapoly}] [--fanout N] [-x HOSTS]
                SRC... DST

Copy files to or from hosts, as scp. A remote operand is HOST:PATH (PATH relative to the
remote home unless absolute; HOST: alone is the home); any other operand is local (a `/`
before the first `:` makes it local: ./a:b). Exactly one side is remote. HOST is an alias,
a host, host:port (h:8300:PATH), [v6addr], [v6addr]:port, or a host set (lab[01-40], a,b,
@group): an upload goes to every host, a download from several writes DST/HOST/..., and
the copy ends with one summary line on stderr, as `rexec run` on a host set. Every file is
verified by SHA-256 at both ends and renamed into place only then.

examples:
  rexec cp build.tar.gz lab1:/srv/app/      upload into /srv/app/ on lab1
  rexec cp lab1:/var/log/syslog .           download into the current directory
  rexec cp -r -p site/ 'lab[01-40]:www/'    a tree to every host, modes and mtimes kept
  rexec cp -r @lab:/var/log/app logs/       from each host into logs/HOST/app/...
  rexec cp --resume big.iso lab1:           finish an interrupted copy

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
  130       interrupted (Ctrl-C): partial files are kept for --resume
  2         usage error
  many hosts: the highest status of a host
"""

# scp's options, then `rexec run`'s shared ones (their names, values and checks come from it)
CP_OPTIONS: tuple[Option, ...] = (
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
        from rexec.client.xfercore import source_name  # (put()'s own check, before connecting)

        try:
            for source in operands[:-1]:
                source_name(source)
        except ValueError as exc:
            raise UsageError(str(exc), parse=False) from None
        return Plan("put", dest_host, tuple(operands[:-1]), dest_path or ".")
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
    from rexec.client.xfercore import check_remote_source  # (get()'s own check)

    try:
        for _, path in sources:
            check_remote_source(path)
    except ValueError as exc:
        raise UsageError(str(exc), parse=False) from None
    return Plan("get", hosts[0], tuple(path or "." for _, path in sources), dest_path)


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
            parse_option(args, arg, rest, CP_OPTIONS, _CP_FLAGS)
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
    from rexec.errors import RexecError

    report = Report(args, plan, [host])
    client = None
    started = False
    try:
        client = open_client(args, host)
        report.start(host)
        started = True
        options = args.transfer_options(report.callback(host))
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
