"""Trusted state files (StrictModes): a state dir, token store or audit log that another user
owns or could replace is refused with one line naming the path and the fix; secrets are
never written through a planted file or a symbolic link; the audit log follows rotation,
reopens on SIGHUP, and `audit_failure = "refuse"` stops commands while it cannot be written.

The tests run as root, so "another user" is uid 65534 (nobody), set with chown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to nobody")


def serve_outcome(e2e: Any, base: Path, *args: str) -> tuple[int | None, str]:
    """Start `rexec serve ARGS`; (exit code, stderr) if it exits, (None, log) if it serves."""
    ready = base / "ready"
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [e2e.REXEC, "serve", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             "--log-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=e2e.clean_env(),
        )  # fmt: skip
    try:
        e2e.wait_until(lambda: ready.exists() or proc.poll() is not None, 20)
        rc = proc.poll()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    return rc, log.read_text(errors="replace")


def one_refusal(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("rexec: ")]
    assert len(lines) == 1, text
    return lines[0]


def test_state_dir_writable_by_others_is_refused(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    rc, text = serve_outcome(e2e, tmp_path, "--state-dir", str(state))
    assert rc == 2, text
    line = one_refusal(text)
    assert line == (
        f"rexec: state directory {state} is writable by group or others (mode 0777): "
        f"fix it with: chmod go-w {state}"
    )
    assert not (state / "tokens.json").exists()


def test_parent_dir_writable_by_group_is_refused(e2e: Any, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    state = shared / "state"
    rc, text = serve_outcome(e2e, tmp_path, "--state-dir", str(state))
    assert rc == 2, text
    line = one_refusal(text)
    assert line.startswith(f"rexec: directory {shared} above state directory {state} ")
    assert line.endswith(
        f"is writable by group or others (mode 0775): fix it with: chmod go-w {shared}"
    )


def test_sticky_parent_owned_by_root_is_accepted(e2e: Any, tmp_path: Path) -> None:
    """Like /tmp: others may create entries but not rename ours, and ours is checked."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    rc, text = serve_outcome(e2e, tmp_path, "--state-dir", str(sticky / "state"))
    assert rc is None, text


