"""The `rexec` command: a thin dispatcher over the public client API.

Start-up is latency for `rexec run` (a process per command), so this module imports only
what each subcommand needs, inside that subcommand: `run` never loads asyncio or pydantic.
Exit codes for `run`: the remote code; 128+N when killed by signal N; 124 when the server's
deadline killed it; 255 for connection, auth, protocol, refusal or policy failures (as ssh
does); 2 for usage errors, and for `rexec WORD` when WORD is neither a subcommand, nor an
alias, nor a host that resolves (the table: rexec.cli.outcome.EXIT_STATUS_HELP).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rexec.cli.common import err

USAGE = """\
usage: rexec run TARGET [options] CMD...    run one command (exit code = remote exit code)
       rexec shell [--repl] TARGET          your shell on TARGET on a pty (--repl: line REPL)
       rexec TARGET [CMD...]                as `shell` without CMD, as `run` with it
       rexec cp [-r] [-p] [options] SRC... DST
                                            copy files to or from hosts, as scp (HOST:PATH)
       rexec serve [options]                run the server
       rexec token new|list|revoke|rotate|edit|derive|import|learned [options]
                                            manage tokens, their policy, fleet tokens
       rexec demo [truncation|sticky|empty|all] [--show-frames]
                                            why framing matters, with real bytes
TARGET is host[:port], [v6addr]:port, unix:/path, or an alias from the client config;
for run and cp, also a host set: lab[01-40], a,b, @group (see `rexec run --help`).
Run `rexec SUBCOMMAND --help` for the options of each.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "--version":
        from rexec import __version__

        print(f"rexec {__version__}")
        return 0
    if cmd == "run":
        from rexec.cli.run import cmd_run

        return _done(cmd_run(rest), argv)
    if cmd == "cp":
        from rexec.cli.cp import cmd_cp

        return cmd_cp(rest)
    if cmd == "shell":
        from rexec.cli.shell import main as cmd_shell

        return cmd_shell(rest)
    if cmd in ("serve", "token"):
        from rexec.cli import admin

        return admin.cmd_serve(rest) if cmd == "serve" else admin.cmd_token(rest)
    if cmd == "demo":
        from rexec.demo import main as demo_main

        return demo_main(rest)
    if cmd.startswith("-"):
        err(f"unknown option {cmd!r}")
        sys.stderr.write(USAGE)
        return 2
    # `rexec TARGET` (shell) and `rexec TARGET CMD...` (run), as with ssh
    if len(args) > 1:
        from rexec.cli.run import cmd_run

        # it checks TARGET once its options are read
        return _done(cmd_run(args, implicit=True), argv)
    from rexec.cli.common import unknown_command

    unknown = unknown_command(cmd)
    if unknown is not None:
        err(unknown)
        return 2
    from rexec.cli.shell import main as cmd_shell

    return cmd_shell(args)


def _done(code: int, argv: Sequence[str] | None) -> int:
    """`rexec run` as a process (argv None: the console script) ends here, without the
    interpreter's teardown: freeing every module and object costs ~5 ms of a ~50 ms run and
    does nothing the kernel does not do at exit. stdout and stderr are flushed first; if
    that fails, the normal way out reports it. In-process callers get the code back."""
    if argv is not None:
        return code
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:
        return code
    os._exit(code)
