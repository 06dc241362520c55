"""Admission control and start-up checks: failed-auth rate limiting per source, connection
and channel limits, a token store others can read, and a config with a mistyped key."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rexec import ErrorCode, Token
from rexec.protocol.client import ClientConnection
from rexec.protocol.events import ErrorReceived, ExitReceived, HandshakeComplete, OutputReceived
from rexec.protocol.token import parse_token

BUSY_NOTICE = b"RXNO\x02\x01\x00\x01"  # docs/PROTOCOL.md 6.6: busy, retry after 1 s
RATE_LIMITED_NOTICE = b"RXNO\x02\x02\x00\x3c"  # rate limited, retry after 60 s


def _closed_within(sock: socket.socket, timeout: float, notice: bytes = b"") -> bool:
    """Did the peer close (EOF or reset) within timeout, sending us `notice` and no more?"""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if chunk:
            data += chunk
            continue
        assert data == notice, f"the server sent {data!r} to a connection it should close"
        return True


def _connect_from(source: str, address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))


def _raw_run(sock: socket.socket, token: Token, command: str) -> tuple[int | None, bytes]:
    """A minimal client over an already connected socket: handshake, one command, its exit."""
    conn = ClientConnection(token)
    conn.initiate()
    sock.sendall(conn.data_to_send())
    out = b""
    deadline = time.monotonic() + 10
    sent_exec = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        assert data, "server closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, HandshakeComplete) and not sent_exec:
                conn.send_exec(command)
                sent_exec = True
            elif isinstance(event, OutputReceived):
                out += event.data
            elif isinstance(event, ExitReceived):
                return event.status.exit_code, out
        sock.sendall(conn.data_to_send())
    raise AssertionError("no EXIT within 10s")


# ---- failed-auth rate limiting ------------------------------------------------------


def test_auth_failures_lock_out_the_source(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nauth_failures = 3\nauth_window = 60.0\n")
    good = parse_token(srv.token)
    wrong = Token(good.key_id, bytes(32)).format()
    for attempt in range(3):
        proc = e2e.run_cli(["run", srv.address, "echo no"], token=wrong)
        assert proc.returncode == 255, attempt
        assert proc.stdout == b""
        assert proc.stderr.startswith(b"rexec: authentication failed"), proc.stderr
    assert e2e.wait_until(lambda: len(srv.log_events("authentication failed")) == 3, 3)
    # the 4th connection from 127.0.0.1 is told "rate limited" and closed at once
    with _connect_from("127.0.0.1", srv.address) as s:
        t0 = time.monotonic()
        assert _closed_within(s, 1.0, RATE_LIMITED_NOTICE), "4th connection was not closed"
        assert time.monotonic() - t0 < 0.5
    # ... even with the right token, which is not blamed
    t0 = time.monotonic()
    proc = e2e.run_cli(["run", srv.address, "echo yes"], token=srv.token)
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"rexec: the server refused the connection: rate limited")
    assert proc.stderr.count(b"\n") == 1
    assert time.monotonic() - t0 < 5
    refusals = [
        r
        for r in srv.log_events("connection refused")
        if r.get("reason") == "too many failed authentications from 127.0.0.1"
    ]
    assert len(refusals) == 2
    # per source: another loopback address is not locked out
    try:
        other = _connect_from("127.0.0.2", srv.address)
    except OSError as exc:  # pragma: no cover - 127.0.0.0/8 is loopback on Linux
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    with other:
        assert _raw_run(other, good, "echo from-127.0.0.2") == (0, b"from-127.0.0.2\n")
    records = srv.wait_audit(1)
    assert len(records) == 1  # nothing from the refused or failed attempts
    assert records[0]["peer"].startswith("127.0.0.2:")


# ---- connection limits --------------------------------------------------------------


def test_max_connections_and_max_unauthenticated(server_factory: Any, e2e: Any) -> None:
    srv = server_factory(
        "[limits]\nmax_connections = 4\nmax_unauthenticated = 2\nhandshake_timeout = 30.0\n"
        "hello_timeout = 30.0\n"  # the idle raw connections below hold their slots
    )
    a1, a2 = srv.connect(), srv.connect()
    raws: list[socket.socket] = []
    try:
        for conn in (a1, a2):
            assert conn.run("echo in").stdout == b"in\n"  # authenticated for sure
        raws = [_connect_from("127.0.0.1", srv.address) for _ in range(2)]  # unauthenticated
        time.sleep(0.3)
        # 4 admitted (2 authenticated, 2 in the handshake): a 5th is refused at once
        with _connect_from("127.0.0.1", srv.address) as extra:
            assert _closed_within(extra, 1.0, BUSY_NOTICE)
        assert e2e.wait_until(lambda: srv.log_events("limit hit: max_connections"), 3)
        proc = e2e.run_cli(["run", srv.address, "echo no"], token=srv.token)
        assert proc.returncode == 255
        assert proc.stderr.startswith(b"rexec: the server refused the connection: busy")
        assert proc.stderr.count(b"\n") == 1
        # one authenticated connection leaves: 3 admitted, but 2 still in the handshake
        a1.close()
        assert e2e.wait_until(lambda: len(srv.log_events("connection closed")) >= 1, 3)
        with _connect_from("127.0.0.1", srv.address) as extra:
            assert _closed_within(extra, 1.0, BUSY_NOTICE)
        hits = e2e.wait_until(lambda: srv.log_events("limit hit: max_unauthenticated"), 3)
        assert hits and hits[0]["max_unauthenticated"] == 2
        # the admitted ones were not disturbed
        for s in raws:
            assert not _closed_within(s, 0.05)
        assert a2.run("echo still").stdout == b"still\n"
        # a handshake slot frees up: a new client gets in
        raws.pop().close()
        a3 = e2e.wait_until(lambda: _try_connect(srv), 3)
        assert a3, "no slot after an unauthenticated connection left"
        try:
            assert a3.run("echo a3").stdout == b"a3\n"
        finally:
            a3.close()
    finally:
        for s in raws:
            s.close()
        a1.close()
        a2.close()
    refused = [r["reason"] for r in srv.log_events("connection refused")]
    assert "max_connections reached" in refused
    assert "max_unauthenticated reached" in refused


def _try_connect(srv: Any) -> Any:
    try:
        return srv.connect()
    except Exception:
        return None


def _raw_flood(address: str, token: Token, commands: list[str]) -> dict[int, Any]:
    """Send every EXEC at once, as no rexec client would (they wait for a free channel), and
    collect per channel: ("error", code, text) and/or ("exit", code, stdout)."""
    host, port = address.rsplit(":", 1)
    conn = ClientConnection(token)
    conn.initiate()
    got: dict[int, Any] = {}
    exits = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        out: dict[int, bytes] = {}
        while exits < len(commands):
            assert time.monotonic() < deadline, f"only {exits} EXITs in 10s"
            data = sock.recv(65536)
            assert data, "server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, HandshakeComplete):
                    for command in commands:
                        conn.send_exec(command)
                elif isinstance(event, OutputReceived):
                    out[event.channel] = out.get(event.channel, b"") + event.data
                elif isinstance(event, ErrorReceived):
                    got.setdefault(event.channel, []).append(("error", event.code, event.message))
                elif isinstance(event, ExitReceived):
                    exits += 1
                    code = event.status.exit_code
                    got.setdefault(event.channel, []).append(
                        ("exit", code, out.get(event.channel, b""))
                    )
            sock.sendall(conn.data_to_send())
    return got


def test_max_channels_per_connection(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nmax_channels = 2\n")
    other = srv.connect()
    try:
        got = _raw_flood(
            srv.address,
            srv.token_obj,
            ["sleep 0.6; echo one", "sleep 0.6; echo two", "echo three"],
        )
        limit = "too many commands on this connection (max_channels=2)"
        assert got == {
            1: [("exit", 0, b"one\n")],
            2: [("exit", 0, b"two\n")],
            3: [("error", ErrorCode.LIMIT, limit), ("exit", 255, b"")],
        }
        # the limit is per connection
        assert other.run("echo other").stdout == b"other\n"
        # the client itself never hits it: a third start waits for a free channel
        first = other.start("sleep 0.3; echo a")
        second = other.start("sleep 0.3; echo b")
        third = other.start("echo c")
        assert first.status is not None or second.status is not None  # one had to end first
        assert [p.wait().stdout for p in (first, second, third)] == [b"a\n", b"b\n", b"c\n"]
    finally:
        other.close()
    hits = srv.log_events("limit hit: max_channels")
    assert len(hits) == 1 and hits[0]["max_channels"] == 2
    errors = [r.get("error") for r in srv.wait_audit(7)]
    assert errors.count(f"limit: {limit}") == 1


# ---- start-up checks ----------------------------------------------------------------


def _serve(e2e: Any, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    ready = tmp_path / "ready"
    proc = subprocess.run(
        [
            e2e.REXEC,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--ready-file",
            str(ready),
            "--log-format",
            "json",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env(),
        timeout=20,
        check=False,
    )
    assert not ready.exists(), "the server started"
    return proc


def test_token_store_readable_by_others_refused(e2e: Any, tmp_path: Path) -> None:
    store = tmp_path / "tokens.json"
    e2e.new_token(store, "t")
    assert (store.stat().st_mode & 0o777) == 0o600
    os.chmod(store, 0o644)
    proc = _serve(e2e, tmp_path, "--tokens", str(store))
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert (
        proc.stderr
        == (
            f"rexec: token store {store} has mode 0644: group and others must have no access; "
            f"fix it with: chmod 600 {store}\n"
        ).encode()
    )
    os.chmod(store, 0o640)
    proc = _serve(e2e, tmp_path, "--tokens", str(store))
    assert proc.returncode == 2 and b"has mode 0640" in proc.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[limits]\nmax_conections = 3\n", "unknown key 'limits.max_conections'"),
        ("[limitz]\nmax_connections = 3\n", "unknown key 'limitz'"),
        ('[limits]\nmax_connections = "3"\n', "limits.max_connections: "),
        ("[exec]\nshell = 'sh'\n", "exec.shell: must be an absolute path, got 'sh'"),
    ],
)
def test_bad_config_refused(e2e: Any, tmp_path: Path, toml: str, message: str) -> None:
    store = tmp_path / "tokens.json"
    e2e.new_token(store, "t")
    cfg = tmp_path / "server.toml"
    cfg.write_text(toml)
    proc = _serve(e2e, tmp_path, "--tokens", str(store), "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stdout == b""
    text = proc.stderr.decode()
    assert text.startswith(f"rexec: {cfg}: ") and text.count("\n") == 1, text
    assert message in text


# ---- time limits --------------------------------------------------------------------


def test_max_timeout_caps_every_command(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\ndefault_timeout = 0.3\nmax_timeout = 0.6\n")
    cases = [([], 0.3), (["--timeout", "100"], 0.6), (["--timeout", "0.4"], 0.4)]
    marker = e2e.marker("1000.60")
    for n, (opts, limit) in enumerate(cases):
        t0 = time.monotonic()
        proc = e2e.run_cli(["run", *opts, srv.address, f"sleep {marker}{n}"], token=srv.token)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 124, (opts, proc.stderr)
        assert limit < elapsed < limit + 3, (opts, elapsed)
    records = srv.wait_audit(3)
    for (opts, limit), r in zip(cases, records, strict=True):
        assert r["timed_out"] is True
        assert limit - 0.05 < r["duration"] < limit + 1.0, (opts, r["duration"])
    assert e2e.cmdline_pids(marker) == []


def test_idle_timeout_spares_running_commands(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nidle_timeout = 1.0\n")
    idle = srv.connect()
    busy = None
    try:
        assert idle.run("echo x").stdout == b"x\n"
        # a command quieter than the idle timeout is activity all the same
        busy = srv.connect()
        result = busy.run("sleep 1.6; echo still-connected")
        assert (result.exit_code, result.stdout) == (0, b"still-connected\n")
        why = e2e.wait_until(idle.check_alive, 3.0)
        assert why is not None, "the idle connection was never closed"
        assert "idle" in why, why
    finally:
        idle.abort()
        if busy is not None:
            busy.close()
    events = srv.log_events("idle timeout; closing connection")
    assert len(events) == 1 and events[0]["idle_timeout"] == 1.0


# ---- server lifecycle ---------------------------------------------------------------


def test_second_sigterm_hurries_the_shutdown(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nshutdown_grace = 60.0\nkill_grace = 1.0\n")
    marker = e2e.marker("1000.61")
    conn = srv.connect()
    try:
        conn.start(f"sleep {marker}")
        assert e2e.wait_until(lambda: srv.log_events("command started"), 5)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert e2e.wait_until(lambda: srv.log_events("shutting down"), 5)
        time.sleep(0.3)
        assert srv.alive()  # still inside its 60 s grace period
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert time.monotonic() - t0 < 6
    finally:
        conn.abort()
    assert srv.log_events("second shutdown request: killing commands now")
    records = srv.audit_records()
    assert len(records) == 1 and records[0]["signal"] == signal.SIGTERM
    assert e2e.cmdline_pids(marker) == []


def test_idle_server_stops_at_once_and_removes_its_socket(
    server_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "life.sock"
    srv = server_factory(unix=[str(path)])
    assert path.is_socket()
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 3
    assert not path.exists()
    assert srv.log_events("stopped")


def test_address_in_use(e2e: Any, tmp_path: Path) -> None:
    """One plain line naming the address, whatever containment had started (three tries:
    a cgroup move still under way once the loop closed used to print a traceback)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        store = tmp_path / "tokens.json"
        e2e.new_token(store, "t")
        for _ in range(3):
            _serve_on_busy_port(e2e, tmp_path, store, port)


