"""Setting up a server as a new user or systemd would: messages that say what to do, the
secret printed only on a terminal, systemd's notify protocol over a real datagram socket,
StateDirectory=/RuntimeDirectory= as defaults, and a unix socket others may be let into."""

from __future__ import annotations

import grp
import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _serve(e2e: Any, args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
    return subprocess.Popen(
        [e2e.REXEC, "serve", "--log-format", "json", *args],
        stdin=subprocess.DEVNULL, env=e2e.clean_env(env), **kw,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_configured_server_with_an_empty_store_says_how_to_add_a_token(
    e2e: Any, tmp_path: Path
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nstate_dir = "{tmp_path / "state"}"\n')
    ready, log = tmp_path / "ready", tmp_path / "log"
    with open(log, "wb") as out:
        args = ["--config", str(cfg), "--ready-file", str(ready)]
        proc = _serve(e2e, args, stdout=out, stderr=out)
    try:
        assert e2e.wait_until(lambda: ready.exists() or proc.poll() is not None, 20)
    finally:
        assert _stop(proc) == 0
    store = tmp_path / "state" / "tokens.json"
    [warning] = [r for r in _json_lines(log.read_text()) if r["level"] == "warning"]
    assert warning["event"] == (
        f"the token store {store} is empty: nobody can log in. Add a token (no restart needed), "
        f"as user root: rexec token new --id NAME --store {store}"
    )
    assert not store.exists()  # a configured server never invents a token


def test_token_list_says_which_store_it_read(e2e: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "checkout"
    work.mkdir()
    env = e2e.clean_env({"HOME": str(home)})
    run = lambda *a: subprocess.run(  # noqa: E731
        [e2e.REXEC, "token", "list", *a], capture_output=True, env=env, cwd=work, timeout=30
    )
    default = home / ".local/state/rexec-server/tokens.json"
    proc = run()
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert proc.stderr.decode().splitlines() == [
        f"rexec: no token store at {default} (no tokens)",
        "rexec: that is the default store; for another one pass --state-dir, --store or --config",
    ]
    # in a checkout where `make serve` ran (--state-dir .state), say where its tokens are
    e2e.new_token(work / ".state" / "tokens.json", "made")
    proc = run()
    assert proc.stderr.decode().splitlines()[-1] == (
        "rexec: `make serve` keeps its tokens in ./.state: rexec token list --state-dir .state"
    )
    proc = run("--state-dir", ".state")
    assert proc.returncode == 0
    assert proc.stdout.decode().splitlines()[1].startswith("made\t")  # under the header
    assert proc.stderr.decode() == f"rexec: 1 token in {work / '.state' / 'tokens.json'}\n"
    # README's `rexec token new --id laptop` typed there: the token goes to the default
    # store, which the `make serve` server does not read: say so
    new = subprocess.run(
        [e2e.REXEC, "token", "new", "--id", "laptop"],
        capture_output=True, env=env, cwd=work, timeout=30,
    )  # fmt: skip
    assert new.returncode == 0
    assert new.stderr.decode().splitlines() == [
        f"rexec: added token 'laptop' to {default}",
        "rexec: `make serve` keeps its tokens in ./.state, and this one is not there: "
        "rexec token new --id laptop --state-dir .state",
    ]


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_first_start_prints_the_secret_on_a_terminal_only(e2e: Any, tmp_path: Path) -> None:
    """The file case is in test_robustness (the secret is never in captured output)."""
    state = tmp_path / "state"
    master, slave = pty.openpty()
    proc = _serve(
        e2e,
        ["--listen", "127.0.0.1:0", "--state-dir", str(state)],
        stdout=slave,
        stderr=subprocess.DEVNULL,
    )
    os.close(slave)
    try:
        text = _read_until(master, b"\n\n    rexec1:", 20)
        text += _read_until(master, b"\n\n", 5)
    finally:
        _stop(proc)
        os.close(master)
    token = (state / "client.token").read_text().strip()
    assert f"\n    {token}\r\n".encode() in text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_a_restart_prints_the_client_command_again(e2e: Any, tmp_path: Path) -> None:
    """`make serve` a second time: the token exists, and what to paste is printed again,
    with the address bound now (the first start's port 0 gave another one)."""
    state = tmp_path / "state"
    for _ in range(2):
        ready = tmp_path / "ready"
        ready.unlink(missing_ok=True)
        proc = _serve(
            e2e,
            ["--listen", "127.0.0.1:0", "--state-dir", str(state), "--ready-file", str(ready)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert e2e.wait_until(ready.exists, 20)
        finally:
            _stop(proc)
        out = proc.stdout.read().decode()
        address = ready.read_text().strip()
        paste = (
            f"    REXEC_TOKEN_FILE={state / 'client.token'} {e2e.REXEC} run {address} uname -a\n"
        )
        assert paste in out
    assert "created the first token" not in out and "token line" not in out
    assert out.startswith("rexec: run commands with the client's copy of token 'default':\n\n")


def test_config_mistakes_are_explained_in_plain_words(e2e: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text("[server]\nlisten = '127.0.0.1:0'\n[limits]\nkill_grace = '2'\n")
    proc = subprocess.run(
        [e2e.REXEC, "serve", "--config", str(cfg)],
        capture_output=True, env=e2e.clean_env(), timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        f"rexec: {cfg}: server.listen: expected a list, got the string '127.0.0.1:0'; "
        f"limits.kill_grace: expected a number, got the string '2'\n"
    )


# ---- systemd ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket under an abstract name, as systemd's NOTIFY_SOCKET often is."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"rexec-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    yield sock, "@" + name
    sock.close()


def _receive(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def test_notify_ready_and_stopping_and_systemd_directories(
    e2e: Any, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Type=notify with StateDirectory= and RuntimeDirectory=: no path in the config."""
    sock, name = notify_socket
    state, runtime = tmp_path / "lib" / "rexec", tmp_path / "run" / "rexec"
    state.mkdir(parents=True, mode=0o700)
    runtime.mkdir(parents=True)
    e2e.new_token(state / "tokens.json", "svc")
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')  # as the unit ships it: no paths
    env = {
        "NOTIFY_SOCKET": name,
        "STATE_DIRECTORY": str(state),
        "RUNTIME_DIRECTORY": str(runtime),
    }
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = _serve(e2e, ["--config", str(cfg)], env=env, stdout=out, stderr=out)
    try:
        ready = _receive(sock, 20)
        lines = ready.split("\n")
        assert lines[0] == "READY=1"
        assert lines[1].startswith("STATUS=listening on 127.0.0.1:")
        sock_path = runtime / "rexec.sock"
        assert lines[1].endswith(f" unix:{sock_path}")
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        token = (state / "tokens.json").read_text()
        assert "svc" in token
        address = lines[1].split()[2]
        tok = e2e.new_token(state / "tokens.json", "second")
        for target in (address, f"unix:{sock_path}"):
            run = e2e.run_cli(["run", target, "echo via systemd dirs"], token=tok)
            assert (run.returncode, run.stdout) == (0, b"via systemd dirs\n"), run.stderr
        assert len((state / "audit.jsonl").read_text().splitlines()) == 2
        proc.send_signal(signal.SIGTERM)
        assert _receive(sock, 20) == "STOPPING=1\nSTATUS=shutting down"
    finally:
        assert _stop(proc) == 0, log.read_text()


def test_unix_socket_mode_and_group_let_other_users_in(e2e: Any, tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid() if os.getgid() else 100)
    srv_base = tmp_path / "srv"
    cfg = f'[server]\nunix_mode = 0o660\nunix_group = "{group.gr_name}"\n'
    srv = e2e.start_server(srv_base, config=cfg, unix=[str(tmp_path / "r.sock")])
    try:
        st = (tmp_path / "r.sock").stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
        run = e2e.run_cli(["run", f"unix:{tmp_path / 'r.sock'}", "echo ok"], token=srv.token)
        assert (run.returncode, run.stdout) == (0, b"ok\n")
    finally:
        srv.stop()


def test_unit_file_declares_what_the_server_implements() -> None:
    unit = (Path(__file__).resolve().parents[2] / "configs/rexec.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["Delegate"] == "yes"
    assert settings["StateDirectory"] == "rexec" and settings["RuntimeDirectory"] == "rexec"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "state_dir" not in settings["ExecStart"] and "--unix" not in settings["ExecStart"]
    assert "Overall exposure level" in unit or "systemd-analyze security" in unit
