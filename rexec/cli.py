"""The `rexec` command: a thin dispatcher over the public client API.

Start-up is latency for `rexec run` (a process per command), so this module imports only
argparse-free essentials at the top and each subcommand imports what it needs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: rexec run TARGET [options] CMD...    run one command (exit code = remote exit code)
       rexec shell TARGET                   interactive shell on TARGET
       rexec TARGET [CMD...]                as `shell` without CMD, as `run` with it
       rexec serve [options]                run the server
       rexec token new|list [options]       manage the server's token store
       rexec demo [truncation|sticky|empty|all] [--show-frames]
                                            why framing matters, with real bytes
Run `rexec SUBCOMMAND --help` for the options of each.
"""

SUBCOMMANDS = ("run", "shell", "serve", "token", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "demo":
        from rexec.demo import main as demo_main

        return demo_main(rest)
    sys.stderr.write(f"rexec: unknown command {cmd!r}\n{USAGE}")
    return 2
