"""Per-token policy (rexec.server.policy): patterns, each rule, the store form, learn patterns."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shlex
from pathlib import Path

import pytest

from rexec.errors import ConfigError
from rexec.protocol.models import ExecRequest, parse_exec_request
from rexec.server.policy import (
    Decision,
    Policy,
    argv_matches,
    check_run_as,
    evaluate,
    evaluate_transfer,
    pattern_for_argv,
    resolve_cwd,
    resolve_identity,
)
from rexec.server.spawn import ExecSpec

BASE = ExecSpec(argv=("x",), env={"HOME": "/root", "USER": "root", "PATH": "/bin"}, cwd="/root")


def req(*argv: str, **kw: object) -> ExecRequest:
    """An EXEC as the server gets it: parsed from the wire's JSON."""
    body = {"argv": list(argv), **kw} if argv else kw
    body.setdefault("window", 1 << 20)  # rexec/2: every EXEC carries its output window
    return parse_exec_request(json.dumps(body).encode())


def check(policy: Policy, request: ExecRequest, peer: str = "127.0.0.1:5000") -> Decision:
    """evaluate() with the spec the session would build for this request without a policy."""
    host = peer if peer == "unix" else peer.rsplit(":", 1)[0]
    spec = dataclasses.replace(BASE, cwd=resolve_cwd(request.cwd or None, BASE.env["HOME"]))
    return evaluate(policy, request, peer, host, spec)


@pytest.mark.parametrize(
    ("pattern", "argv", "ok"),
    [
        ("ls", ["ls"], True),
        ("ls", ["ls", "-l"], False),
        ("ls ...", ["ls"], True),
        ("ls ...", ["ls", "-l", "/tmp"], True),
        ("ls -l ...", ["ls"], False),
        ("ls -l *", ["ls", "-l", "/a/b c"], True),
        ("ls -l *", ["ls", "-l"], False),
        ("systemctl restart 'web@*.service'", ["systemctl", "restart", "web@1.service"], True),
        ("systemctl restart 'web@*.service'", ["systemctl", "restart", "db.service"], False),
        ("cat /var/log/[a-m]*.log", ["cat", "/var/log/auth.log"], True),
        ("cat /var/log/[a-m]*.log", ["cat", "/var/log/syslog"], False),
        ("echo 'a b'", ["echo", "a b"], True),
        ("echo 'a b'", ["echo", "a", "b"], False),
        ("Echo", ["echo"], False),  # case-sensitive
    ],
)
def test_argv_patterns(pattern: str, argv: list[str], ok: bool) -> None:
    assert argv_matches(shlex.split(pattern), argv) is ok
    decision = check(Policy.build(allow=[pattern]), req(*argv))
    assert decision.allowed is ok


def test_allow_refuses_shell_lines_unless_allow_shell() -> None:
    policy = Policy.build(allow=["ls ..."])
    d = check(policy, req(command="ls; touch x"))
    assert not d.allowed and d.rule == "allow"
    assert d.reason.startswith("allow: shell command lines are refused")
    d = check(policy.replace(allow_shell=True), req(command="ls; touch x"))
    assert d.allowed and d.rule == "allow-shell"


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ("uptime", ("uptime",)),
        ("  ls  -d /tmp ", ("ls", "-d", "/tmp")),
        ("systemctl restart web@1.service", ("systemctl", "restart", "web@1.service")),
    ],
)
def test_a_plain_shell_line_is_checked_and_run_as_its_argv(
    line: str, argv: tuple[str, ...]
) -> None:
    """`rexec run HOST uptime` sends one argument, a shell line: with --allow 'uptime' it
    must run (as ssh's user expects), and what runs is the argv the pattern checked."""
    policy = Policy.build(allow=[shlex.join(argv)])
    d = check(policy, req(command=line))
    assert d.allowed and d.rule == f"allow {shlex.join(argv)}"
    assert d.spec is not None and d.spec.argv == argv
    assert d.plain == argv


