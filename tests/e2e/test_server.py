"""The server under load and abuse: large byte-exact streams both ways, stdout and stderr at
once, stalled handshakes, garbage peers beside 50 real clients, SIGTERM with commands
running, memory under a slow reader, IPv6, and what the audit log holds (and never holds)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rexec import Stream
from rexec.protocol.client import ClientConnection
from rexec.protocol.frames import HELLO, MAGIC
from rexec.protocol.token import generate_token, parse_token

MiB = 1024 * 1024


def _random_file(path: Path, size: int) -> str:
    """Write size random bytes to path; returns their sha256 hex."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


# ---- large streams ------------------------------------------------------------------


def _stdout_roundtrip(server: Any, e2e: Any, tmp_path: Path, size: int) -> float:
    src = tmp_path / "src.bin"
    digest = _random_file(src, size)
    dst = tmp_path / "dst.bin"
    t0 = time.monotonic()
    with open(dst, "wb") as out:
        proc = e2e.run_cli(
            ["run", server.address, "cat", str(src)], token=server.token, stdout=out, timeout=300
        )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert _sha256_file(dst) == (size, digest)
    return elapsed


def _stdin_roundtrip(server: Any, e2e: Any, tmp_path: Path, size: int) -> float:
    src = tmp_path / "src.bin"
    digest = _random_file(src, size)
    t0 = time.monotonic()
    with open(src, "rb") as f:
        proc = e2e.run_cli(
            ["run", server.address, "sha256sum"], token=server.token, stdin=f, timeout=300
        )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{digest}  -\n".encode()
    return elapsed


def test_binary_stdout_8mib_exact(server: Any, e2e: Any, tmp_path: Path) -> None:
    _stdout_roundtrip(server, e2e, tmp_path, 8 * MiB + 12345)


def test_binary_stdin_8mib_exact(server: Any, e2e: Any, tmp_path: Path) -> None:
    _stdin_roundtrip(server, e2e, tmp_path, 8 * MiB + 54321)


@pytest.mark.slow
def test_binary_stdout_200mib_exact(server: Any, e2e: Any, tmp_path: Path) -> None:
    elapsed = _stdout_roundtrip(server, e2e, tmp_path, 200 * MiB)
    print(f"200 MiB stdout in {elapsed:.2f}s ({200 / elapsed:.0f} MiB/s)")


@pytest.mark.slow
def test_binary_stdin_200mib_exact(server: Any, e2e: Any, tmp_path: Path) -> None:
    elapsed = _stdin_roundtrip(server, e2e, tmp_path, 200 * MiB)
    print(f"200 MiB stdin in {elapsed:.2f}s ({200 / elapsed:.0f} MiB/s)")


@pytest.mark.slow
def test_remote_random_200mib_hashed_on_both_sides(server: Any, e2e: Any, tmp_path: Path) -> None:
    # the remote side makes the data and hashes what it sent (to stderr); we hash what came
    script = "{ head -c 209715200 /dev/urandom | tee /dev/fd/3 | sha256sum >&2; } 3>&1"
    dst = tmp_path / "dst.bin"
    with open(dst, "wb") as out:
        proc = e2e.run_cli(
            ["run", server.address, "sh", "-c", script], token=server.token, stdout=out, timeout=300
        )
    assert proc.returncode == 0, proc.stderr
    size, digest = _sha256_file(dst)
    assert size == 200 * MiB
    assert proc.stderr == f"{digest}  -\n".encode()


