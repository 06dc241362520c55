"""`rexec token`: the token store's lifecycle and per-token policy, and fleet tokens.

    new      add a token (with --fleet: make a fleet token for the client; no store is touched)
    list     name, key id, created, expires, last used, policy; never a secret
    revoke   remove a token; a running server ends its live connections within about 1 s
    rotate   a new secret; the old one keeps working for --overlap, then stops
    edit     change a token's policy or expiry
    derive   one server's token, from a fleet token file and the server's name
    import   add a token line (a fleet server's derived key) read from a file or stdin
    learned  --allow patterns built from what a --learn token ran

Every store change is one atomic replace of the file (rexec.statefile.write_secret), which
a running server picks up by itself (ServerContext.watch_tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rexec.cli.common import err

_MAX_TOKEN_INPUT = 4096


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", help="token store file")
    p.add_argument("--config", help="server config file naming the store")
    p.add_argument("--state-dir", metavar="DIR", help="state directory holding the store")


def _policy_options(p: argparse.ArgumentParser, *, edit: bool = False) -> None:
    g = p.add_argument_group("policy (stored with the token, enforced by the server)")
    g.add_argument(
        "--allow",
        action="append",
        metavar="PATTERN",
        help="argv pattern: shell words, each an fnmatch glob for one argument; a final ... "
        "allows any further arguments (repeatable). Shell command lines are then refused",
    )
    g.add_argument("--allow-shell", action="store_const", const=True, dest="allow_shell")
    g.add_argument(
        "--from",
        action="append",
        dest="from_",
        metavar="CIDR",
        help="source addresses allowed (repeatable); 'unix' admits unix-socket peers",
    )
    g.add_argument("--max-timeout", type=float, metavar="SECONDS", help="cap every deadline")
    g.add_argument(
        "--no-pty", action="store_const", const=True, dest="no_pty", help="refuse pty requests"
    )
    g.add_argument(
        "--env",
        action="append",
        metavar="NAME",
        help="an extra variable the client may set (repeatable)",
    )
    g.add_argument("--cwd-under", metavar="DIR", help="commands start under DIR (the default)")
    g.add_argument("--run-as", metavar="USER", help="run commands as USER (root servers only)")
    g.add_argument(
        "--learn",
        action="store_const",
        const=True,
        help="run commands as usual and record each distinct argv (see `rexec token learned`)",
    )
    g.add_argument(
        "--transfer-only",
        action="store_const",
        const=True,
        dest="transfer_only",
        help="file transfers only (rexec cp): every command is refused",
    )
    g.add_argument(
        "--read-only",
        action="store_const",
        const=True,
        dest="read_only",
        help="transfers may only download (get); uploads are refused",
    )
    g.add_argument(
        "--transfer-under",
        metavar="DIR",
        dest="transfer_under",
        help="confine file transfers to DIR (paths relative to it; no symlink is followed)",
    )
    g.add_argument(
        "--expires",
        metavar="DURATION|DATE",
        help="refused from then on: 30d, 12h, 90m, or an ISO date 2030-01-31[T12:00:00Z]",
    )
    if edit:
        g.add_argument("--no-allow-shell", action="store_const", const=False, dest="allow_shell")
        g.add_argument("--pty", action="store_const", const=False, dest="no_pty")
        g.add_argument("--no-learn", action="store_const", const=False, dest="learn")
        g.add_argument(
            "--no-transfer-only", action="store_const", const=False, dest="transfer_only"
        )
        g.add_argument("--no-read-only", action="store_const", const=False, dest="read_only")
        g.add_argument("--no-expires", action="store_true", help="never expires")
        g.add_argument(
            "--reset", action="store_true", help="start from an empty policy, then apply options"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rexec token", description="Manage the token store and fleet tokens."
    )
    sub = p.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="add a token and print the client's token line")
    who = new.add_mutually_exclusive_group(required=True)
    who.add_argument("--id", metavar="NAME", help="a name for the token")
    who.add_argument(
        "--fleet",
        metavar="NAME",
        help="print a new fleet token (for the client only) instead; see `token derive`",
    )
    _policy_options(new)
    lst = sub.add_parser("list", help="tokens, expiry, last use and policy (never secrets)")
    revoke = sub.add_parser("revoke", help="remove a token; live connections are closed")
    rotate = sub.add_parser("rotate", help="give a token a new secret; print its new line")
    rotate.add_argument(
        "--overlap",
        default="0",
        metavar="DURATION",
        help="how long the old secret keeps working (default 0: it stops now)",
    )
    edit = sub.add_parser("edit", help="change a token's policy or expiry")
    _policy_options(edit, edit=True)
    learned = sub.add_parser("learned", help="print --allow patterns from a --learn token's use")
    for sp in (revoke, rotate, edit, learned):
        sp.add_argument("ident", metavar="ID", help="the token's name or key id")
    derive = sub.add_parser("derive", help="print one server's token from a fleet token")
    derive.add_argument("fleet_file", metavar="FLEET-TOKEN-FILE")
    derive.add_argument(
        "--server", required=True, metavar="NAME", help="the name clients connect to"
    )
    imp = sub.add_parser("import", help="add a token line (from `token derive`) to the store")
    imp.add_argument("--id", required=True, metavar="NAME", help="a name for the token")
    imp.add_argument(
        "file", nargs="?", metavar="FILE", help="file holding the line (default: stdin)"
    )
    _policy_options(imp)
    for sp in (new, lst, revoke, rotate, edit, learned, imp):
        _store_options(sp)
    return p


def cmd_token(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from rexec.errors import ConfigError

    try:
        if args.action == "new" and args.fleet is not None:
            return _new_fleet(args)
        if args.action == "derive":
            return _derive(args)
        return _store_action(args)
    except ConfigError as exc:
        err(str(exc))
        return 2
    except OSError as exc:
        err(f"{exc.filename or 'token store'}: {exc.strerror or exc}")
        return 1


def _open_store(args: argparse.Namespace) -> Any:
    from rexec.server.auth import TokenStore
    from rexec.server.config import load_server_config

    path = args.store
    if path is None:
        overrides = {"state_dir": args.state_dir} if args.state_dir else None
        path = load_server_config(args.config, overrides).server.tokens
    return TokenStore.load(path)


def _store_action(args: argparse.Namespace) -> int:
    store = _open_store(args)
    action = args.action
    if action == "new":
        token = store.add(args.id, expires=_expires(args), policy=_policy(args, None))
        print(token.format())
        sys.stderr.write(f"rexec: added token {args.id!r} to {store.path}\n")
        if not (args.store or args.config or args.state_dir) and _make_serve_store():
            err(
                "`make serve` keeps its tokens in ./.state, and this one is not there: "
                f"rexec token new --id {args.id} --state-dir .state"
            )
    elif action == "import":
        token = _read_token_line(args.file)
        store.add(args.id, token, expires=_expires(args), policy=_policy(args, None))
        sys.stderr.write(
            f"rexec: added token {args.id!r} (key id {token.key_id_hex}) to {store.path}\n"
        )
    elif action == "list":
        _list(store)
        _say_which_store(store, explicit=bool(args.store or args.config or args.state_dir))
    elif action == "revoke":
        info = store.revoke(args.ident)
        sys.stderr.write(
            f"rexec: revoked token {info.name!r} (key id {info.key_id}); a running server "
            "closes its connections within about a second\n"
        )
    elif action == "rotate":
        from rexec.server.auth import parse_duration

        overlap = parse_duration(args.overlap)
        info = store.find(args.ident)
        token = store.rotate(args.ident, overlap)
        print(token.format())
        until = f"for {args.overlap}" if overlap > 0 else "no longer"
        sys.stderr.write(
            f"rexec: rotated token {info.name!r}: new key id {token.key_id_hex}; the old key "
            f"id {info.key_id} works {until}\n"
        )
    elif action == "edit":
        expires: Any = False  # unchanged
        if args.no_expires:
            expires = None
        elif args.expires is not None:
            expires = _expires(args)
        base = None if args.reset else store.policy(args.ident)
        info = store.update(args.ident, policy=_policy(args, base), expires=expires)
        sys.stderr.write(f"rexec: token {info.name!r}: policy {info.policy}\n")
    elif action == "learned":
        _learned(store, args.ident)
    return 0


def _expires(args: argparse.Namespace) -> float | None:
    if args.expires is None:
        return None
    from rexec.server.auth import iso_time, parse_expiry

    now = time.time()
    when = parse_expiry(args.expires, now)
    if when <= now:  # a mistyped year; or on purpose (edit: expire it now), so only a note
        name = getattr(args, "id", None) or args.ident
        err(f"note: token {name!r} expires {iso_time(when)}, already past: the server refuses it")
    return when


def _policy(args: argparse.Namespace, base: Any) -> Any:
    """The policy the options describe, on top of `base` (None: an empty policy)."""
    from rexec.server.policy import Policy, check_allow_env, resolve_identity

    changes: dict[str, Any] = {}
    for name in ("allow", "from_", "env"):
        if getattr(args, name) is not None:
            changes[name] = tuple(getattr(args, name))
    for name in (
        "allow_shell",
        "no_pty",
        "learn",
        "max_timeout",
        "cwd_under",
        "run_as",
        "transfer_only",
        "read_only",
        "transfer_under",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    policy = (base or Policy()).replace(**changes)
    check_allow_env(policy)
    if args.run_as is not None:
        resolve_identity(args.run_as)  # the user must exist here (where the server runs)
        if os.geteuid() != 0:
            err(
                "note: --run-as needs the server to run as root; a server that is not root "
                "refuses this token"
            )
    return policy


def _list(store: Any) -> None:
    from rexec.server.usage import read_last_used

    if not len(store):
        return  # nothing to list: _say_which_store says so on stderr
    used = read_last_used(store.used_path)
    rows = [("NAME", "KEY_ID", "CREATED", "EXPIRES", "LAST_USED", "POLICY")]
    for e in store.entries():
        policy = e.policy
        for key_id, until in e.previous:
            policy += f" (old key {key_id} until {until})"
        rows.append(
            (e.name, e.key_id, e.created, e.expires or "never", used.get(e.name, "never"), policy)
        )
    for row in rows:
        print("\t".join(row))


def _say_which_store(store: Any, *, explicit: bool) -> None:
    """On stderr: which store was read, so an empty listing is never a silent mystery."""
    count = len(store)
    if store.path.exists():
        err(f"{count} token{'s' if count != 1 else ''} in {store.path}")
    else:
        err(f"no token store at {store.path} (no tokens)")
    if explicit:
        return
    err("that is the default store; for another one pass --state-dir, --store or --config")
    if _make_serve_store():
        err("`make serve` keeps its tokens in ./.state: rexec token list --state-dir .state")


def _make_serve_store() -> bool:
    """Is this a checkout where `make serve` ran (its store is ./.state/tokens.json)?"""
    return os.path.isfile(os.path.join(".state", "tokens.json"))


def _learned(store: Any, ident: str) -> None:
    from rexec.server.policy import pattern_for_argv
    from rexec.server.usage import read_learned

    info = store.find(ident)
    seen = read_learned(store.learned_path, info.name)
    if not seen:
        err(f"nothing recorded for token {info.name!r} (is it in --learn mode, and used?)")
        return
    for item in seen:
        if isinstance(item, str):
            print(f"# shell command line (needs --allow-shell): {item}")
        else:
            print(pattern_for_argv(item))
    sys.stderr.write(
        f"rexec: each line is one --allow PATTERN; apply them with: rexec token edit "
        f"{info.name} --no-learn --allow 'LINE' ...\n"
    )


def _read_token_line(path: str | None) -> Any:
    from rexec.errors import ConfigError
    from rexec.protocol.token import parse_token
    from rexec.secretfile import read_secret_file

    if path is None or path == "-":
        text = sys.stdin.read(_MAX_TOKEN_INPUT + 1)
        where = "stdin"
    else:
        found = read_secret_file(path, "token file", _MAX_TOKEN_INPUT)
        if found is None:
            raise ConfigError(f"token file not found: {path}")
        text, where = found[0].decode("ascii", "replace"), path
    if len(text) > _MAX_TOKEN_INPUT:
        raise ConfigError(f"{where}: too large to be a token line")
    try:
        return parse_token(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ---- fleet tokens ------------------------------------------------------------------


def _new_fleet(args: argparse.Namespace) -> int:
    from rexec.errors import ConfigError
    from rexec.protocol.fleetkey import generate_fleet_token

    options: tuple[str, ...] = ("allow", "allow_shell", "from_", "max_timeout", "no_pty", "env")
    options += ("cwd_under", "transfer_only", "read_only", "transfer_under")
    given = [o for o in (*options, "run_as", "learn", "expires") if getattr(args, o) is not None]
    if given or args.store or args.config or args.state_dir:
        raise ConfigError(
            "--fleet takes no store or policy options: give them to `rexec token import` on "
            "each server"
        )
    fleet = generate_fleet_token(args.fleet)
    print(fleet.format())
    sys.stderr.write(
        f"rexec: fleet token {args.fleet!r}: keep it on the client only (a file of mode 0600, "
        "used like any token file). Give each server its own key with:\n"
        f"rexec:   rexec token derive FILE --server NAME | (on NAME) rexec token import "
        f"--id {args.fleet}\n"
    )
    return 0


def _derive(args: argparse.Namespace) -> int:
    from rexec.client.target import read_credential
    from rexec.errors import ConfigError
    from rexec.protocol.fleetkey import FleetToken, normalize_server_name

    fleet = read_credential(args.fleet_file)
    if not isinstance(fleet, FleetToken):
        raise ConfigError(f"{args.fleet_file}: not a fleet token (rexec1fleet:...)")
    name = normalize_server_name(args.server)
    print(fleet.derive(name).format())
    sys.stderr.write(
        f"rexec: the key of server {name!r} in fleet {fleet.name!r}; put it in that server's "
        f"store with `rexec token import --id {fleet.name}` (it works for that server only)\n"
    )
    return 0
