"""`rexec shell HOST` on a terminal and `rexec run -t`: the real CLI in a pseudo-terminal
(pexpect) against a real `rexec serve`, the remote shell on a real remote pty.

The server's commands get a fixed prompt (PS1) and an empty HOME, so the user's rc files
cannot change what the tests see. Every expect is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect  # type: ignore[import-untyped]
import pytest

import rexec
from rexec import PtyRequest

TIMEOUT = 10
PROMPT = "rx$ "
Spawn = Callable[..., pexpect.spawn]


@pytest.fixture(scope="module")
def pty_server(e2e: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    base = tmp_path_factory.mktemp("ptysrv")
    home = base / "home"
    home.mkdir()
    env = f'PATH = "/usr/local/bin:/usr/bin:/bin", PS1 = "{PROMPT}", HOME = "{home}"'
    config = f"[exec]\nbase_env = {{ {env} }}\n"
    srv = e2e.start_server(base, config=config)
    yield srv
    srv.stop()


@pytest.fixture
def spawn(e2e: Any, tmp_path: Path) -> Iterator[Spawn]:
    """Start the real CLI in a local pty (40x120); every child is closed at teardown."""
    children: list[pexpect.spawn] = []

    def start(server: Any, *args: str, argv: list[str] | None = None) -> pexpect.spawn:
        env = e2e.clean_env({"REXEC_TOKEN": server.token, "XDG_STATE_HOME": str(tmp_path)})
        env.update(TERM="xterm")
        child = pexpect.spawn(
            argv[0] if argv else e2e.REXEC,
            argv[1:] if argv else [*args],
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
            dimensions=(40, 120),
        )
        children.append(child)
        if os.environ.get("SHELL_TEST_LOG"):
            child.logfile_read = open(os.environ["SHELL_TEST_LOG"], "a")  # noqa: SIM115
        return child

    yield start
    for child in children:
        child.close(force=True)


def shell(spawn: Spawn, server: Any, *, bare: bool = False) -> pexpect.spawn:
    child = spawn(server, *([] if bare else ["shell"]), server.address)
    child.expect_exact(PROMPT)
    return child


def run(child: pexpect.spawn, line: str) -> str:
    """Type a line; what it printed before the next prompt (after the remote echo)."""
    child.send(line + "\r")
    child.expect_exact(line + "\r\n")
    child.expect_exact(PROMPT)
    return str(child.before).replace("\r\n", "\n")


def end(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, child.signalstatus
    return int(child.exitstatus)


def test_a_real_shell_on_a_real_terminal(pty_server: Any, spawn: Spawn) -> None:
    child = shell(spawn, pty_server)
    assert re.fullmatch(r"/dev/pts/\d+\n", run(child, "tty"))
    assert run(child, "echo $TERM") == "xterm\n"
    assert run(child, "stty size") == "40 120\n"
    child.setwinsize(30, 100)  # SIGWINCH here; WINDOW to the server; TIOCSWINSZ there
    deadline = time.monotonic() + TIMEOUT
    while (out := run(child, "stty size")) != "30 100\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out == "30 100\n"
    # shell state lives on: variables, and a compound command typed over three lines
    run(child, "X=5")
    assert run(child, "echo $X") == "5\n"
    child.send("for i in 1 2 3\r")
    child.send("do echo n$i\r")
    child.send("done\r")
    child.expect_exact("done\r\n")
    child.expect_exact(PROMPT)
    assert str(child.before).replace("\r\n", "\n").split() == ["n1", "n2", "n3"]
    child.send("exit 3\r")
    assert end(child) == 3


def test_ctrl_c_ctrl_z_and_fg(pty_server: Any, spawn: Spawn, e2e: Any) -> None:
    child = shell(spawn, pty_server)
    marker = e2e.marker("100")
    child.send(f"sleep {marker}\r")
    assert e2e.wait_until(lambda: e2e.cmdline_pids(f"sleep {marker}"), TIMEOUT)
    start = time.monotonic()
    child.send("\x03")  # a byte: the remote terminal makes it SIGINT for sleep
    child.expect_exact(PROMPT)
    assert time.monotonic() - start < 2
    assert e2e.wait_until(lambda: not e2e.cmdline_pids(f"sleep {marker}"), 2)
    assert run(child, "echo alive") == "alive\n"  # the shell survived
    # Ctrl-Z stops the foreground job, fg brings it back
    child.send("cat\r")
    child.expect_exact("cat\r\n")
    child.send("before\r")
    child.expect_exact("before\r\nbefore\r\n")
    child.send("\x1a")
    child.expect(r"Stopped")
    child.expect_exact(PROMPT)
    child.send("fg\r")
    child.expect_exact("cat")
    child.send("after\r")
    child.expect_exact("after\r\nafter\r\n")
    child.send("\x04")
    child.expect_exact(PROMPT)
    child.send("exit\r")
    assert end(child) == 0


@pytest.mark.skipif(shutil.which("vi") is None, reason="no vi on this machine (vim-tiny)")
def test_vi_edits_and_saves_a_file(pty_server: Any, spawn: Spawn, tmp_path: Path) -> None:
    target = tmp_path / "edited.txt"
    child = shell(spawn, pty_server)
    child.send(f"vi -u NONE -N {target}\r")
    child.expect_exact(target.name)  # the screen is drawn
    time.sleep(0.2)
    child.send("ihello from vi\x1b")
    child.send(":wq\r")
    child.expect_exact(PROMPT)
    assert target.read_text() == "hello from vi\n"
    child.send("exit\r")
    assert end(child) == 0


@pytest.mark.skipif(shutil.which("top") is None, reason="no top on this machine (procps)")
def test_top_batch_and_interactive(pty_server: Any, spawn: Spawn) -> None:
    child = shell(spawn, pty_server)
    out = run(child, "top -b -n1 | head -3")
    assert out.startswith("top - ") and "load average" in out
    child.send("top\r")
    child.expect_exact("load average")
    time.sleep(0.3)
    child.send("q")
    child.expect_exact(PROMPT)
    assert run(child, "echo $?") == "0\n"
    child.send("exit\r")
    assert end(child) == 0


def test_bare_target_is_the_pty_shell_and_escapes(pty_server: Any, spawn: Spawn) -> None:
    child = shell(spawn, pty_server, bare=True)  # `rexec HOST`, as `ssh HOST`
    assert re.fullmatch(r"/dev/pts/\d+\n", run(child, "tty"))
    child.send("~?")  # at the start of a line
    child.expect_exact("~.   - terminate connection")
    child.send("\r~.")
    child.expect_exact("rexec: disconnected (~.)")
    assert end(child) == 255


def test_run_t_forces_a_pty_and_default_has_none(pty_server: Any, e2e: Any) -> None:
    tty = e2e.run_cli(["run", "-t", pty_server.address, "tty"], token=pty_server.token)
    assert tty.returncode == 0, tty.stderr
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", tty.stdout)
    plain = e2e.run_cli(["run", pty_server.address, "tty"], token=pty_server.token)
    assert (plain.returncode, plain.stdout) == (1, b"not a tty\n")
    no = e2e.run_cli(["run", "-t", "-T", pty_server.address, "tty"], token=pty_server.token)
    assert (no.returncode, no.stdout) == (1, b"not a tty\n")
    for bad in (["--json"], ["-x", "nohost"]):  # one output stream; one host
        usage = e2e.run_cli(["run", "-t", *bad, pty_server.address, "tty"], token=pty_server.token)
        assert usage.returncode == 2, usage.stderr
        assert b"-t" in usage.stderr
    # one stream: stderr comes through the terminal, and the exit status is the command's
    both = e2e.run_cli(
        ["run", "-t", pty_server.address, "echo out; echo err >&2; exit 4"], token=pty_server.token
    )
    assert (both.returncode, both.stdout, both.stderr) == (4, b"out\r\nerr\r\n", b"")


def test_run_t_top_batch(pty_server: Any, e2e: Any) -> None:
    if shutil.which("top") is None:
        pytest.skip("no top on this machine (procps)")
    proc = e2e.run_cli(["run", "-t", pty_server.address, "top -b -n1"], token=pty_server.token)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"top - ")


def test_no_pty_token_is_refused(pty_server: Any, e2e: Any) -> None:
    token = e2e.new_token(pty_server.store, "nopty")  # then restrict it
    edited = e2e.run_cli(["token", "edit", "nopty", "--no-pty", "--store", str(pty_server.store)])
    assert edited.returncode == 0, edited.stderr
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        proc = e2e.run_cli(["run", "-t", pty_server.address, "tty"], token=token)
        if proc.returncode == 255:
            break
        time.sleep(0.2)  # the server notices the store within ~0.5 s
    assert proc.returncode == 255
    assert b"no-pty" in proc.stderr
    plain = e2e.run_cli(["run", pty_server.address, "true"], token=token)
    assert plain.returncode == 0


# ---- the local terminal is given back as it was --------------------------------------------


def wrapped(spawn: Spawn, server: Any, e2e: Any, *args: str) -> pexpect.spawn:
    """`stty -g; rexec ...; echo rc=$?; stty -g` in one local terminal."""
    script = f'stty -g; {e2e.REXEC} "$@"; echo "rc=$?"; stty -g'
    return spawn(server, argv=["/bin/sh", "-c", script, "sh", *args])


def settings(child: pexpect.spawn) -> tuple[str, str, int]:
    child.expect(pexpect.EOF)
    text = str(child.before).replace("\r\n", "\n")
    lines = [line for line in text.split("\n") if line]
    rc = next(int(line[3:]) for line in reversed(lines) if line.startswith("rc="))
    stty = [line for line in lines if re.fullmatch(r"[0-9a-f]+(:[0-9a-f]+)+", line)]
    return stty[0], stty[-1], rc


def test_terminal_restored_after_exit(pty_server: Any, spawn: Spawn, e2e: Any) -> None:
    child = wrapped(spawn, pty_server, e2e, "shell", pty_server.address)
    child.expect_exact(PROMPT)
    child.send("exit 7\r")
    before, after, rc = settings(child)
    assert (after, rc) == (before, 7)


def test_terminal_restored_after_escape(pty_server: Any, spawn: Spawn, e2e: Any) -> None:
    child = wrapped(spawn, pty_server, e2e, "shell", pty_server.address)
    child.expect_exact(PROMPT)
    child.send("~.")
    before, after, rc = settings(child)
    assert (after, rc) == (before, 255)


def test_terminal_restored_after_sigterm(pty_server: Any, spawn: Spawn, e2e: Any) -> None:
    child = wrapped(spawn, pty_server, e2e, "shell", pty_server.address)
    child.expect_exact(PROMPT)
    marker = e2e.marker("sleep ")
    child.send(f"echo {marker}; sleep 100\r")
    child.expect_exact(f"{marker}\r\n")
    pids = e2e.cmdline_pids(f"{e2e.REXEC} shell")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGTERM)
    before, after, rc = settings(child)
    assert (after, rc) == (before, 128 + signal.SIGTERM)


@pytest.mark.slow  # a server of its own
def test_terminal_restored_when_the_server_is_killed(
    server_factory: Any, spawn: Spawn, e2e: Any
) -> None:
    srv = server_factory()
    child = wrapped(spawn, srv, e2e, "shell", srv.address)
    child.expect(r"[$#] ")
    child.send("echo started\r")
    child.expect_exact("started\r\n")
    os.kill(srv.pid, signal.SIGKILL)
    before, after, rc = settings(child)
    assert (after, rc) == (before, 255)
    assert "Traceback" not in str(child.before)


def test_terminal_restored_after_a_ctrl_c_storm(pty_server: Any, spawn: Spawn, e2e: Any) -> None:
    child = wrapped(spawn, pty_server, e2e, "shell", pty_server.address)
    child.expect_exact(PROMPT)
    child.send("sleep 100\r")
    child.expect_exact("sleep 100\r\n")
    child.send("\x03" * 50)  # bytes to the remote shell, never signals to the client
    child.expect_exact(PROMPT)
    child.send("exit 0\r")
    before, after, rc = settings(child)
    assert (after, rc) == (before, 0)


# ---- the API: conn.start(..., pty=PtyRequest(...)) and process.resize() ---------------------

SIZE_SCRIPT = "stty size; read x; stty size; echo got:$x; exit 5"


def test_async_api_pty_and_resize(pty_server: Any) -> None:
    import asyncio

    async def go() -> tuple[bytes, bytes, int | None]:
        async with rexec.connect(pty_server.address, token=pty_server.token) as conn:
            proc = await conn.start(SIZE_SCRIPT, stdin=True, pty=PtyRequest("vt100", 24, 80))
            first = await proc.stdout.read_chunk()
            while b"\n" not in first:
                first += await proc.stdout.read_chunk()
            proc.resize(30, 100)
            await proc.write(b"hi\r")
            result = await proc.wait()
            return first, result.stdout, result.exit_code

    first, rest, code = asyncio.run(asyncio.wait_for(go(), 30))
    assert first == b"24 80\r\n"
    assert rest == b"hi\r\n30 100\r\ngot:hi\r\n"  # the terminal echoes what was typed
    assert code == 5


def test_sync_api_pty_and_resize(pty_server: Any) -> None:
    with rexec.Client(pty_server.address, token=pty_server.token) as client:
        proc = client.start(SIZE_SCRIPT, stdin=True, pty=PtyRequest("vt100", 24, 80))
        first = proc.stdout.read_chunk()
        while b"\n" not in first:
            first += proc.stdout.read_chunk()
        proc.resize(30, 100)
        proc.write(b"hi\r")
        result = proc.wait()
    assert first == b"24 80\r\n"
    assert (result.stdout, result.stderr, result.exit_code) == (
        b"hi\r\n30 100\r\ngot:hi\r\n",
        b"",
        5,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="--run-as needs a server running as root")
def test_run_as_owns_its_terminal(pty_server: Any, e2e: Any) -> None:
    token = e2e.new_token(pty_server.store, "asnobody")
    edited = e2e.run_cli(
        ["token", "edit", "asnobody", "--run-as", "nobody", "--store", str(pty_server.store)]
    )
    assert edited.returncode == 0, edited.stderr
    deadline = time.monotonic() + 5
    while True:  # the server notices the store within ~0.5 s
        proc = e2e.run_cli(
            ["run", "-t", pty_server.address, 'id -un; stat -c %U "$(tty)"'], token=token
        )
        if proc.stdout.startswith(b"nobody") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (proc.returncode, proc.stdout) == (0, b"nobody\r\nnobody\r\n"), proc.stderr


def test_a_large_paste_arrives_whole(pty_server: Any, spawn: Spawn) -> None:
    import hashlib

    data = b"0123456789abcdefghijklmnopqrstuvwxyz\n" * 6000  # 222 KB, far over the pty's buffer
    child = shell(spawn, pty_server)
    child.send(f"stty raw -echo; head -c {len(data)} | md5sum; stty sane\r")
    child.expect_exact("stty sane\r\n")
    time.sleep(0.3)  # the remote terminal is raw by now
    child.delaybeforesend = None
    for i in range(0, len(data), 4096):
        child.send(data[i : i + 4096].decode())
    child.expect_exact(hashlib.md5(data).hexdigest(), timeout=30)
    child.expect_exact(PROMPT)
    child.send("exit\r")
    assert end(child) == 0


def test_run_t_in_a_pipe_forwards_ctrl_c(pty_server: Any, e2e: Any) -> None:
    import subprocess

    marker = e2e.marker("100")
    env = e2e.clean_env({"REXEC_TOKEN": pty_server.token})
    proc = subprocess.Popen(
        [e2e.REXEC, "run", "-t", pty_server.address, f"sleep {marker}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:  # the remote sleep (not the client, whose argv holds the same words)
        remote = lambda: set(e2e.cmdline_pids(f"sleep {marker}")) - {proc.pid}  # noqa: E731
        assert e2e.wait_until(remote, TIMEOUT)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 128 + signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
    assert e2e.wait_until(lambda: not e2e.cmdline_pids(f"sleep {marker}"), 2)
