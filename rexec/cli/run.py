"""`rexec run`: one command on one host, on the lean path (no asyncio, no pydantic).

Exit codes (the table is rexec.cli.outcome.EXIT_STATUS_HELP): the remote code; 128+N when
killed by signal N; 124 when the server's deadline killed it; 255 for connection, auth,
protocol, refusal or policy failures (as ssh does); 2 for usage errors.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence

from rexec.cli.common import (
    Interrupts,
    TerminalSignal,
    err,
    open_std_fds,
    parse_env,
    trace_fn,
    unknown_command,
    unwind_on_termination,
    writer,
)
from rexec.cli.outcome import (
    EXIT_SIGPIPE,
    EXIT_STATUS_HELP,
    JUnitCase,
    Outcome,
    Tail,
    UsageError,
    check_junit_path,
    fail_early,
    json_line,
    json_object,
    of_error,
    of_result,
    retry_notice,
    write_junit,
    write_stdout,
)
from rexec.result import MAX_OUTPUT, Head, dropped_fields

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path
if TYPE_CHECKING:
    from rexec import Client
    from rexec.client.blocking import Sink
    from rexec.errors import RexecError

# ---- run ---------------------------------------------------------------------------


RUN_HELP = (
    """\
usage: rexec run [-h] [--token-file FILE] [-e K=V] [-C DIR] [--timeout SECS]
                 [--connect-timeout SECS] [--retry N] [--retry-delay SECS] [-n] [-t | -T]
                 [--json] [--max-output SIZE] [--junit FILE] [--trace]
                 [--suite {aesgcm,chachapoly}]
                 [--fanout N] [-x HOSTS] [-b] [--outdir DIR] [--failed-to FILE]
                 TARGET [options] CMD...
       rexec run --hosts-from FILE [options] CMD...

Run one command on TARGET, or on every host of a host set. One CMD argument is a shell
command line (run by /bin/sh -c, as with ssh); several are an exact argv (no shell). Options
go before or after TARGET: the first argument after TARGET that is not an option starts CMD,
and `--` ends the options.

positional arguments:
  TARGET                host[:port], unix:/path, or a client-config alias; or a host set:
                        lab1,lab2  lab[01-40]  rack[1-2]-node[1-4]  127.0.1.[1-9]:8300
                        @group (client config [groups])  a[1-9]!a5 (! & ^: minus, and, xor)
  CMD...                the command to run

options:
  -h, --help            show this help message and exit
  --token-file FILE     file holding the client token (mode 0600)
  -e K=V, --env K=V     set a remote environment variable (repeatable)
  -C DIR, --cwd DIR     remote working directory
  --timeout SECS        server-enforced deadline; exit status 124 when it fires
  --connect-timeout SECS
                        deadline for connecting and the handshake
  --retry N             when connecting fails (refused, unreachable, timed out, server
                        busy, handshake broken off), try up to N more times; never after
                        a failed authentication, never once the command was sent
  --retry-delay SECS    the first retry's wait (default 1); each next one doubles, plus up
                        to half at random, at most 30 s; none starts 300 s after the first
  -n, --no-stdin        do not forward stdin (the command gets EOF at once)
  -t, --tty             run the command on a pseudo-terminal (for top, sudo prompts,
                        progress bars): one output stream; from a terminal, keys go as
                        typed and ~. disconnects
  -T                    no pseudo-terminal (the default; after -t: cancels it)
  --json                print one JSON object instead of streaming output, whatever the
                        outcome: the result, `exit_status`, and `error` ({kind, message},
                        null when the command ran to its exit); see README
  --max-output SIZE     output kept per host and stream for --json, -b and --outdir (bytes,
                        or with K, M, G: KiB, MiB, GiB; default 64M; 0: no limit): the
                        first SIZE bytes; the rest is read and dropped, and the command runs
                        on (--json counts it in stdout_dropped/stderr_dropped)
  --junit FILE          write a JUnit XML report: one testcase per host (a failure for a
                        host that did not succeed: its status and the end of its stderr)
  --trace               print every frame's type, channel and length to stderr
  --suite {aesgcm,chachapoly}
                        Noise cipher suite (default aesgcm)