@pytest.mark.parametrize(
    "line", ["ls; touch x", "ls *", "echo $HOME", "A=1 ls", "ls ~", "ls 'a'", "ls\tx", "ls|x"]
)
def test_a_line_with_any_shell_syntax_stays_a_shell_line(line: str) -> None:
    d = check(Policy.build(allow=["ls ...", "A=1 ...", "echo ..."]), req(command=line))
    assert not d.allowed and d.rule == "allow" and d.plain is None


def test_allow_shell_and_no_policy_keep_a_plain_line_a_shell_line() -> None:
    for policy in (Policy.build(allow=["ls"], allow_shell=True), Policy.build()):
        d = check(policy, req(command="ls"))
        assert d.allowed and d.plain is None and d.spec is not None and d.spec.argv == ("x",)


def test_refusal_names_the_argv_and_the_rule() -> None:
    d = check(Policy.build(allow=["ls ..."]), req("rm", "-rf", "/"))
    assert not d.allowed
    assert d.reason == "allow: argv rm -rf / matches no --allow pattern of this token"
    assert d.audit() == {
        "decision": "refused",
        "rule": "allow",
        "reason": d.reason,
    }


def test_allow_forbids_loader_variables() -> None:
    policy = Policy.build(allow=["ls"], env=["PATH", "LD_PRELOAD"])
    d = check(policy, req("ls", env={"LD_PRELOAD": "/tmp/x.so"}))
    assert not d.allowed and "may not set LD_PRELOAD" in d.reason
    assert check(policy, req("ls", env={"LANG": "C"})).allowed


def test_no_policy_passes_the_spec_through() -> None:
    d = evaluate(Policy(), req("anything"), "unix", "unix", BASE)
    assert d.allowed and d.rule == "none" and d.spec is BASE


@pytest.mark.parametrize(
    ("rules", "peer", "ok"),
    [
        (["127.0.0.1/32"], "127.0.0.1:4000", True),
        (["127.0.0.1/32"], "127.0.0.2:4000", False),
        (["127.0.0.0/8"], "127.0.0.2:4000", True),
        (["127.0.0.1"], "[::ffff:127.0.0.1]:4000", True),  # v4-mapped
        (["::1"], "[::1]:4000", True),
        (["127.0.0.1/32"], "unix", False),
        (["unix"], "unix", True),
        (["unix"], "127.0.0.1:4000", False),
    ],
)
def test_from(rules: list[str], peer: str, ok: bool) -> None:
    policy = Policy.build(from_=rules)
    if peer.startswith("["):
        host = peer[1 : peer.index("]")]
    else:
        host = peer if peer == "unix" else peer.rsplit(":", 1)[0]
    d = evaluate(policy, req("id"), peer, host, BASE)
    assert d.allowed is ok
    if not ok:
        assert d.reason.startswith("from: ")


def test_max_timeout_clamps() -> None:
    policy = Policy.build(max_timeout=5)
    assert check(policy, req("x")).spec == dataclasses.replace(BASE, timeout=5.0)
    spec = check(policy, req("x", timeout=2)).spec
    assert spec is not None and spec.timeout == 5.0  # no timeout in the base spec: the cap
    base = ExecSpec(argv=("x",), env={}, timeout=3.0)
    assert evaluate(policy, req("x"), "unix", "unix", base).spec.timeout == 3.0  # type: ignore[union-attr]
    base = ExecSpec(argv=("x",), env={}, timeout=30.0)
    assert evaluate(policy, req("x"), "unix", "unix", base).spec.timeout == 5.0  # type: ignore[union-attr]


