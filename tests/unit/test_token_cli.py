"""`rexec token` subcommands in-process: options to store, errors to exit 2 with a reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rexec.cli.tokens import cmd_token
from rexec.protocol.fleetkey import parse_fleet_token
from rexec.protocol.token import parse_token


def token(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cmd_token(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def entry(store: Path, name: str) -> dict[str, object]:
    return next(t for t in json.loads(store.read_text())["tokens"] if t["name"] == name)


def test_new_with_policy_then_edit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "t.json")
    rc, out, _ = token(
        capsys, "new", "--id", "ci", "--store", store, "--allow", "make ...", "--allow",
        "git pull", "--from", "10.0.0.0/8", "--from", "unix", "--max-timeout", "60",
        "--no-pty", "--env", "CC", "--cwd-under", "/srv", "--expires", "2099-01-01",
    )  # fmt: skip
    assert rc == 0 and parse_token(out)
    saved = entry(tmp_path / "t.json", "ci")
    assert saved["expires"] == "2099-01-01T00:00:00Z"
    assert saved["policy"] == {
        "allow": ["make ...", "git pull"],
        "from": ["10.0.0.0/8", "unix"],
        "max_timeout": 60.0,
        "no_pty": True,
        "env": ["CC"],
        "cwd_under": "/srv",
    }
    rc, _, err = token(capsys, "edit", "ci", "--store", store, "--allow", "ls", "--pty")
    assert rc == 0 and "allow=ls from=10.0.0.0/8" in err
    policy = entry(tmp_path / "t.json", "ci")["policy"]
    assert isinstance(policy, dict) and policy["allow"] == ["ls"] and "no_pty" not in policy
    rc, _, err = token(capsys, "edit", "ci", "--store", store, "--reset", "--no-expires")
    assert rc == 0 and err.endswith("policy -\n")
    assert set(entry(tmp_path / "t.json", "ci")) == {"name", "key_id", "secret", "created"}


def test_rotate_prints_the_new_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "t.json")
    _, first, _ = token(capsys, "new", "--id", "a", "--store", store)
    rc, out, err = token(capsys, "rotate", "a", "--store", store, "--overlap", "1h")
    assert rc == 0 and parse_token(out) != parse_token(first)
    assert f"the old key id {parse_token(first).key_id.hex()} works for 1h" in err
    rc, _, err = token(capsys, "list", "--store", store)
    assert rc == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["revoke", "nope"], "no token named 'nope'"),
        (["rotate", "a", "--overlap", "soon"], "invalid duration 'soon'"),
        (["new", "--id", "b", "--expires", "2030-02-30"], "invalid date"),
        (["new", "--id", "b", "--from", "300.1.1.1"], "expected an address, a CIDR or 'unix'"),
        (["new", "--id", "b", "--allow", "'ls"], "No closing quotation"),
        (["new", "--id", "b", "--run-as", "no-such-user-rexec"], "no such user"),
        (["new", "--id", "a"], "a token named 'a' already exists"),
        (["learned", "a"], None),
    ],
)
def test_errors_exit_2_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str | None
) -> None:
    store = str(tmp_path / "t.json")
    token(capsys, "new", "--id", "a", "--store", store)
    rc, out, err = token(capsys, *args, "--store", store)
    if message is None:  # learned with nothing recorded: says so, not an error
        assert (rc, out) == (0, "") and "nothing recorded for token 'a'" in err
        return
    assert rc == 2 and out == ""
    assert err.startswith("rexec: ") and message in err


LOADER_REFUSAL = (
    "rexec: --env {names} with --allow: a token with --allow patterns may not set {names} "
    "(the server refuses it: it changes what an allowed argv runs)\n"
)


def test_loader_env_with_allow_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server refuses PATH, LD_*, ... for a token with --allow: new/edit/import say so
    up front instead of making a token that fails every such command."""
    store = str(tmp_path / "t.json")
    rc, out, err = token(
        capsys, "new", "--id", "a", "--store", store, "--allow", "make", "--env", "CC",
        "--env", "PATH", "--env", "LD_PRELOAD",
    )  # fmt: skip
    assert (rc, out, err) == (2, "", LOADER_REFUSAL.format(names="LD_PRELOAD, PATH"))
    assert not (tmp_path / "t.json").exists()
    rc, _, _ = token(capsys, "new", "--id", "a", "--store", store, "--allow", "make", "--env", "*")
    assert rc == 0  # a pattern that admits other names too is no contradiction
    rc, out, err = token(capsys, "edit", "a", "--store", store, "--env", "BASH_ENV")
    assert (rc, out, err) == (2, "", LOADER_REFUSAL.format(names="BASH_ENV"))
    assert entry(tmp_path / "t.json", "a")["policy"] == {"allow": ["make"], "env": ["*"]}
    rc, _, _ = token(capsys, "new", "--id", "b", "--store", store, "--env", "PATH")
    assert rc == 0  # no --allow: PATH is the token's to set
    rc, out, err = token(capsys, "edit", "b", "--store", store, "--allow", "ls")
    assert (rc, out, err) == (2, "", LOADER_REFUSAL.format(names="PATH"))
    line = tmp_path / "line"
    line.write_text("rexec1:bf4f2d04daa7b368:tkFCo56tDilFBjKJHOBNpxSI80ZvuS6qsKFAy8GTKhs\n")
    line.chmod(0o600)
    rc, out, err = token(
        capsys, "import", "--id", "c", str(line), "--store", store, "--allow", "ls", "--env", "IFS"
    )
    assert (rc, out, err) == (2, "", LOADER_REFUSAL.format(names="IFS"))


def test_fleet_new_refuses_store_and_policy_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = token(capsys, "new", "--fleet", "lab")
    assert rc == 0 and parse_fleet_token(out).name == "lab"
    for extra in (["--allow", "ls"], ["--no-pty"], ["--store", "x.json"], ["--learn"]):
        rc, out, err = token(capsys, "new", "--fleet", "lab", *extra)
        assert rc == 2 and out == "" and "--fleet takes no store or policy options" in err


def test_import_reads_a_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "t.json")
    line = tmp_path / "line"
    line.write_text("rexec1:bf4f2d04daa7b368:tkFCo56tDilFBjKJHOBNpxSI80ZvuS6qsKFAy8GTKhs\n")
    line.chmod(0o644)
    rc, _, err = token(capsys, "import", "--id", "f", str(line), "--store", store)
    assert rc == 2 and "chmod 600" in err
    line.chmod(0o600)
    rc, _, err = token(capsys, "import", "--id", "f", str(line), "--store", store)
    assert rc == 0 and "key id bf4f2d04daa7b368" in err
    assert entry(tmp_path / "t.json", "f")["key_id"] == "bf4f2d04daa7b368"
    rc, _, err = token(capsys, "import", "--id", "g", str(line), "--store", store)
    assert rc == 2 and "that key id is already in the store" in err


@pytest.mark.parametrize("when", ["2000-01-01", "0d"])
def test_an_expiry_already_past_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], when: str
) -> None:
    """A mistyped year makes a token the server refuses at once: say so (it is still made,
    and `edit --expires` to a past date is how a token is expired now)."""
    store = str(tmp_path / "t.json")
    rc, out, err = token(capsys, "new", "--id", "a", "--store", store, "--expires", when)
    assert rc == 0 and parse_token(out)
    assert re.fullmatch(
        r"rexec: note: token 'a' expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, already past: "
        r"the server refuses it",
        err.splitlines()[0],
    )
    rc, _, err = token(capsys, "edit", "a", "--store", store, "--expires", "30d")
    assert rc == 0 and "already past" not in err