many hosts (a host set, or any option below): output lines prefixed `host: ` as they come,
a summary line on stderr, exit status 0 when every host succeeded, else the highest status
of a host (255 unreachable, auth or protocol failure; 124 timeout; 128+N signal N); stdin,
when not a terminal, is read once (up to 64 MiB) and sent to every host:
  --fanout N            hosts connected at once (default 256)
  -x HOSTS, --exclude HOSTS
                        leave these hosts out (a host set; repeatable)
  --hosts-from FILE     read the host set from FILE (one per line, or folded); no TARGET
  -b, --gather          at the end, hosts with the same output and status folded under a
                        header: ---------------- lab[01-38] (38) exit 0
  --json                one JSON object per host (JSON Lines) as each finishes
  --outdir DIR          write DIR/HOST.out, DIR/HOST.err and DIR/HOST.status
  --failed-to FILE      write the hosts that did not succeed (for --hosts-from FILE)

"""
    + EXIT_STATUS_HELP
)

Option = tuple[str, str, str]  # (long, short, attribute)

# (long, short, attribute), in --help order. A hand-written parser, not argparse: `rexec run`
# is a process per command and argparse (+gettext, shutil) costs it ~4-10 ms (DESIGN.md 2a).
# Its rules and messages follow argparse's: unique prefixes of long options, `--opt=value`,
# `-Cvalue`, `-C=value`, clustered flags (`-nC DIR`), and exit status 2 on errors.
_RUN_OPTIONS = (
    ("--help", "-h", "help"),
    ("--token-file", "", "token_file"),
    ("--env", "-e", "env"),
    ("--cwd", "-C", "cwd"),
    ("--timeout", "", "timeout"),
    ("--connect-timeout", "", "connect_timeout"),
    ("--retry", "", "retry"),
    ("--retry-delay", "", "retry_delay"),
    ("--no-stdin", "-n", "no_stdin"),
    ("--tty", "-t", "tty"),
    ("", "-T", "no_tty"),  # no long name: `--no` stays short for --no-stdin
    ("--json", "", "json"),
    ("--max-output", "", "max_output"),
    ("--junit", "", "junit"),
    ("--trace", "", "trace"),
    ("--suite", "", "suite"),
    # many hosts (rexec.cli.fleet)
    ("--fanout", "", "fanout"),
    ("--exclude", "-x", "exclude"),
    ("--hosts-from", "", "hosts_from"),
    ("--gather", "-b", "gather"),
    ("--outdir", "", "outdir"),
    ("--failed-to", "", "failed_to"),
)
_RUN_FLAGS = frozenset({"help", "no_stdin", "tty", "no_tty", "json", "trace", "gather"})
RUN_FLAGS = _RUN_FLAGS  # the shared flags that other front ends' tables include
_SUITES = ("aesgcm", "chachapoly")


class RunArgs:
    """The parsed `rexec run` command line."""

    def __init__(self) -> None:
        self.target: str | None = None
        self.command: list[str] = []
        self.token_file: str | None = None
        self.env: list[str] = []
        self.cwd: str | None = None
        self.timeout: float | None = None
        self.connect_timeout: float | None = None
        self.retry = 0
        self.retry_delay: float | None = None
        self.no_stdin = False
        self.tty = False  # -t and -T: the last one given wins
        self.json = False
        self.max_output = MAX_OUTPUT  # 0: no limit
        self.junit: str | None = None
        self.trace = False
        self.suite = "aesgcm"
        self.help = False
        self.fanout: int | None = None
        self.exclude: list[str] = []
        self.hosts_from: str | None = None
        self.gather = False
        self.outdir: str | None = None
        self.failed_to: str | None = None


def _is_negative_number(arg: str) -> bool:
    """`-5` or `-.5`: argparse's rule for a dash argument that is a value, not an option."""
    whole, dot, frac = arg[1:].partition(".")
    if dot:
        return (not whole or whole.isdecimal()) and frac.isdecimal()
    return whole.isdecimal()


