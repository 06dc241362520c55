"""`rexec serve` and `rexec token`: the server-side subcommands.

Kept apart from rexec/cli/main.py, whose `run` path is latency-critical: these may use argparse
and import the server stack freely.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rexec.cli.common import err

# ---- serve -------------------------------------------------------------------------


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rexec serve", description="Run the rexec server.")
    p.add_argument("--config", help="server config file (TOML); see configs/")
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="TCP address to listen on (repeatable; port 0 picks a free port)",
    )
    p.add_argument("--unix", action="append", metavar="PATH", help="unix socket to listen on")
    p.add_argument("--tokens", metavar="PATH", help="token store file")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (tokens, audit log)")
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write the bound addresses here once the server accepts",
    )
    p.add_argument("--log-format", choices=("auto", "console", "json"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return p


def cmd_serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    from pathlib import Path

    from rexec.errors import ConfigError

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen
        overrides.setdefault("unix", args.unix or [])
    if args.unix:
        overrides["unix"] = args.unix
        overrides.setdefault("listen", args.listen or [])
    if args.tokens:
        overrides["tokens"] = args.tokens
    if args.state_dir:
        overrides["state_dir"] = args.state_dir
    if args.log_format:
        overrides["log_format"] = args.log_format
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        import asyncio

        from rexec.log import configure_logging, get_logger
        from rexec.server.auth import TokenStore
        from rexec.server.config import load_server_config
        from rexec.server.service import serve
        from rexec.statefile import make_state_dir

        config = load_server_config(args.config, overrides or None)
        configure_logging(config.server.log_level, config.server.log_format)
        state = make_state_dir(config.server.state_dir)
        store = TokenStore.load(config.server.tokens)
        first = None
        if not len(store):
            if args.config is None:
                first = _first_token(store, state)
            else:  # a configured server nobody can log in to: say so, and how to fix it
                import pwd

                user = pwd.getpwuid(os.geteuid()).pw_name
                get_logger().warning(
                    f"the token store {store.path} is empty: nobody can log in. Add a token "
                    f"(no restart needed), as user {user}: "
                    f"rexec token new --id NAME --store {store.path}",
                    token_count=0,
                )

        again = first is None and args.config is None and _client_copy_valid(store, state)

        def on_ready(addresses: list[str]) -> None:
            if first is not None:
                _print_first_token(first, state, config.server.tokens, addresses[0])
            elif again:
                _print_paste_line(state, addresses[0])

        return asyncio.run(
            serve(
                config,
                ready_file=Path(args.ready_file) if args.ready_file else None,
                on_ready=on_ready,
            )
        )
    except ConfigError as exc:
        err(str(exc))
        return 2
    except OSError as exc:
        err(f"cannot start the server: {exc}")
        return 1


def _first_token(store: Any, state: Any) -> Any:
    """A fresh machine: make a token and save the client's copy (a new 0600 file, replacing
    whatever was at that path rather than writing through it)."""
    from rexec.statefile import write_secret

    token = store.add("default")
    write_secret(state / "client.token", (token.format() + "\n").encode(), "client token file")
    return token


def _self_command() -> str:
    """How to invoke this rexec from a shell: `rexec` if that is on PATH, else its path."""
    import shutil

    here = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(here) != "rexec" or not os.access(here, os.X_OK):
        return f"{sys.executable} -m rexec"
    found = shutil.which("rexec")
    return "rexec" if found and os.path.samefile(found, here) else here


def _paste(client_file: Any, address: str) -> str:
    return f"    REXEC_TOKEN_FILE={client_file} {_self_command()} run {address} uname -a\n\n"


def _client_copy_valid(store: Any, state: Any) -> bool:
    """A restart (`make serve` again): is the first start's client copy still a token of
    this store (not revoked nor rotated away)? Then what to paste is worth printing again."""
    from rexec.client.target import read_token_file
    from rexec.errors import RexecError

    try:
        return store.lookup(read_token_file(state / "client.token").key_id) is not None
    except (OSError, RexecError, ValueError):
        return False


def _print_paste_line(state: Any, address: str) -> None:
    paste = _paste(state / "client.token", address)
    sys.stdout.write(f"rexec: run commands with the client's copy of token 'default':\n\n{paste}")
    sys.stdout.flush()


def _print_first_token(token: Any, state: Any, store_path: Any, address: str) -> None:
    """Print what to paste, with the address actually bound (port 0 resolved).

    The secret itself goes to a terminal only: captured output (a log file, the journal, CI)
    gets the path of the 0600 file instead.
    """
    client_file = state / "client.token"
    text = (
        f"rexec: created the first token 'default' in {store_path}\n"
        f"rexec: the client's copy is in {client_file} (mode 0600); run commands with:\n\n"
        f"{_paste(client_file, address)}"
    )
    if sys.stdout.isatty():
        text += (
            f"rexec: on another machine, put this token line in a file of mode 0600 and point\n"
            f"rexec: REXEC_TOKEN_FILE (or --token-file) at it:\n\n    {token.format()}\n\n"
        )
    else:
        text += (
            f"rexec: on another machine, use a copy of {client_file} (keep it mode 0600) as\n"
            f"rexec: REXEC_TOKEN_FILE (or --token-file); the token is not printed here because\n"
            f"rexec: this output is not a terminal\n\n"
        )
    sys.stdout.write(text)
    sys.stdout.flush()


# ---- token -------------------------------------------------------------------------


def cmd_token(argv: list[str]) -> int:
    """`rexec token ...`: see rexec/cli/tokens.py."""
    from rexec.cli.tokens import cmd_token as run

    return run(argv)
