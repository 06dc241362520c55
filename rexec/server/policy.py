"""Per-token policy: what one token may run, from where, as whom (pure evaluation, no I/O).

A policy lives in the token store entry (`"policy": {...}`) and is evaluated for every EXEC
before anything starts. `evaluate()` takes the request, the peer and the ExecSpec the server
would use without a policy, and returns a Decision: refused (with the rule and a one-line
reason the client sees, ERROR POLICY) or allowed (with the ExecSpec to run: timeout clamped,
cwd resolved, identity switched for run-as). The only outside reads are the passwd and group
databases for run-as.

Argv patterns (`--allow`): split like a shell (shlex); each word is an fnmatch glob for one
argv element (case-sensitive, `*` matches `/` too); a final `...` allows any further
arguments. A shell command line cannot be checked word by word (`ls; touch x`), so a token
with patterns refuses every `command` EXEC unless `allow_shell` is set; but a plain line,
words of characters no shell treats specially (`uptime`, `ls -d /tmp`: what `rexec run HOST
uptime` sends), means its words to any shell, so it is checked as that argv and run as it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import math
import os
import pwd
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from rexec.errors import ConfigError
from rexec.protocol.models import ExecRequest
from rexec.server.spawn import ExecSpec

__all__ = [
    "UNIX_PEER",
    "Decision",
    "Identity",
    "Policy",
    "argv_matches",
    "check_allow_env",
    "evaluate",
    "evaluate_transfer",
    "pattern_for_argv",
    "plain_argv",
    "resolve_cwd",
    "resolve_identity",
]

UNIX_PEER = "unix"  # the `--from` word that admits unix-socket peers (they have no address)
ANY_MORE = "..."  # a pattern's final word: any further arguments
# Characters no POSIX shell gives a meaning to (shlex.quote's safe set, without `=`: a first
# word with one is an assignment); a line of only these and spaces is its words' argv.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+,./:- ")
# Variables that change what an allowed argv runs: a token with --allow may not set them.
_LOADER_VARS = ("PATH", "LD_*", "BASH_ENV", "ENV", "IFS")
_KEYS = (
    "allow",
    "allow_shell",
    "from",
    "max_timeout",
    "no_pty",
    "env",
    "cwd_under",
    "run_as",
    "learn",
    "transfer_only",
    "read_only",
    "transfer_under",
)


@dataclass(frozen=True)
class Policy:
    """One token's rules; the default (every field empty) allows what the server allows."""

    allow: tuple[str, ...] = ()  # argv patterns, as typed (shell words)
    allow_shell: bool = False
    from_: tuple[str, ...] = ()  # CIDRs (normalised) and/or "unix"
    max_timeout: float | None = None
    no_pty: bool = False
    env: tuple[str, ...] = ()  # extra env names (fnmatch, as the server's env_allowlist)
    cwd_under: str | None = None  # absolute, normalised
    run_as: str | None = None  # a user name from passwd
    learn: bool = False
    transfer_only: bool = False  # file transfers only: every EXEC is refused
    read_only: bool = False  # transfers may only download (get); put is refused
    transfer_under: str | None = None  # transfers confined below this directory (absolute)

    @property
    def empty(self) -> bool:
        return self == Policy()

    @cached_property
    def patterns(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(shlex.split(p)) for p in self.allow)

    @cached_property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.from_ if n != UNIX_PEER)

    def to_json(self) -> dict[str, Any]:
        """The store's form: only the fields that are set."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name.rstrip("_")] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, label: str, raw: object) -> Policy:
        """Validate a store entry's `policy` object; errors name the entry and the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: policy: must be an object")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{label}: policy: unknown keys {unknown}")
        try:
            return cls.build(
                allow=_strings(raw, "allow"),
                allow_shell=_bool(raw, "allow_shell"),
                from_=_strings(raw, "from"),
                max_timeout=raw.get("max_timeout"),
                no_pty=_bool(raw, "no_pty"),
                env=_strings(raw, "env"),
                cwd_under=raw.get("cwd_under"),
                run_as=raw.get("run_as"),
                learn=_bool(raw, "learn"),
                transfer_only=_bool(raw, "transfer_only"),
                read_only=_bool(raw, "read_only"),
                transfer_under=raw.get("transfer_under"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{label}: policy: {exc}") from None

    @classmethod
    def build(
        cls,
        *,
        allow: Iterable[str] = (),
        allow_shell: bool = False,
        from_: Iterable[str] = (),
        max_timeout: object = None,
        no_pty: bool = False,
        env: Iterable[str] = (),
        cwd_under: object = None,
        run_as: object = None,
        learn: bool = False,
        transfer_only: bool = False,
        read_only: bool = False,
        transfer_under: object = None,
    ) -> Policy:
        """A validated Policy (the CLI and the store both come through here)."""
        return cls(
            allow=tuple(_check_pattern(p) for p in allow),
            allow_shell=allow_shell,
            from_=tuple(dict.fromkeys(_check_from(f) for f in from_)),
            max_timeout=_check_timeout(max_timeout),
            no_pty=no_pty,
            env=tuple(_check_env(e) for e in env),
            cwd_under=_check_dir(cwd_under, "cwd_under"),
            run_as=_check_user(run_as),
            learn=learn,
            transfer_only=transfer_only,
            read_only=read_only,
            transfer_under=_check_dir(transfer_under, "transfer_under"),
        )

    def replace(self, **changes: Any) -> Policy:
        """A copy with some fields changed, validated like build()."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(changes)
        return Policy.build(**fields)

    def summary(self) -> str:
        """One line for `rexec token list`: the rules, shell-quoted; '-' for none."""
        parts: list[str] = [f"allow={shlex.quote(p)}" for p in self.allow]
        if self.allow_shell:
            parts.append("allow-shell")
        parts += [f"from={f}" for f in self.from_]
        if self.max_timeout is not None:
            parts.append(f"max-timeout={self.max_timeout:g}")
        if self.no_pty:
            parts.append("no-pty")
        parts += [f"env={e}" for e in self.env]
        if self.cwd_under is not None:
            parts.append(f"cwd-under={shlex.quote(self.cwd_under)}")
        if self.run_as is not None:
            parts.append(f"run-as={self.run_as}")
        if self.learn:
            parts.append("learn")
        if self.transfer_only:
            parts.append("transfer-only")
        if self.read_only:
            parts.append("read-only")
        if self.transfer_under is not None:
            parts.append(f"transfer-under={shlex.quote(self.transfer_under)}")
        return " ".join(parts) or "-"


def _strings(raw: Mapping[str, object], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings")
    return list(value)


def _bool(raw: Mapping[str, object], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false")
    return value


def _check_pattern(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"allow {text!r}: {exc}") from None
    if not words or words == [ANY_MORE]:
        raise ConfigError(f"allow {text!r}: a pattern needs at least the program")
    if ANY_MORE in words[:-1]:
        raise ConfigError(f"allow {text!r}: '...' may only be the last word")
    return text


def _check_from(text: str) -> str:
    if text == UNIX_PEER:
        return text
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ConfigError(f"from {text!r}: expected an address, a CIDR or 'unix'") from None


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise ConfigError(f"max_timeout: must be a positive number of seconds, got {value!r}")


def _check_env(name: str) -> str:
    if not name or "=" in name or "\0" in name:
        raise ConfigError(f"env {name!r}: not a variable name")
    return name


def _check_dir(value: object, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _check_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or any(c in value for c in ":/\0\n"):
        raise ConfigError(f"run_as: must be a user name, got {value!r}")
    return value


# ---- run-as --------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a run-as token's commands run as, from passwd and the group database."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "SHELL": self.shell}


def resolve_identity(user: str) -> Identity:
    """Look `user` up now (passwd may change while the server runs); ConfigError if unknown."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"run-as: no such user {user!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell or "/bin/sh")


def check_run_as(policy: Policy, euid: int) -> None:
    """Load-time rule: run-as needs a root server and a user that exists."""
    if policy.run_as is None:
        return
    if euid != 0:
        raise ConfigError(
            f"run_as {policy.run_as!r} needs a server running as root (this one runs as uid {euid})"
        )
    resolve_identity(policy.run_as)


def loader_vars(names: Iterable[str]) -> list[str]:
    """The names among these that change what an allowed argv runs (PATH, LD_*, ...)."""
    return sorted(k for k in names if any(fnmatch.fnmatchcase(k, v) for v in _LOADER_VARS))


def check_allow_env(policy: Policy) -> None:
    """Edit-time rule (`rexec token new/edit`): --env naming a variable that evaluate()
    refuses to a token with --allow makes a token that fails every command setting it.
    Not a load-time rule: a store that has such a token still loads."""
    blocked = loader_vars(policy.env) if policy.allow else []
    if blocked:
        names = ", ".join(blocked)
        raise ConfigError(
            f"--env {names} with --allow: a token with --allow patterns may not set {names} "
            "(the server refuses it: it changes what an allowed argv runs)"
        )


# ---- evaluation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the policy said about one EXEC; `rule` names the rule that decided."""

    allowed: bool
    rule: str
    reason: str = ""  # one line, for the client (refusals) and the log
    spec: ExecSpec | None = None  # what to run, when allowed
    learn: bool = False  # record this request (the token is in learn mode)
    extra_env: tuple[str, ...] = ()  # env names this token may set beyond the server's list
    root: str | None = None  # transfers: the directory they are confined to
    plain: tuple[str, ...] | None = None  # the argv a plain shell line was checked and run as

    def audit(self) -> dict[str, str]:
        """The audit record's `policy` field."""
        out = {"decision": "allowed" if self.allowed else "refused", "rule": self.rule}
        if self.reason:
            out["reason"] = self.reason
        return out


def argv_matches(words: Sequence[str], argv: Sequence[str]) -> bool:
    """Does argv match one pattern (its shell words)? See the module docstring."""
    if words and words[-1] == ANY_MORE:
        fixed = words[:-1]
        if len(argv) < len(fixed):
            return False
    else:
        fixed = words
        if len(argv) != len(fixed):
            return False
    return all(fnmatch.fnmatchcase(arg, pat) for arg, pat in zip(argv, fixed, strict=False))


def pattern_for_argv(argv: Sequence[str]) -> str:
    """The --allow pattern that matches exactly this argv (for `rexec token learned`)."""
    words = ["".join(f"[{c}]" if c in "*?[" else c for c in arg) for arg in argv]
    return shlex.join("[.].." if w == ANY_MORE else w for w in words)


def plain_argv(line: str) -> tuple[str, ...] | None:
    """The argv a shell line means when it is only plain words (`ls -d /tmp`), else None."""
    words = tuple(line.split())
    return words if words and _PLAIN.issuperset(line) else None


def resolve_cwd(cwd: str | None, home: str | None) -> str | None:
    """The directory a command starts in: `cwd` (relative to home, as with ssh), else home."""
    if cwd is None:
        return home
    if home and not os.path.isabs(cwd):
        return os.path.join(home, cwd)  # never relative to the server's own cwd
    return cwd


def _under(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip("/") + "/")


def _peer_allowed(policy: Policy, peer: str, peer_host: str) -> bool:
    if peer == UNIX_PEER:
        return UNIX_PEER in policy.from_
    try:
        addr = ipaddress.ip_address(peer_host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in policy.networks)


def _refuse(rule: str, reason: str) -> Decision:
    return Decision(False, rule, f"{rule}: {reason}")


def evaluate(
    policy: Policy, req: ExecRequest, peer: str, peer_host: str, spec: ExecSpec
) -> Decision:
    """Check `req` against `policy`; `spec` is what the server would run without one.

    The order is fixed: from, transfer-only, no-pty, allow (argv or shell line, then the
    variables an allowed argv must not be given), run-as, cwd-under; max-timeout clamps and
    never refuses. In learn mode the allow rule records instead of refusing; every other rule
    still applies.
    """
    if policy.empty:
        return Decision(True, "none", spec=spec)
    applied: list[str] = []  # the rules that let this request through, for the audit
    if policy.from_:
        if not _peer_allowed(policy, peer, peer_host):
            return _refuse("from", f"{peer_host} is not in this token's --from list")
        applied.append("from")
    if policy.transfer_only:
        return _refuse("transfer-only", "this token may only transfer files")
    if policy.no_pty and getattr(req, "pty", False):
        return _refuse("no-pty", "this token may not request a pty")
    learn = policy.learn
    plain = None
    if (policy.allow or learn) and not policy.allow_shell and req.command is not None:
        plain = plain_argv(req.command)
        if plain is not None:  # checked, recorded and run as the argv it means
            req = req.model_copy(update={"argv": plain, "command": None})
            spec = dataclasses.replace(spec, argv=plain)
    if policy.allow:
        verdict = _check_allow(policy, req)
        if verdict.allowed:
            applied.append(verdict.rule)
        elif learn:
            applied.append(f"learn (would refuse: {verdict.reason})")
        else:
            return verdict
    elif learn:
        applied.append("learn")
    env = dict(spec.env)
    cwd = spec.cwd
    uid = gid = None
    groups: tuple[int, ...] | None = None
    if policy.run_as is not None:
        try:
            who = resolve_identity(policy.run_as)
        except ConfigError:
            return _refuse("run-as", f"no such user {policy.run_as!r}")
        for name, value in who.env().items():
            if name not in req.env:
                env[name] = value
        home = env["HOME"]
        cwd = resolve_cwd(req.cwd or None, home)
        if not req.cwd and not os.path.isdir(home):
            cwd = "/"  # as sshd does for a user whose home does not exist (nobody)
        uid, gid, groups = who.uid, who.gid, who.groups
        applied.append(f"run-as {who.user}")
    if policy.cwd_under is not None:
        if not req.cwd:
            cwd = policy.cwd_under
        elif cwd is None or not _under(cwd, policy.cwd_under):
            return _refuse("cwd-under", f"{cwd} is not under {policy.cwd_under}")
        applied.append("cwd-under")
    timeout = spec.timeout
    if policy.max_timeout is not None:
        timeout = min(timeout or policy.max_timeout, policy.max_timeout)
        applied.append("max-timeout")
    final = dataclasses.replace(
        spec, env=env, cwd=cwd, timeout=timeout, uid=uid, gid=gid, groups=groups
    )
    rule = "; ".join(applied) or "policy"
    return Decision(True, rule, spec=final, learn=learn, extra_env=policy.env, plain=plain)


def _check_allow(policy: Policy, req: ExecRequest) -> Decision:
    if req.argv is None:
        if policy.allow_shell:
            return Decision(True, "allow-shell")
        return _refuse(
            "allow",
            "shell command lines are refused for this token (it has --allow patterns and no "
            "--allow-shell); send an argv",
        )
    matched = next(
        (
            text
            for text, words in zip(policy.allow, policy.patterns, strict=True)
            if argv_matches(words, req.argv)
        ),
        None,
    )
    if matched is None:
        shown = shlex.join(req.argv)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        return _refuse("allow", f"argv {shown} matches no --allow pattern of this token")
    blocked = loader_vars(req.env)
    if blocked:
        return _refuse("allow", f"a token with --allow patterns may not set {', '.join(blocked)}")
    return Decision(True, f"allow {matched}")


def evaluate_transfer(
    policy: Policy, op: str, paths: Sequence[str], peer: str, peer_host: str
) -> Decision:
    """Check one XFER against `policy` (docs/PROTOCOL.md 3.3). The order is fixed: from,
    read-only (put), run-as and allow (a transfer would escape both: refused, for allow
    unless transfer-under confines it), transfer-under (every path lexically inside the
    directory, no `..`). An allowed Decision's `root` is the confining directory, if any:
    the server walks every path below it without following symlinks."""
    if policy.empty:
        return Decision(True, "none")
    applied: list[str] = []
    if policy.from_:
        if not _peer_allowed(policy, peer, peer_host):
            return _refuse("from", f"{peer_host} is not in this token's --from list")
        applied.append("from")
    if policy.read_only and op == "put":
        return _refuse("read-only", "this token may only download files (get)")
    if policy.run_as is not None:
        return _refuse("run-as", "file transfers cannot run as another user")
    if policy.allow and not policy.learn and policy.transfer_under is None:
        return _refuse(
            "allow", "a token limited to --allow patterns may transfer only with --transfer-under"
        )
    root = policy.transfer_under
    if root is not None:
        for path in paths:
            if ".." in path.split("/"):
                return _refuse("transfer-under", f"{path}: '..' is not allowed")
            if os.path.isabs(path) and not (
                os.path.normpath(path) == root or os.path.normpath(path).startswith(root + "/")
            ):
                return _refuse("transfer-under", f"{path} is not under {root}")
        applied.append("transfer-under")
    if policy.read_only:
        applied.append("read-only")
    return Decision(True, "; ".join(applied) or "policy", root=root)