def test_parent_dir_owned_by_another_user_is_refused(e2e: Any, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    state = theirs / "state"
    state.mkdir(mode=0o700)
    rc, text = serve_outcome(e2e, tmp_path, "--state-dir", str(state))
    assert rc == 2, text
    line = one_refusal(text)
    assert line.startswith(f"rexec: directory {theirs} above state directory {state} is owned by ")
    assert f"(uid {NOBODY})" in line and f"fix it with: chown root {theirs}" in line


def test_token_store_owned_by_another_user_is_refused(e2e: Any, tmp_path: Path) -> None:
    store = tmp_path / "tokens.json"
    e2e.new_token(store, "planted")
    os.chown(store, NOBODY, NOBODY)
    assert store.stat().st_mode & 0o777 == 0o600
    rc, text = serve_outcome(
        e2e, tmp_path, "--tokens", str(store), "--state-dir", str(tmp_path / "s")
    )
    assert rc == 2, text
    assert one_refusal(text) == (
        f"rexec: token store {store} is owned by nobody (uid {NOBODY}), not by root (uid 0) "
        f"who runs rexec: fix it with: chown root {store}"
    )


def test_hot_reload_refuses_a_planted_store(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    """The attack from the issue: a store swapped in by another user ran `id -u` as root."""
    srv = server_factory()
    planted_store = tmp_path / "planted.json"
    planted = e2e.new_token(planted_store, "planted")
    os.chown(planted_store, NOBODY, NOBODY)
    os.replace(planted_store, srv.store)  # what someone who could write the directory does
    proc = e2e.run_cli(["run", srv.address, "id -u"], token=planted)
    assert proc.returncode == 255, proc.stdout
    assert b"authentication failed" in proc.stderr
    assert proc.stdout == b""
    events = srv.log_events("token store reload failed; keeping the previous tokens")
    assert events and f"is owned by nobody (uid {NOBODY})" in events[0]["error"]
    # the tokens that were trusted stay in force
    ok = e2e.run_cli(["run", srv.address, "echo still"], token=srv.token)
    assert (ok.returncode, ok.stdout) == (0, b"still\n")


def first_start(e2e: Any, state: Path, tmp_path: Path) -> tuple[int | None, str]:
    return serve_outcome(e2e, tmp_path, "--state-dir", str(state))


def test_planted_client_token_never_receives_the_secret(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    planted = state / "client.token"
    planted.write_text("planted\n")
    planted.chmod(0o666)
    handle = tmp_path / "attacker-handle"  # a second name for the planted inode
    os.link(planted, handle)
    rc, text = first_start(e2e, state, tmp_path)
    assert rc is None, text
    assert handle.read_text() == "planted\n"
    assert handle.stat().st_mode & 0o777 == 0o666
    st = planted.lstat()
    assert st.st_ino != handle.stat().st_ino
    assert st.st_mode & 0o777 == 0o600
    assert planted.read_text().startswith("rexec1:")


def test_symlinked_client_token_is_not_followed(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / "client.token").symlink_to(victim)
    rc, text = first_start(e2e, state, tmp_path)
    assert rc is None, text
    assert victim.read_text() == "precious\n"
    client = state / "client.token"
    assert not client.is_symlink()
    assert client.stat().st_mode & 0o777 == 0o600
    assert client.read_text().startswith("rexec1:")


def test_symlinked_audit_log_is_refused(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    audit = state / "audit.jsonl"
    audit.symlink_to(victim)
    rc, text = first_start(e2e, state, tmp_path)
    assert rc == 2, text
    assert one_refusal(text) == (
        f"rexec: audit log {audit} is a symbolic link: refusing to follow it; "
        f"fix it with: rm {audit} (rexec creates the file itself)"
    )
    assert victim.read_text() == "precious\n"


def test_world_readable_audit_log_is_refused(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    audit = state / "audit.jsonl"
    audit.write_text("")
    audit.chmod(0o644)
    rc, text = first_start(e2e, state, tmp_path)
    assert rc == 2, text
    assert one_refusal(text) == (
        f"rexec: audit log {audit} has mode 0644: group and others must have no access; "
        f"fix it with: chmod 600 {audit}"
    )


def test_new_audit_log_is_0600(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rc, text = first_start(e2e, state, tmp_path)
    assert rc is None, text
    assert (state / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


# ---- audit log rotation and failure policy ------------------------------------------


def test_rotation_without_copytruncate_loses_nothing(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    assert e2e.run_cli(["run", srv.address, "echo one"], token=srv.token).returncode == 0
    srv.wait_audit(1)
    rotated = srv.audit_path.with_name("audit.jsonl.1")
    os.rename(srv.audit_path, rotated)  # logrotate's default: rename, no signal needed
    assert e2e.run_cli(["run", srv.address, "echo two"], token=srv.token).returncode == 0
    records = srv.wait_audit(1)
    assert [r["command"] for r in records] == ["echo two"]
    assert [json.loads(ln)["command"] for ln in rotated.read_text().splitlines()] == ["echo one"]
    assert srv.audit_path.stat().st_mode & 0o777 == 0o600


def test_deleted_audit_log_is_recreated(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    assert e2e.run_cli(["run", srv.address, "echo one"], token=srv.token).returncode == 0
    srv.wait_audit(1)
    srv.audit_path.unlink()
    assert e2e.run_cli(["run", srv.address, "echo two"], token=srv.token).returncode == 0
    assert [r["command"] for r in srv.wait_audit(1)] == ["echo two"]


def test_sighup_reopens_the_audit_log(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    assert e2e.run_cli(["run", srv.address, "echo one"], token=srv.token).returncode == 0
    srv.wait_audit(1)
    os.rename(srv.audit_path, srv.audit_path.with_name("audit.jsonl.1"))
    srv.proc.send_signal(signal.SIGHUP)
    assert e2e.wait_until(srv.audit_path.exists, 5), "SIGHUP did not reopen the audit log"
    assert srv.alive()
    assert srv.log_events("audit log reopened")
    assert e2e.run_cli(["run", srv.address, "echo two"], token=srv.token).returncode == 0
    assert [r["command"] for r in srv.wait_audit(1)] == ["echo two"]


def _break_audit_log(path: Path) -> Path:
    """Make records unwritable: the path becomes a directory (the open fails)."""
    moved = path.with_name("audit.jsonl.old")
    os.rename(path, moved)
    path.mkdir()
    return moved


def test_audit_failure_refuse_stops_commands_until_records_can_be_written(
    server_factory: Any, e2e: Any
) -> None:
    srv = server_factory('[server]\naudit_failure = "refuse"\n')
    _break_audit_log(srv.audit_path)
    proc = e2e.run_cli(["run", srv.address, "echo ran >&2; echo ran"], token=srv.token)
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert proc.stderr.decode().strip() == (
        f"rexec: server error (internal): audit log unavailable, commands refused: "
        f"cannot open audit log {srv.audit_path}: Is a directory"
    )
    srv.audit_path.rmdir()
    ok = e2e.run_cli(["run", srv.address, "echo back"], token=srv.token)
    assert (ok.returncode, ok.stdout) == (0, b"back\n")
    first, second = srv.wait_audit(2)
    assert first["event"] == "audit-log-recovered"
    assert first["lost_records"] == 1  # the refusal's own record
    assert second["command"] == "echo back"


def test_audit_failure_log_runs_commands_and_logs(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    _break_audit_log(srv.audit_path)
    proc = e2e.run_cli(["run", srv.address, "echo ran"], token=srv.token)
    assert (proc.returncode, proc.stdout) == (0, b"ran\n")
    assert e2e.wait_until(lambda: srv.log_events("audit log write failed"), 5)
    srv.audit_path.rmdir()
    assert e2e.run_cli(["run", srv.address, "echo back"], token=srv.token).returncode == 0
    first, second = srv.wait_audit(2)
    assert (first["event"], first["lost_records"]) == ("audit-log-recovered", 1)
    assert second["command"] == "echo back"


@pytest.mark.parametrize("kind", ["uncreatable", "a file", "under a file"])
def test_unusable_state_dir_is_one_config_error(e2e: Any, tmp_path: Path, kind: str) -> None:
    """`serve` and `token new` say it is the state directory and why, exit 2, no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    state, reason = {
        "uncreatable": (Path("/proc/rexec-no-such"), "No such file or directory"),
        "a file": (afile, "is not a directory"),
        "under a file": (afile / "state", "Not a directory"),
    }[kind]
    rc, text = serve_outcome(e2e, tmp_path, "--state-dir", str(state))
    assert rc == 2, text
    assert one_refusal(text) == (
        f"rexec: state directory {state} {reason}"
        if kind == "a file"
        else f"rexec: cannot create state directory {state}: {reason}"
    )
    assert "Traceback" not in text and "Errno" not in text
    proc = e2e.run_cli(["token", "new", "--id", "x", "--state-dir", str(state)])
    assert (proc.returncode, proc.stdout) == (2, b""), proc.stderr
    text = proc.stderr.decode()
    assert "Traceback" not in text and "Errno" not in text
    store = state / "tokens.json"
    expected = {
        "uncreatable": f"cannot create directory {state} for token store {store}: {reason}",
        "a file": f"{afile} above token store {store} is not a directory",
        "under a file": f"cannot check {state} above token store {store}: {reason}",
    }
    assert one_refusal(text) == f"rexec: {expected[kind]}"
