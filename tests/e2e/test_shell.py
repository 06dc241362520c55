"""`rexec shell --repl` (the line REPL) as a person uses it: the real CLI in a pseudo-terminal
(pexpect) against a real `rexec serve`. Every expect is bounded, so a hung shell fails the test
instead of CI. The pty session (`rexec shell` on a terminal) is tests/e2e/test_pty_shell.py."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect  # type: ignore[import-untyped]
import pytest

TIMEOUT = 10
# user@host:CWD [STATUS]$ (or # for root); readline may wrap it in bracketed-paste codes
PROMPT = re.compile(r"\S+@\S+:(\S+?)(?: \[(\d+)\])?[#$] ")

Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def spawn(e2e: Any, tmp_path: Path) -> Iterator[Spawn]:
    """Start `rexec shell --repl ADDRESS` in a pty; every child is closed at teardown."""
    children: list[pexpect.spawn] = []

    def start(server: Any, *args: str, **env: str) -> pexpect.spawn:
        environ = e2e.clean_env(
            {"REXEC_TOKEN": server.token, "XDG_STATE_HOME": str(tmp_path / "state")}
        )
        environ.pop("NO_COLOR", None)
        environ.update(TERM="xterm", **env)
        child = pexpect.spawn(
            e2e.REXEC,
            ["shell", "--repl", server.address, *args],
            env=environ,
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
            dimensions=(40, 200),
            maxread=65536,
        )
        children.append(child)
        if os.environ.get("SHELL_TEST_LOG"):
            child.logfile_read = open(os.environ["SHELL_TEST_LOG"], "a")  # noqa: SIM115
        return child

    yield start
    for child in children:
        child.close(force=True)


def prompt(child: pexpect.spawn) -> tuple[str, int]:
    """Wait for the next prompt; returns (shown cwd, shown status)."""
    child.expect(PROMPT)
    match = child.match
    assert match is not None
    return match.group(1), int(match.group(2) or 0)


def run(child: pexpect.spawn, line: str) -> tuple[str, str, int]:
    """Send a line; return what came back before the next prompt, the prompt's cwd and status.

    The output starts after the echo of the line itself.
    """
    child.sendline(line)
    child.expect_exact(line)
    cwd, status = prompt(child)
    out = (child.before or "").replace("\x1b[?2004l", "").replace("\r\n", "\n").lstrip("\r\n")
    return out, cwd, status


def ready(child: pexpect.spawn) -> None:
    child.expect_exact("rexec: connected to ")
    prompt(child)


def test_cd_and_pwd_persist(server: Any, spawn: Spawn) -> None:
    child = spawn(server)
    ready(child)
    assert run(child, "cd /tmp")[1:] == ("/tmp", 0)
    assert run(child, "pwd") == ("/tmp\n", "/tmp", 0)
    assert run(child, "/bin/pwd")[0] == "/tmp\n"  # sent as cwd= with every command
    # a failed cd shows the remote error and keeps the old directory
    out, cwd, status = run(child, "cd /nonexistent-rexec-dir")
    assert "can't cd" in out or "No such file" in out
    assert (cwd, status) == ("/tmp", 2)
    assert run(child, "cd /usr/../etc")[1:] == ("/etc", 0)
    assert run(child, "cd -")[:2] == ("/tmp\n", "/tmp")
    assert run(child, "cd")[1] == "~"
    assert run(child, "cd /tmp; true")[1] == "~"  # compound: that line only
    child.sendeof()
    child.expect(pexpect.EOF)


def test_export_persists_and_allowlist_refusal(server: Any, spawn: Spawn) -> None:
    child = spawn(server)
    ready(child)
    assert run(child, "export REXEC_X=hello")[1:] == ("~", 0)
    assert run(child, "echo $REXEC_X")[0] == "hello\n"
    assert run(child, 'export REXEC_Y="$REXEC_X world"')[2] == 0  # evaluated by the server
    out, _, status = run(child, "export FOO_X=1")
    assert "not allowed" in out and "FOO_X" in out
    assert status != 0
    assert run(child, "echo [${FOO_X-unset}] $REXEC_Y")[0] == "[unset] hello world\n"
    assert run(child, ":env")[0] == "REXEC_X=hello\nREXEC_Y='hello world'\n"
    run(child, "unset REXEC_X")
    assert run(child, "echo [${REXEC_X-unset}]")[0] == "[unset]\n"
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_interrupts_the_remote_command(server: Any, spawn: Spawn, e2e: Any) -> None:
    marker = f"sleep 100.{uuid.uuid4().int % 10**9}"
    child = spawn(server)
    ready(child)
    child.sendline(marker)
    assert e2e.wait_until(lambda: e2e.cmdline_pids(marker), TIMEOUT)
    start = time.monotonic()
    child.sendintr()
    assert prompt(child)[1] == 130
    assert time.monotonic() - start < 1.0
    assert e2e.wait_until(lambda: not e2e.cmdline_pids(marker), 2.0)
    # Ctrl-C at the prompt drops the line and sends nothing. CPython's readline loop only
    # notices a SIGINT that interrupts its select(); one landing while readline is still
    # handling the typed keys waits for the next key (a person just presses Ctrl-C again),
    # so wait for the echo, and give a loaded machine a second Ctrl-C.
    child.send("echo never-sent")
    child.expect_exact("never-sent")
    time.sleep(0.1)
    child.sendintr()
    if child.expect([PROMPT, pexpect.TIMEOUT], timeout=3) == 1:
        child.sendintr()
        child.expect(PROMPT)
    assert run(child, "echo ok")[0] == "ok\n"
    assert "never-sent" not in server.audit_path.read_text()


def test_large_output_arrives_complete(server: Any, spawn: Spawn) -> None:
    child = spawn(server)
    ready(child)
    child.sendline("seq 1 170000; echo EN''D")
    child.expect_exact("\r\nEND\r\n", timeout=30, searchwindowsize=64)
    text = (child.before or "").replace("\r\n", "\n")
    body = text[text.index("\n1\n") + 1 :] + "\n"
    expected = "".join(f"{i}\n" for i in range(1, 170001))
    assert len(expected) > 1_000_000
    assert body == expected
    assert prompt(child)[1] == 0


def test_empty_lines_send_nothing(server: Any, spawn: Spawn, e2e: Any) -> None:
    child = spawn(server)
    ready(child)
    run(child, "echo one")

    def last_command() -> object:
        records = server.audit_records()
        return records[-1].get("command") if records else None

    # its audit record may be written just after the output came: count from it
    assert e2e.wait_until(lambda: last_command() == "echo one", 10.0)
    before = len(server.audit_lines())
    for line in ("", "   ", "\t"):
        child.sendline(line)
        prompt(child)
    run(child, "echo two")
    assert e2e.wait_until(lambda: len(server.audit_lines()) == before + 1, 10.0)
    time.sleep(0.2)
    assert len(server.audit_lines()) == before + 1
    assert server.audit_records()[-1]["command"] == "echo two"


def test_ctrl_d_exits_0_and_history_is_kept(server: Any, spawn: Spawn, tmp_path: Path) -> None:
    child = spawn(server)
    ready(child)
    run(child, "echo remembered-line")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = tmp_path / "state" / "rexec" / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert history.read_text().splitlines()[-1] == "echo remembered-line"
    # a new session recalls it with the up arrow
    child = spawn(server)
    ready(child)
    child.send("\x1b[A\r")
    child.expect_exact("remembered-line\r\n")
    prompt(child)


@pytest.mark.slow
def test_early_ctrl_d_reaches_the_prompt(server: Any, spawn: Spawn) -> None:
    """A Ctrl-D typed while a command runs, or right as its output ends, ends the REPL.

    It used to be lost: typed in the terminal's canonical mode, the kernel keeps it as an
    end-of-file mark, which becomes a NUL byte when readline switches modes.
    """
    for i in range(20):
        child = spawn(server)
        ready(child)
        child.sendline("echo hi")
        if i % 2:  # right after the output
            child.expect_exact("hi\r\n")
        child.sendeof()  # else while the command is still on its way
        child.expect(pexpect.EOF, timeout=5)
        child.close()
        assert child.exitstatus == 0, i


def test_builtins_timeout_trace_completion(server: Any, spawn: Spawn) -> None:
    child = spawn(server)
    ready(child)
    out, _, status = run(child, ":help")
    assert ":timeout" in out and status == 0
    run(child, ":timeout 0.5")
    out, _, status = run(child, "sleep 5")
    assert "timed out" in out and status == 124
    run(child, ":timeout off")
    child.send(":tr\t")  # tab-completes the built-in
    child.expect_exact(":trace ")
    child.sendline("on")
    prompt(child)
    out = run(child, "echo traced")[0]
    assert "rexec: > EXEC ch=" in out and "rexec: < EXIT ch=" in out
    run(child, ":trace off")
    assert run(child, "echo quiet")[0] == "quiet\n"


def test_output_decoding_and_colour(server: Any, spawn: Spawn) -> None:
    child = spawn(server)
    ready(child)
    # bad bytes become U+FFFD; a character split across two chunks survives
    out = run(child, r"printf 'a\377b\n'; printf '\342\202'; sleep 0.2; printf '\254\n'")[0]
    assert out == "a\ufffdb\n\u20ac\n"
    assert run(child, "echo oops >&2")[0] == "\x1b[31moops\x1b[0m\n"
    plain = spawn(server, NO_COLOR="1")
    ready(plain)
    assert run(plain, "echo oops >&2")[0] == "oops\n"


def test_server_killed_mid_session(server_factory: Any, spawn: Spawn) -> None:
    srv = server_factory()
    child = spawn(srv)
    ready(child)
    child.sendline("echo started; sleep 3")
    child.expect_exact("started")
    os.kill(srv.pid, signal.SIGKILL)
    child.expect(r"rexec: connection to \S+ lost: [^\r\n]+\r\n")
    child.expect_exact("reconnect? [Y/n] ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 255
    assert "Traceback" not in (child.before or "")


def test_reconnect_keeps_session_state(server_factory: Any, spawn: Spawn, e2e: Any) -> None:
    srv = server_factory()
    child = spawn(srv)
    ready(child)
    run(child, "cd /tmp")
    run(child, "export REXEC_K=kept")
    srv.stop()
    child.sendline("echo $REXEC_K")
    child.expect(r"connection to \S+ lost: [^\r\n]+\r\n")
    child.expect_exact("reconnect? [Y/n] ")
    (srv.base / "ready").unlink()
    again = e2e.start_server(srv.base, listen=[srv.address], token_name="t2")
    try:
        child.sendline("y")
        child.expect_exact("rexec: reconnected to ")
        assert prompt(child)[0] == "/tmp"
        assert run(child, "echo $REXEC_K; pwd")[0] == "kept\n/tmp\n"
    finally:
        again.stop()
    assert "Traceback" not in (child.before or "")


def test_piped_lines_run_without_prompt(server: Any, e2e: Any) -> None:
    script = b"cd /tmp\n\nexport REXEC_P=piped\npwd; echo $REXEC_P\nfalse\n"
    proc = e2e.run_cli(["shell", server.address], token=server.token, input=script, timeout=20)
    # as `sh < script` and `ssh HOST < script`: the end of input leaves with the last status
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, b"/tmp\npiped\n", b"")


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (b"sh -c 'exit 3'\nexit\n", 3),  # a bare exit: the last status, as sh's
        (b"sh -c 'exit 3'\nexit 0\n", 0),
        (b"false\ntrue\n", 0),
        (b"echo x; exit 4\n", 4),  # the remote shell's exit ends that line only
        (b":timeout bogus\n", 1),  # a built-in that failed
    ],
)
def test_piped_script_exits_with_its_last_status(
    server: Any, e2e: Any, script: bytes, status: int
) -> None:
    proc = e2e.run_cli(["shell", server.address], token=server.token, input=script, timeout=20)
    assert proc.returncode == status, proc.stderr


def test_unreachable_target_is_one_line_and_255(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["shell", "127.0.0.1:1"], token=server.token, timeout=20)
    assert proc.returncode == 255
    assert proc.stderr.startswith(b"rexec: cannot connect to 127.0.0.1:1")
    assert proc.stderr.count(b"\n") == 1


def test_a_policy_refusal_ends_one_line_not_the_session(server: Any, e2e: Any) -> None:
    """POLICY refuses one command (PROTOCOL.md 3.3; the connection goes on): the REPL says
    so once per refused line, never "connection lost", and goes on to the next line."""
    store = ("--store", str(server.store))
    proc = subprocess.run(
        [e2e.REXEC, "token", "new", "--id", "only-echo", "--allow", "echo ...", *store],
        capture_output=True,
        env=e2e.clean_env(),
        timeout=20,
        check=True,
    )
    token = proc.stdout.decode().strip()
    time.sleep(1.2)  # the server polls its store twice a second
    script = b"id\necho still here\n"
    out = e2e.run_cli(["shell", server.address], token=token, input=script, timeout=20)
    assert (out.returncode, out.stdout) == (0, b"still here\n")
    assert out.stderr == (
        b"rexec: server error (policy): allow: argv id matches no --allow pattern of this token\n"
    )