def test_stdout_and_stderr_20mib_each_at_once(server: Any, e2e: Any, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    da = _random_file(a, 20 * MiB)
    db = _random_file(b, 20 * MiB + 1)
    t0 = time.monotonic()
    proc = e2e.run_cli(
        ["run", server.address, f"cat {a} & cat {b} >&2; wait"], token=server.token, timeout=60
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0
    assert len(proc.stdout) == 20 * MiB and len(proc.stderr) == 20 * MiB + 1
    assert hashlib.sha256(proc.stdout).hexdigest() == da
    assert hashlib.sha256(proc.stderr).hexdigest() == db
    assert elapsed < 45


def test_stdout_and_stderr_interleaved_on_one_connection(server: Any) -> None:
    # many small writes alternating between the streams, collected by the sync API
    conn = server.connect()
    try:
        result = conn.run(
            "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
        )
    finally:
        conn.close()
    assert result.exit_code == 0
    assert result.stdout == b"".join(b"out%d\n" % i for i in range(2000))
    assert result.stderr == b"".join(b"err%d\n" % i for i in range(2000))


# ---- handshake deadline -------------------------------------------------------------


def _wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), or None if it stayed open."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            continue
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0


def test_stalled_handshakes_dropped_at_deadline(server_factory: Any, e2e: Any) -> None:
    srv = server_factory("[limits]\nhandshake_timeout = 1.0\n")
    host, port = srv.address.rsplit(":", 1)
    token = parse_token(srv.token)
    hello = ClientConnection(token)
    hello.initiate()
    first = hello.data_to_send()
    payloads = {
        "nothing": b"",
        "half a HELLO": first[:8],
        "HELLO and half a frame": first[: len(first) - 10],
    }
    conn = srv.connect()  # authenticated: the handshake deadline no longer applies
    socks: dict[str, socket.socket] = {}
    try:
        t0 = time.monotonic()
        for label, data in payloads.items():
            s = socket.create_connection((host, int(port)), timeout=5)
            if data:
                s.sendall(data)
            socks[label] = s
        closed = {}
        for label, s in socks.items():
            closed[label] = _wait_closed(s, 4.0 - (time.monotonic() - t0))
            if closed[label] is not None:
                closed[label] = time.monotonic() - t0
        for label, when in closed.items():
            assert when is not None, f"{label}: still open after 4s"
            assert 0.9 < when < 2.5, f"{label}: closed after {when:.2f}s"
        # past the deadline, the authenticated connection still works
        assert conn.run("echo alive").stdout == b"alive\n"
    finally:
        conn.close()
        for s in socks.values():
            s.close()
    hits = e2e.wait_until(lambda: srv.log_events("handshake deadline hit; dropping connection"), 3)
    assert len(hits) == 3


# ---- garbage peers beside real clients ----------------------------------------------

GARBAGE_CONFIG = """
[limits]
max_connections = 400
max_unauthenticated = 200
max_unauthenticated_per_source = 200  # all from 127.0.0.1: this test is not about rationing
unauthenticated_drop_start = 200
auth_failures = 100000
"""


def _garbage_kinds(srv: Any) -> list[tuple[str, Any]]:
    token = parse_token(srv.token)

    def random_bytes() -> bytes:
        return b"\x00" + os.urandom(int.from_bytes(os.urandom(2), "big") % 4096 + 16)

    def ssh_banner() -> bytes:
        return b"SSH-2.0-OpenSSH_9.2\r\n" + os.urandom(64)

    def oversized_length() -> bytes:
        return HELLO.pack(MAGIC, 1, 1, 0, token.key_id) + struct.pack(">I", 0xFFFFFFFF)

    def bad_version() -> bytes:
        return HELLO.pack(MAGIC, 99, 1, 0, token.key_id) + os.urandom(100)

    def hello_then_garbage() -> bytes:
        c = ClientConnection(token)
        c.initiate()
        return c.data_to_send() + os.urandom(500)

    def wrong_key_hello() -> bytes:
        c = ClientConnection(generate_token())
        c.initiate()
        return c.data_to_send()

    return [
        ("random", random_bytes),
        ("ssh", ssh_banner),
        ("oversized", oversized_length),
        ("version", bad_version),
        ("hello+garbage", hello_then_garbage),
        ("unknown key", wrong_key_hello),
    ]


def _authenticated(srv: Any) -> socket.socket:
    """A socket past the handshake and AUTH, made with the public protocol core."""
    host, port = srv.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    conn = ClientConnection(parse_token(srv.token))
    conn.initiate()
    sock.sendall(conn.data_to_send())
    while not conn.handshake_done:
        data = sock.recv(65536)
        assert data, "the server closed the connection in the handshake"
        conn.receive_data(data)
    sock.sendall(conn.data_to_send())  # AUTH
    return sock


def test_garbage_peers_never_disturb_50_clients(server_factory: Any) -> None:
    srv = server_factory(GARBAGE_CONFIG)
    host, port = srv.address.rsplit(":", 1)
    kinds = _garbage_kinds(srv)
    stop = threading.Event()
    stats: dict[str, list[float | None]] = {name: [] for name, _ in kinds}
    stats["post-auth garbage"] = []
    errors: list[str] = []

    def hammer(worker: int) -> None:
        i = worker
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            if i % 7 == 0:  # authenticate for real, then corrupt the encrypted stream
                try:
                    with _authenticated(srv) as sock:
                        sock.sendall(struct.pack(">I", 100) + os.urandom(100))
                        stats["post-auth garbage"].append(_wait_closed(sock, 5))
                except Exception as exc:
                    errors.append(f"post-auth: {exc!r}")
                continue
            name, make = kinds[i % len(kinds)]
            try:
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(make())
                    stats[name].append(_wait_closed(s, 5))
            except (ConnectionResetError, BrokenPipeError):
                stats[name].append(0.0)  # refused mid-send: closed, as it should be
            except OSError as exc:
                errors.append(f"{name}: {exc!r}")

    results: dict[int, Any] = {}
    barrier = threading.Barrier(50, timeout=30)

    def client(n: int) -> None:
        try:
            barrier.wait()
            conn = srv.connect()
            try:
                r1 = conn.run(["sh", "-c", f"printf 'client-%s\\n' {n}; head -c 100000 /dev/zero"])
                r2 = conn.run(f"echo second-{n} >&2; exit {n % 7}")
            finally:
                conn.close()
            results[n] = (r1.exit_code, r1.stdout, r2.exit_code, r2.stderr)
        except Exception as exc:
            results[n] = exc

    hammers = [threading.Thread(target=hammer, args=(w,), daemon=True) for w in range(4)]
    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(50)]
    for t in hammers:
        t.start()
    time.sleep(0.3)  # the hammer is already going when the clients arrive
    for t in clients:
        t.start()
    for t in clients:
        t.join(90)
    stop.set()
    for t in hammers:
        t.join(15)
    assert not any(t.is_alive() for t in clients + hammers), "threads hung"
    assert errors == []
    for n in range(50):
        expected = (0, f"client-{n}\n".encode() + b"\0" * 100000, n % 7, f"second-{n}\n".encode())
        assert results.get(n) == expected, f"client {n}: {results.get(n)!r:.200}"
    print({name: len(closes) for name, closes in stats.items()})
    for name, closes in stats.items():
        assert closes, f"garbage kind {name!r} never ran"
        assert all(c is not None for c in closes), f"{name}: a garbage peer was never closed"
    # the server is still healthy and logged no internal error
    conn = srv.connect()
    try:
        assert conn.run("echo still-here").stdout == b"still-here\n"
    finally:
        conn.close()
    levels = {r.get("level") for r in srv.log_records()}
    assert "error" not in levels and "critical" not in levels
    assert len(srv.wait_audit(101)) == 101