def is_option(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and not _is_negative_number(arg)


def _long_option(
    arg: str, name: str, options: Sequence[Option] = _RUN_OPTIONS
) -> tuple[str, str, str]:
    """The option `name` (`--x` of `--x=v`) names: exact, else a unique prefix."""
    matches = [opt for opt in options if opt[0] == name]
    if not matches:
        matches = [opt for opt in options if opt[0].startswith(name)]
    if len(matches) > 1:
        names = ", ".join(opt[0] for opt in matches)
        raise UsageError(f"ambiguous option: {arg} could match {names}")
    if not matches:
        raise UsageError(f"unrecognized arguments: {arg}")
    return matches[0]


def _set_option(
    args: RunArgs,
    opt: tuple[str, str, str],
    value: str | None,
    rest: list[str],
    flags: frozenset[str] = _RUN_FLAGS,
) -> None:
    """Apply one option; `value` is its attached value, else it takes rest[0]."""
    long, short, attr = opt
    shown = f"{short}/{long}" if short else long
    if attr in flags:
        if value is not None:
            raise UsageError(f"argument {shown}: ignored explicit argument {value!r}")
        if attr in ("tty", "no_tty"):
            args.tty = attr == "tty"
        else:
            setattr(args, attr, True)
        return
    if value is None:
        # as argparse: a following argument that looks like an option is not a value
        if not rest or (is_option(rest[0]) and " " not in rest[0]):
            raise UsageError(f"argument {shown}: expected one argument")
        value = rest.pop(0)
    if attr in ("env", "exclude"):
        getattr(args, attr).append(value)
    elif attr in ("fanout", "retry"):
        try:
            setattr(args, attr, int(value))
        except ValueError:
            raise UsageError(f"argument {shown}: invalid int value: {value!r}") from None
    elif attr in ("timeout", "connect_timeout", "retry_delay"):
        try:
            setattr(args, attr, float(value))
        except ValueError:
            raise UsageError(f"argument {shown}: invalid float value: {value!r}") from None
    elif attr == "max_output":
        size = parse_size(value)
        if size is None:
            raise UsageError(f"argument {shown}: invalid size: {value!r} (bytes, or 64K, 8M, 1G)")
        args.max_output = size
    elif attr == "suite":
        if value not in _SUITES:
            choices = ", ".join(repr(s) for s in _SUITES)
            raise UsageError(f"argument {shown}: invalid choice: {value!r} (choose from {choices})")
        args.suite = value
    else:
        setattr(args, attr, value)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int | None:
    """`1000`, `64K`, `8M`, `1G` (binary units; `KiB`/`kb` too) as bytes; None when not one."""
    number = text.strip().upper().removesuffix("B")
    if number[-2:] in ("KI", "MI", "GI"):
        number = number[:-1]
    unit = number[-1:] if number[-1:] in ("K", "M", "G") else ""
    digits = number[: len(number) - len(unit)]
    if not digits.isdigit() or not digits.isascii():
        return None
    return int(digits) * _SIZE_UNITS[unit]


def _short_options(
    args: RunArgs,
    arg: str,
    rest: list[str],
    options: Sequence[Option] = _RUN_OPTIONS,
    flags: frozenset[str] = _RUN_FLAGS,
) -> None:
    """`-n`, `-C DIR`, `-CDIR`, `-C=DIR`, and clusters such as `-nC DIR`."""
    by_short = {opt[1]: opt for opt in options if opt[1]}
    head, eq, value = arg.partition("=")
    if eq and head in by_short:
        _set_option(args, by_short[head], value, rest, flags)
        return
    pos = 1
    while pos < len(arg):
        opt = by_short.get("-" + arg[pos])
        if opt is None:
            if pos == 1:
                raise UsageError(f"unrecognized arguments: {arg}")
            prev = by_short["-" + arg[pos - 1]]
            raise UsageError(
                f"argument {prev[1]}/{prev[0]}: ignored explicit argument {arg[pos:]!r}"
            )
        pos += 1
        if opt[2] in flags:
            _set_option(args, opt, None, rest, flags)
            if args.help:
                return
        else:  # an option taking a value takes the rest of the cluster, if any
            _set_option(args, opt, arg[pos:] or None, rest, flags)
            return


def run_options(*attrs: str) -> tuple[Option, ...]:
    """The entries of `rexec run`'s option table for these attributes, in that order: other
    front ends (`rexec cp`) take the shared options from here, with their help and checks."""
    by_attr = {opt[2]: opt for opt in _RUN_OPTIONS}
    return tuple(by_attr[attr] for attr in attrs)


def parse_option(
    args: RunArgs,
    arg: str,
    rest: list[str],
    options: Sequence[Option] = _RUN_OPTIONS,
    flags: frozenset[str] = _RUN_FLAGS,
) -> None:
    """Apply the option argument `arg` (long, short or a cluster) from the table `options`
    (`flags` take no value); a value it needs comes from rest. Raises UsageError."""
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        _set_option(args, _long_option(arg, name, options), value if eq else None, rest, flags)
    else:
        _short_options(args, arg, rest, options, flags)


def parse_run_args(argv: Sequence[str]) -> RunArgs:
    """Parse `rexec run [options] TARGET [options] CMD...`; raises UsageError.

    Options may come before and after TARGET; the first argument after TARGET that is not an
    option starts CMD (the rest is CMD, options or not), and `--` ends the options.
    After an error it reads on, and raises the first error once done: the error's `parsed`
    then says whether `--json` wants the error as a JSON object too.
    """
    args = RunArgs()
    rest = list(argv)
    first: UsageError | None = None
    while rest:
        arg = rest.pop(0)
        if arg == "--" or not is_option(arg):
            positionals = rest if arg == "--" else [arg, *rest]
            if args.target is None and positionals and args.hosts_from is None:
                args.target = positionals.pop(0)
                if arg != "--":
                    rest = positionals
                    continue
            args.command = positionals
            break
        try:
            parse_option(args, arg, rest)
        except UsageError as exc:
            first = first or exc
        if args.help and first is None:
            return args
    if first is None and args.target is None and args.hosts_from is None:
        first = UsageError("the following arguments are required: target, command")
    if first is not None:
        first.parsed = args
        raise first
    return args


def check_args(args: RunArgs) -> None:
    """The values a parser cannot judge alone, for one host and for many; raises UsageError."""

    def usage(message: str) -> UsageError:
        return UsageError(message, parse=False, parsed=args)

    for name, value in (
        ("--timeout", args.timeout),
        ("--connect-timeout", args.connect_timeout),
        ("--retry-delay", args.retry_delay),
    ):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise usage(f"{name} must be a positive number of seconds, got {value:g}")
    if args.retry < 0:
        raise usage(f"--retry must be a whole number >= 0, got {args.retry}")
    if args.fanout is not None and args.fanout < 1:
        raise usage(f"--fanout must be at least 1, got {args.fanout}")
    if args.json and args.gather:
        raise usage("--json and -b/--gather do not go together")
    if args.tty and args.json:
        raise usage("--json and -t do not go together (a terminal has one output stream)")
    if args.tty and names_many_hosts(args):
        raise usage("-t takes one host: a terminal's keys cannot go to many")
    try:
        parse_env(args.env)
    except ValueError as exc:
        raise usage(str(exc)) from None
    if args.junit is not None:
        try:
            check_junit_path(args.junit)
        except UsageError as exc:
            exc.parsed = args
            raise


def names_many_hosts(args: RunArgs) -> bool:
    """A host set (`a,b`, `lab[1-3]`, `@group`) or a fleet option: rexec.cli.fleet's job.
    `[v6addr]:port` names one host; so does `unix:/path` unless it holds `,` `!` `&` or `^`:
    those separate hosts after a unix path too (rexec.client.hosts)."""
    if args.hosts_from is not None or args.exclude or args.fanout is not None:
        return True
    if args.gather or args.outdir is not None or args.failed_to is not None:
        return True
    target = args.target or ""
    if target.startswith("unix:"):  # a path's brackets are no ranges (hosts.py keeps it whole)
        return any(op in target for op in ",!&^")
    if target.startswith("@") or any(op in target for op in ",!&^"):  # a list, or set algebra
        return True
    return "[" in target and not (target.startswith("[") and ":" in target.partition("]")[0])


def cmd_run(argv: list[str], *, implicit: bool = False) -> int:
    """`rexec run ARGV`; `implicit`: typed as `rexec TARGET CMD...`, where TARGET may be a
    mistyped subcommand (`rexec rnu ...`) rather than a host."""
    open_std_fds()
    try:
        args = parse_run_args(argv)
    except UsageError as exc:
        return fail_early(exc.parsed, exc)
    if args.help or (args.target is None and args.hosts_from is None):  # only with --help
        sys.stdout.write(RUN_HELP)
        return 0
    try:
        check_args(args)
        unknown = unknown_command(args.target) if implicit and args.target else None
        if unknown is not None:
            raise UsageError(unknown, parse=False)
    except UsageError as exc:
        return fail_early(args, exc)
    if names_many_hosts(args):  # many hosts: asyncio, in rexec.cli.fleet (never for one)
        from rexec.cli.fleet import cmd_fleet

        code = cmd_fleet(args)
        if code is not None:
            return code  # else the set was one plain host (lab[7]): args.target names it
    if not args.command:
        error = "no command given (use `rexec shell TARGET` for an interactive shell)"
        return fail_early(args, UsageError(error, parse=False))
    return run_one(args)


def open_client(args: RunArgs, target: str) -> Client:
    """The sync Client for a command line's connection options (run and cp share them)."""
    from rexec import Client, Suite
    from rexec.client.connecting import DEFAULT_RETRY_DELAY

    def notice(exc: RexecError, n: int, wait: float) -> None:
        err(retry_notice(exc, n, args.retry, wait))

    return Client(
        target,
        token_file=args.token_file,
        connect_timeout=args.connect_timeout,
        suite=Suite.AESGCM if args.suite == "aesgcm" else Suite.CHACHAPOLY,
        trace=trace_fn() if args.trace else None,
        retry=args.retry,
        retry_delay=args.retry_delay or DEFAULT_RETRY_DELAY,
        on_retry=notice,
    )


def run_one(args: RunArgs) -> int:
    """One command on one host; its Outcome decides the exit status, --json and --junit."""
    assert args.target is not None  # --hosts-from always went to the fleet
    target, command = args.target, args.command
    from rexec.errors import RexecError

    env = parse_env(args.env)  # checked by check_args
    interrupts: Interrupts | None = None
    client = None
    started = False
    began, wall = time.monotonic(), time.time()
    tails = (Tail(), Tail()) if args.junit is not None and not args.json else None
    # --json: the output (its first --max-output bytes), even of a command cut short
    kept = (Head(args.max_output or None), Head(args.max_output or None))
    restore = unwind_on_termination()
    try:
        client = open_client(args, target)
        if args.tty:  # on a pseudo-terminal: rexec.cli.ptyshell (a terminal's keys, escapes)
            from rexec.cli.ptyshell import run_on_pty

            started = True
            result = run_on_pty(
                client,
                command[0] if len(command) == 1 else command,
                env=env or None,
                cwd=args.cwd,
                timeout=args.timeout,
                stdin=not args.no_stdin,
            )
        else:
            stdin: int | None = None
            if not args.no_stdin and not os.isatty(0):
                try:
                    os.fstat(0)
                    stdin = 0
                except OSError:
                    stdin = None
            interrupts = Interrupts()
            started = True  # from here on, the command may run: a broken connection truncates it
            proc = client.start(
                command[0] if len(command) == 1 else command,
                env=env or None,
                cwd=args.cwd,
                timeout=args.timeout,
                stdin=stdin is not None,
            )
            if stdin is not None:
                proc.feed(stdin)
            client.watch(interrupts.read_fd, interrupts.forwarder(proc.signal))
            out: Sink
            err_out: Sink
            if args.json:
                out, err_out = kept[0].add, kept[1].add
            else:
                out, err_out = writer(1), writer(2)
                if tails is not None:
                    out, err_out = tails[0].tee(out), tails[1].tee(err_out)
            result = proc.wait(stdout=out, stderr=err_out)
            if args.json:
                result = result.with_output(bytes(kept[0].data), bytes(kept[1].data))
        client.close()
        outcome = of_result(result)
    except (RexecError, KeyboardInterrupt, BrokenPipeError) as exc:
        # BrokenPipeError: our reader went away; end quietly, as a SIGPIPE death would
        # (closing the connection makes the server kill the command)
        outcome = of_error(exc, started=started)
    except TerminalSignal as exc:  # SIGTERM/SIGHUP (-t: SIGQUIT too; the terminal restored)
        outcome = Outcome(128 + exc.signum, "interrupted", f"ended by signal {exc.signum}")
    finally:
        restore()
        if interrupts is not None:
            interrupts.close()
        if client is not None:
            client.abort()
    duration = time.monotonic() - began
    if outcome.exit_status == EXIT_SIGPIPE and outcome.kind == "interrupted":
        pass  # nobody reads stdout any more, and stderr says nothing on a SIGPIPE death
    elif outcome.kind is not None and (outcome.result is None or not args.json):
        err(outcome.message or outcome.kind)  # (--json tells of a command's timeout itself)
    if args.junit is not None:
        write_junit(args.junit, command, [_case(target, outcome, duration, tails)], wall)
    if args.json and outcome.exit_status != EXIT_SIGPIPE:
        output = (bytes(kept[0].data), bytes(kept[1].data))
        obj = json_object(target, command, outcome, duration, output)
        obj.update(dropped_fields(kept[0].dropped, kept[1].dropped))
        line = json_line(obj)
        if not write_stdout(line):
            return EXIT_SIGPIPE  # the reader left: as SIGPIPE would end a local writer
    return outcome.exit_status


def _case(
    target: str, outcome: Outcome, duration: float, tails: tuple[Tail, Tail] | None
) -> JUnitCase:
    """The JUnit testcase of one host: output from the Result, else the tails of what was
    streamed (in the Result too, so that a failure quotes the end of stderr)."""
    result = outcome.result
    if tails is None:
        out, errout = (result.stdout, result.stderr) if result is not None else (b"", b"")
        return JUnitCase(target, outcome, duration, out, errout)
    out, errout = bytes(tails[0].data), bytes(tails[1].data)
    if result is not None:
        outcome = of_result(result.with_output(out, errout))
    return JUnitCase(target, outcome, duration, out, errout, (tails[0].dropped, tails[1].dropped))


# ---- shell -------------------------------------------------------------------------