def _serve_on_busy_port(e2e: Any, tmp_path: Path, store: Path, port: int) -> None:
    proc = subprocess.run(
        [
            e2e.REXEC,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--tokens",
            str(store),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env(),
        timeout=20,
        check=False,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(b"{")]
    assert lines == [
        f"rexec: cannot start the server: cannot listen on 127.0.0.1:{port}: "
        "Address already in use".encode()
    ]


def _serve_unix_fails(e2e: Any, tmp_path: Path, path: Path, store: Path) -> list[bytes]:
    """`rexec serve --unix PATH` that must not start: its stderr lines but the JSON log's."""
    state = ["--state-dir", str(tmp_path / "state"), "--log-format", "json"]
    proc = subprocess.run(
        [e2e.REXEC, "serve", "--unix", str(path), "--tokens", str(store), *state],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env(),
        timeout=20,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    return [line for line in proc.stderr.splitlines() if not line.startswith(b"{")]


def test_unix_socket_in_a_missing_directory_is_one_line(e2e: Any, tmp_path: Path) -> None:
    store = tmp_path / "tokens.json"
    e2e.new_token(store, "t")
    path = tmp_path / "missing" / "s.sock"
    assert _serve_unix_fails(e2e, tmp_path, path, store) == [
        f"rexec: cannot start the server: cannot listen on unix:{path}: "
        "No such file or directory".encode()
    ]


def test_a_second_server_on_a_live_unix_socket_refuses_to_start(
    server_factory: Any, e2e: Any, tmp_path: Path
) -> None:
    """A socket path a live server answers on is in use (only a stale one is replaced): the
    second server used to unlink it and leave the first one unreachable."""
    path = tmp_path / "shared.sock"
    first = server_factory(unix=[str(path)])
    store = tmp_path / "tokens2.json"
    e2e.new_token(store, "t")
    assert _serve_unix_fails(e2e, tmp_path, path, store) == [
        f"rexec: cannot start the server: cannot listen on unix:{path}: "
        "Address already in use".encode()
    ]
    still = e2e.run_cli(["run", f"unix:{path}", "echo first"], token=first.token)
    assert (still.returncode, still.stdout) == (0, b"first\n")


def test_a_stale_unix_socket_is_replaced(e2e: Any, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening, then closed: what a crash leaves
    srv = e2e.start_server(tmp_path / "srv", unix=[str(path)])
    try:
        ok = e2e.run_cli(["run", f"unix:{path}", "echo up"], token=srv.token)
        assert (ok.returncode, ok.stdout) == (0, b"up\n")
    finally:
        srv.stop()


def test_new_token_works_without_restart(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    second = e2e.new_token(srv.store, "second")
    proc = e2e.run_cli(["run", srv.address, "echo hot"], token=second)
    assert (proc.returncode, proc.stdout) == (0, b"hot\n")
    records = srv.wait_audit(1)
    assert records[0]["key_name"] == "second"
    assert records[0]["key_id"] == parse_token(second).key_id.hex()


def test_first_start_creates_a_token_and_says_how_to_use_it(e2e: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ready = tmp_path / "ready"
    out_path = tmp_path / "stdout"
    with open(out_path, "wb") as out, open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [e2e.REXEC, "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state),
             "--ready-file", str(ready), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=e2e.clean_env(),
        )  # fmt: skip
    try:
        assert e2e.wait_until(lambda: ready.exists() or proc.poll() is not None, 20)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        address = ready.read_text().split()[0]
        client_file = state / "client.token"
        assert (client_file.stat().st_mode & 0o777) == 0o600
        assert ((state / "tokens.json").stat().st_mode & 0o777) == 0o600
        text = out_path.read_text()
        # stdout is a file, not a terminal: the secret is named by path, never printed
        secret_line = client_file.read_text().strip()
        assert secret_line.startswith("rexec1:")
        assert secret_line.rsplit(":", 1)[1] not in text
        assert f"use a copy of {client_file} (keep it mode 0600)" in text
        # the printed line works when pasted into a shell that does not have rexec on PATH
        [line] = [
            ln.strip() for ln in text.splitlines() if ln.strip().startswith("REXEC_TOKEN_FILE=")
        ]
        assert line.startswith(f"REXEC_TOKEN_FILE={client_file} ")
        assert line.endswith(f" run {address} uname -a")
        env = e2e.clean_env({"PATH": "/usr/bin:/bin"})
        pasted = subprocess.run(["sh", "-c", line], capture_output=True, env=env, timeout=30)
        assert pasted.returncode == 0, pasted.stderr
        assert pasted.stdout.startswith(b"Linux ")
        proc_run = e2e.run_cli(
            ["run", "--token-file", str(client_file), address, "echo first"],
        )
        assert (proc_run.returncode, proc_run.stdout) == (0, b"first\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