# ---- graceful shutdown --------------------------------------------------------------


def test_sigterm_with_20_commands_running(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    srv = server_factory("[limits]\nshutdown_grace = 1.0\nkill_grace = 1.0\n")
    go = tmp_path / "go"
    short = (
        f"i=0; while [ ! -e {go} ] && [ $i -lt 400 ]; do sleep 0.02; i=$((i+1)); done; echo done"
    )
    marker = f"sleep {e2e.marker('1000.999')}"
    long = f"echo started; {marker}"
    audit_before = len(srv.audit_lines())
    plan = ["short"] * 14 + ["long"] * 6
    results: dict[int, Any] = {}

    def worker(n: int, kind: str) -> None:
        try:
            conn = srv.connect()
            try:
                results[n] = conn.run(short if kind == "short" else long)
            finally:
                conn.close()
        except Exception as exc:
            results[n] = exc

    threads = []
    clis: dict[int, subprocess.Popen[bytes]] = {}
    env = e2e.clean_env({"REXEC_TOKEN": srv.token})
    for n, kind in enumerate(plan):
        if n in (0, 1, 14, 15):  # a few real CLI clients among the threads
            clis[n] = subprocess.Popen(
                [e2e.REXEC, "run", "-n", srv.address, short if kind == "short" else long],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        else:
            t = threading.Thread(target=worker, args=(n, kind), daemon=True)
            t.start()
            threads.append(t)
    try:
        started = e2e.wait_until(lambda: len(srv.log_events("command started")) >= 20, 30)
        assert started, f"only {len(srv.log_events('command started'))} commands started"
        assert len(e2e.cmdline_pids(marker)) >= 6
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        go.touch()  # the short ones finish now, within the grace period
        rc = srv.proc.wait(15)
        stop_time = time.monotonic() - t0
        for t in threads:
            t.join(10)
        cli_out = {n: (*p.communicate(timeout=10), p.returncode) for n, p in clis.items()}
    finally:
        for p in clis.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)
    assert rc == 0
    assert stop_time < 8, stop_time
    for n, kind in enumerate(plan):
        if n in clis:
            out, err, code = cli_out[n]
            if kind == "short":
                assert (code, out, err) == (0, b"done\n", b""), n
            else:
                assert code in (143, 137), (n, code, err)
                assert out == b"started\n"
            continue
        r = results.get(n)
        assert not isinstance(r, Exception) and r is not None, f"client {n}: {r!r}"
        if kind == "short":
            assert (r.exit_code, r.stdout) == (0, b"done\n"), n
        else:
            assert r.shell_status in (143, 137), (n, r)
            assert r.stdout == b"started\n"
    assert e2e.cmdline_pids(marker) == []
    lines = srv.audit_lines()[audit_before:]
    assert len(lines) == 20
    assert all(line.endswith(b"\n") for line in lines)
    records = [json.loads(line) for line in lines]
    assert sorted(r["exit_code"] for r in records if r["exit_code"] is not None) == [0] * 14
    killed = [r for r in records if r["exit_code"] is None]
    assert len(killed) == 6
    assert all(r["signal"] in (9, 15) and r["bytes_out"] == 8 for r in killed), killed
    assert srv.log_events("stopped")


# ---- memory under a slow reader -----------------------------------------------------


@pytest.mark.slow
def test_rss_bounded_while_streaming_1gib_to_a_slow_reader(server: Any) -> None:
    size = 1024 * MiB
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(server.rss_kib())
            done.wait(0.05)

    received = 0
    next_pause = 8 * MiB

    def sink(data: bytes) -> None:
        nonlocal received, next_pause
        received += len(data)
        if received >= next_pause:  # a slow reader: 8 MiB, then a nap
            next_pause += 8 * MiB
            time.sleep(0.03)

    baseline = server.rss_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conn = server.connect()
    try:
        t0 = time.monotonic()
        result = conn.run(f"head -c {size} /dev/zero", stdout=sink)
        elapsed = time.monotonic() - t0
    finally:
        done.set()
        sampler.join(5)
        conn.close()
    assert result.exit_code == 0
    assert received == size
    peak = max(samples)
    print(f"1 GiB in {elapsed:.1f}s; server RSS {baseline} KiB at start, peak {peak} KiB")
    assert len(samples) > 20
    assert peak < 100 * 1024, f"server RSS peaked at {peak} KiB"


# ---- IPv6 ---------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_listener(server_factory: Any, e2e: Any) -> None:
    srv = server_factory(listen=["[::1]:0"])
    assert re.fullmatch(r"\[::1\]:\d+", srv.address), srv.address
    proc = e2e.run_cli(["run", srv.address, "echo v6"], token=srv.token)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"v6\n", b"")
    records = srv.wait_audit(1)
    assert len(records) == 1 and records[0]["peer"].startswith("[::1]:")