def test_no_pty_refuses_a_pty_request() -> None:
    pty = parse_exec_request(
        b'{"argv":["sh"],"window":0,"pty":{"term":"xterm","rows":24,"cols":80}}'
    )
    d = evaluate(Policy.build(no_pty=True), pty, "unix", "unix", BASE)
    assert not d.allowed and d.rule == "no-pty"
    assert evaluate(Policy.build(), pty, "unix", "unix", BASE).allowed
    assert check(Policy.build(no_pty=True), req("sh")).allowed


def test_cwd_under(tmp_path: Path) -> None:
    (tmp_path / "srv" / "app").mkdir(parents=True)
    (tmp_path / "srv" / "escape").symlink_to("/")
    policy = Policy.build(cwd_under=str(tmp_path / "srv"))
    spec = check(policy, req("ls")).spec
    assert spec is not None and spec.cwd == str(tmp_path / "srv")
    assert check(policy, req("ls", cwd=str(tmp_path / "srv" / "app"))).allowed
    for bad in ("/etc", str(tmp_path / "srv" / "escape"), str(tmp_path / "srv" / ".." / "x")):
        d = check(policy, req("ls", cwd=bad))
        assert not d.allowed and d.reason.startswith("cwd-under: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="run-as identity lookups need a nobody user")
def test_run_as_switches_identity_and_environment() -> None:
    nobody = pwd.getpwnam("nobody")
    d = check(Policy.build(run_as="nobody"), req("id", "-u"))
    assert d.allowed and d.rule == "run-as nobody"
    spec = d.spec
    assert spec is not None and spec.groups is not None
    assert (spec.uid, spec.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert nobody.pw_gid in spec.groups
    assert spec.env["USER"] == spec.env["LOGNAME"] == "nobody"
    assert spec.env["HOME"] == nobody.pw_dir
    assert spec.env["PATH"] == "/bin"  # the rest of the base environment stays
    assert spec.cwd == (nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/")


def test_run_as_unknown_user_and_not_root() -> None:
    with pytest.raises(ConfigError, match="no such user"):
        resolve_identity("no-such-user-rexec")
    with pytest.raises(ConfigError, match="needs a server running as root"):
        check_run_as(Policy.build(run_as="nobody"), 1000)
    check_run_as(Policy(), 1000)


def test_learn_allows_and_flags_what_allow_would_refuse() -> None:
    d = check(Policy.build(learn=True), req("id"))
    assert d.allowed and d.learn and d.rule == "learn"
    d = check(Policy.build(learn=True, allow=["ls"]), req("id"))
    assert d.allowed and d.learn
    assert d.rule.startswith("learn (would refuse: allow: argv id")
    d = check(Policy.build(learn=True, from_=["10.0.0.0/8"]), req("id"))
    assert not d.allowed and d.rule == "from"


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-l", "/tmp"],
        ["echo", "a b", "it's", ""],
        ["find", ".", "-name", "*.py", "-o", "-name", "[ab]?"],
        ["tail", "..."],
        ["x", "...", "y"],
    ],
)
def test_learned_patterns_match_exactly_what_ran(argv: list[str]) -> None:
    pattern = pattern_for_argv(argv)
    words = shlex.split(pattern)
    assert argv_matches(words, argv)
    assert not argv_matches(words, [*argv, "more"])
    assert not argv_matches(words, [*argv[:-1], argv[-1] + "x"])
    assert check(Policy.build(allow=[pattern]), req(*argv)).allowed


def test_store_form_round_trip_and_summary() -> None:
    policy = Policy.build(
        allow=["ls ...", "echo 'a b'"],
        allow_shell=True,
        from_=["10.1.2.3/8", "unix", "unix"],
        max_timeout=30,
        no_pty=True,
        env=["CC"],
        cwd_under="/srv//app/",
        run_as="nobody",
        learn=True,
    )
    assert policy.from_ == ("10.0.0.0/8", "unix")
    assert policy.cwd_under == "/srv/app"
    doc = policy.to_json()
    assert doc["from"] == ["10.0.0.0/8", "unix"] and doc["max_timeout"] == 30.0
    assert Policy.from_json("t", doc) == policy
    assert Policy().to_json() == {} and Policy().summary() == "-"
    assert policy.summary() == (
        "allow='ls ...' allow='echo '\"'\"'a b'\"'\"'' allow-shell from=10.0.0.0/8 from=unix "
        "max-timeout=30 no-pty env=CC cwd-under=/srv/app run-as=nobody learn"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "policy: must be an object"),
        ({"allowed": []}, "unknown keys ['allowed']"),
        ({"allow": "ls"}, "allow: must be a list of strings"),
        ({"allow": ["'ls"]}, "No closing quotation"),
        ({"allow": ["..."]}, "needs at least the program"),
        ({"allow": ["ls ... x"]}, "'...' may only be the last word"),
        ({"from": ["10.0.0.300"]}, "expected an address, a CIDR or 'unix'"),
        ({"max_timeout": 0}, "max_timeout: must be a positive number"),
        ({"max_timeout": True}, "max_timeout: must be a positive number"),
        ({"cwd_under": "srv"}, "cwd_under: must be an absolute path"),
        ({"run_as": "a:b"}, "run_as: must be a user name"),
        ({"learn": 1}, "learn: must be true or false"),
        ({"env": ["A=B"]}, "not a variable name"),
    ],
)
def test_invalid_policies_are_named(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_json("store: tokens[0] ('a')", raw)
    assert str(info.value).startswith("store: tokens[0] ('a'): policy: ")
    assert message in str(info.value)


# ---- transfers (docs/PROTOCOL.md 3.3, 17) ---------------------------------------------


def transfer(policy: Policy, op: str, *paths: str, peer: str = "127.0.0.1") -> Decision:
    return evaluate_transfer(policy, op, paths, f"{peer}:5000", peer)


def test_transfer_rules() -> None:
    assert transfer(Policy(), "put", "/x") == Decision(True, "none")
    boxed = Policy.build(transfer_under="/srv/box/")
    ok = transfer(boxed, "put", "a/b", "/srv/box", "/srv/box/c")
    assert ok.allowed and ok.root == "/srv/box" and ok.rule == "transfer-under"
    for bad, why in (
        ("../x", "../x: '..' is not allowed"),
        ("a/../../x", "a/../../x: '..' is not allowed"),
        ("/srv/boxed/x", "/srv/boxed/x is not under /srv/box"),
        ("/etc/passwd", "/etc/passwd is not under /srv/box"),
    ):
        refused = transfer(boxed, "get", bad)
        assert (refused.allowed, refused.reason) == (False, f"transfer-under: {why}")
    reader = Policy.build(read_only=True)
    assert transfer(reader, "get", "x").allowed
    assert (
        transfer(reader, "put", "x").reason == "read-only: this token may only download files (get)"
    )
    assert not transfer(Policy.build(from_=["10.0.0.0/8"]), "get", "x").allowed
    assert transfer(Policy.build(run_as="root"), "get", "x").rule == "run-as"
    patterns = Policy.build(allow=["ls ..."])
    assert transfer(patterns, "get", "x").rule == "allow"
    assert transfer(patterns.replace(transfer_under="/srv"), "get", "x").allowed
    only = Policy.build(transfer_only=True)
    assert check(only, req("true")).reason == "transfer-only: this token may only transfer files"
    assert transfer(only, "put", "x").allowed


def test_transfer_rules_in_the_store_form() -> None:
    policy = Policy.build(transfer_only=True, read_only=True, transfer_under="/srv")
    assert policy.to_json() == {"transfer_only": True, "read_only": True, "transfer_under": "/srv"}
    assert Policy.from_json("t", policy.to_json()) == policy
    assert policy.summary() == "transfer-only read-only transfer-under=/srv"
    with pytest.raises(ConfigError, match="transfer_under: must be an absolute path"):
        Policy.build(transfer_under="relative")