# ---- audit log ----------------------------------------------------------------------

AUDIT_KEYS = {
    "ts",
    "conn",
    "peer",
    "key_id",
    "key_name",
    "channel",
    "cwd",
    "env",
    "start",
    "duration",
    "exit_code",
    "signal",
    "timed_out",
    "bytes_out",
    "bytes_err",
    "policy",  # the token policy's decision (docs/PROTOCOL.md 3.3)
}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_audit_records_fields_and_no_secrets(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    srv = server_factory('[server]\nlog_level = "debug"\n')
    token = parse_token(srv.token)
    secret_text = srv.token.rsplit(":", 1)[1]
    value = "env-value-never-logged"
    p1 = e2e.run_cli(
        [
            "run",
            "-e",
            f"REXEC_AUDIT={value}",
            "-C",
            str(tmp_path),
            srv.address,
            "printf abc; printf de >&2; exit 5",
        ],
        token=srv.token,
    )
    assert p1.returncode == 5
    p2 = e2e.run_cli(["run", srv.address, "sh", "-c", "kill -TERM $$"], token=srv.token)
    assert p2.returncode == 143
    p3 = e2e.run_cli(["run", "--timeout", "0.3", srv.address, "sleep 5"], token=srv.token)
    assert p3.returncode == 124
    p4 = e2e.run_cli(["run", srv.address, "no-such-cmd-audit"], token=srv.token)
    assert p4.returncode == 127
    # a wrong secret for the same key id: never logged either
    bad = srv.token[:-6] + ("AAAAAA" if not srv.token.endswith("AAAAAA") else "BBBBBB")
    assert e2e.run_cli(["run", srv.address, "true"], token=bad).returncode == 255
    records = srv.wait_audit(4)
    assert len(records) == 4
    for r in records:
        keys = set(r) - {"command", "argv"}
        assert keys == AUDIT_KEYS, keys
        assert ("command" in r) != ("argv" in r)
        assert ISO.fullmatch(r["ts"]) and ISO.fullmatch(r["start"])
        assert r["key_id"] == token.key_id.hex() and r["key_name"] == "t"
        assert r["peer"].startswith("127.0.0.1:") and r["channel"] == 1
        assert re.fullmatch(r"c\d+", r["conn"])
        assert isinstance(r["duration"], float | int) and r["duration"] >= 0
        assert r["policy"] == {"decision": "allowed", "rule": "none"}
    r1, r2, r3, r4 = records
    assert r1["command"] == "printf abc; printf de >&2; exit 5"
    assert (r1["cwd"], r1["env"]) == (str(tmp_path), ["REXEC_AUDIT"])
    assert (r1["exit_code"], r1["signal"], r1["timed_out"]) == (5, None, False)
    assert (r1["bytes_out"], r1["bytes_err"]) == (3, 2)
    assert r2["argv"] == ["sh", "-c", "kill -TERM $$"]
    assert (r2["exit_code"], r2["signal"], r2["timed_out"]) == (None, 15, False)
    assert r2["cwd"] is None and r2["env"] == []
    assert (r3["timed_out"], r3["signal"]) == (True, 15) and 0.25 < r3["duration"] < 3
    assert r4["command"] == "no-such-cmd-audit" and r4["exit_code"] == 127
    # no secret anywhere: not the token's secret (as text, hex or raw), not an env value
    srv.stop()
    audit = srv.audit_path.read_bytes()
    log = srv.log_path.read_bytes()
    assert b'"level": "debug"' in log or b'"level": "info"' in log
    for blob in (audit, log):
        for needle in (
            secret_text.encode(),
            token.secret.hex().encode(),
            token.secret,
            bad.rsplit(":", 1)[1].encode(),
            value.encode(),
        ):
            assert needle not in blob
    assert srv.log_events("authentication failed")


# ---- many channels on one connection ------------------------------------------------


def test_concurrent_channels_on_one_connection_demultiplex_exactly(
    server: Any, tmp_path: Path
) -> None:
    files = []
    for i in range(8):
        path = tmp_path / f"f{i}.bin"
        files.append((path, _random_file(path, 2 * MiB + i)))
    conn = server.connect()
    try:
        procs = []
        for i, (path, _) in enumerate(files):
            stream = "" if i % 2 else " >&2"  # odd ones to stdout, even ones to stderr
            procs.append(conn.start(f"cat {path}{stream}; exit {i}"))
        assert len({p.channel for p in procs}) == 8  # all eight run at once
        out: dict[int, list[bytes]] = {i: [] for i in range(8)}
        exits: dict[int, int | None] = {}
        for i, proc in enumerate(procs):  # waiting on one serves them all meanwhile
            for stream, chunk in proc:
                assert stream == (Stream.STDOUT if i % 2 else Stream.STDERR)
                out[i].append(chunk)
            exits[i] = proc.wait().exit_code
        assert conn.run("echo after").stdout == b"after\n"
    finally:
        conn.close()
    for i in range(8):
        data = b"".join(out[i])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (2 * MiB + i, files[i][1])
        assert exits[i] == i


@pytest.mark.slow
def test_rss_bounded_while_streaming_512mib_stdin_to_a_slow_reader(
    server: Any, e2e: Any, tmp_path: Path
) -> None:
    size = 512 * MiB
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(size)
    reader = (
        "import sys, time\n"
        "n = 0\n"
        "while chunk := sys.stdin.buffer.read(8 << 20):\n"
        "    n += len(chunk)\n"
        "    time.sleep(0.03)\n"
        "print(n)\n"
    )
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(server.rss_kib())
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conn = server.connect()
    try:
        with open(src, "rb") as f:
            result = conn.run([e2e.PYTHON, "-c", reader], stdin=f.fileno())
    finally:
        done.set()
        sampler.join(5)
        conn.close()
    assert (result.exit_code, result.stdout) == (0, f"{size}\n".encode()), result.stderr
    peak = max(samples)
    print(f"512 MiB stdin: server RSS peak {peak} KiB over {len(samples)} samples")
    assert len(samples) > 20
    assert peak < 100 * 1024, f"server RSS peaked at {peak} KiB"
