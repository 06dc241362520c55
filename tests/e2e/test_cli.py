"""`rexec run` against a real server: exit codes, signals, timeouts, argv, env, JSON, stdin,
authentication, bad targets, unix sockets, tracing, and a client killed mid-stream."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rexec.address import parse_address
from rexec.protocol.token import Token, generate_token, parse_token

# ---- exit codes ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 3, 42, 128, 254, 255])
def test_exit_code_is_the_remote_code(server: Any, e2e: Any, code: int) -> None:
    proc = e2e.run_cli(["run", server.address, f"echo out-{code}; exit {code}"], token=server.token)
    assert proc.returncode == code
    assert proc.stdout == f"out-{code}\n".encode()
    assert proc.stderr == b""


def test_command_not_found_is_127(server: Any, e2e: Any) -> None:
    # argv form: the server cannot exec it; the CLI says so in one line
    proc = e2e.run_cli(["run", server.address, "no-such-cmd-e2e", "x"], token=server.token)
    assert proc.returncode == 127
    assert proc.stdout == b""
    assert proc.stderr == b"rexec: command not found: no-such-cmd-e2e\n"
    # shell line: /bin/sh reports it and exits 127
    proc = e2e.run_cli(["run", server.address, "no-such-cmd-e2e"], token=server.token)
    assert proc.returncode == 127
    assert b"no-such-cmd-e2e: not found" in proc.stderr


def test_all_256_exit_codes_on_one_connection(server: Any) -> None:
    conn = server.connect()
    try:
        for code in range(256):
            result = conn.run(f"exit {code}")
            assert (result.exit_code, result.signal, result.timed_out) == (code, None, False)
            assert result.shell_status == code
            assert result.stdout == b"" and result.stderr == b""
        # the connection is still good after 256 channels
        assert conn.run(["echo", "after"]).stdout == b"after\n"
    finally:
        conn.close()


def test_exit_code_sample_in_json(server: Any, e2e: Any) -> None:
    for code in (0, 7, 200):
        proc = e2e.run_cli(["run", "--json", server.address, f"exit {code}"], token=server.token)
        assert proc.returncode == code
        doc = json.loads(proc.stdout)
        assert (doc["exit_code"], doc["signal"], doc["timed_out"]) == (code, None, False)


# ---- signals and timeouts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status"),
    [("TERM", 143), ("KILL", 137), ("SEGV", 139), ("USR1", 138)],
)
def test_killed_by_signal_is_128_plus_n(server: Any, e2e: Any, name: str, status: int) -> None:
    proc = e2e.run_cli(
        ["run", server.address, "sh", "-c", f"echo before; kill -{name} $$; echo after"],
        token=server.token,
    )
    assert proc.returncode == status
    assert proc.stdout == b"before\n"
    assert proc.stderr == b""


def test_signal_in_json(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", "--json", server.address, "sh", "-c", "kill -SEGV $$"], token=server.token
    )
    assert proc.returncode == 139
    doc = json.loads(proc.stdout)
    assert (doc["exit_code"], doc["signal"], doc["timed_out"]) == (None, 11, False)


def test_timeout_kills_the_whole_group(server: Any, e2e: Any) -> None:
    marker = e2e.marker("1000.4321")
    assert e2e.cmdline_pids(marker) == []
    t0 = time.monotonic()
    proc = e2e.run_cli(
        ["run", "--timeout", "1", server.address, f"sleep {marker} & sleep {marker}7; echo no"],
        token=server.token,
        timeout=20,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 124
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"rexec: command timed out after 1.0s")
    assert proc.stderr.count(b"\n") == 1
    assert 0.9 < elapsed < 5.0
    # the server reports EXIT only once the group is gone: nothing may be left now
    assert e2e.cmdline_pids(marker) == []


def test_timeout_in_json(server: Any, e2e: Any) -> None:
    marker = e2e.marker("1000.4323")
    proc = e2e.run_cli(
        ["run", "--json", "--timeout", "0.5", server.address, f"sleep {marker}"],
        token=server.token,
    )
    assert proc.returncode == 124
    doc = json.loads(proc.stdout)
    assert doc["timed_out"] is True
    assert doc["signal"] == signal.SIGTERM and doc["exit_code"] is None
    assert 0.4 < doc["duration"] < 4.0
    assert e2e.cmdline_pids(marker) == []


# ---- argv vs shell line -------------------------------------------------------------


def test_several_args_are_an_exact_argv(server: Any, e2e: Any) -> None:
    args = ["a b", "it's", '"dq"', "$HOME", "*", "", "semi;colon", "back\\slash", "tab\there"]
    proc = e2e.run_cli(["run", server.address, "printf", "%s|\n", *args], token=server.token)
    assert proc.returncode == 0
    assert proc.stdout == "".join(f"{a}|\n" for a in args).encode()


def test_one_arg_is_a_shell_line(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", server.address, "echo a   b | tr a z; x=5; echo $((x * 2)) >&2"],
        token=server.token,
    )
    assert proc.returncode == 0
    assert proc.stdout == b"z b\n"
    assert proc.stderr == b"10\n"


def test_double_dash_separates_the_command(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["run", server.address, "--", "ls", "-d", "/"], token=server.token)
    assert (proc.returncode, proc.stdout) == (0, b"/\n")


def test_utf8_and_odd_bytes_in_argv(server: Any, e2e: Any) -> None:
    word = "héllo wörld ✓"
    proc = e2e.run_cli(["run", server.address, "printf", "%s", word], token=server.token)
    assert (proc.returncode, proc.stdout) == (0, word.encode())


# ---- environment and cwd ------------------------------------------------------------


def test_env_allowed(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        [
            "run",
            "-e",
            "REXEC_ONE=a b=c",
            "-e",
            "REXEC_TWO=",
            server.address,
            'printf "%s|%s|%s" "$REXEC_ONE" "${REXEC_TWO-unset}" "${REXEC_THREE-unset}"',
        ],
        token=server.token,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"a b=c||unset"


def test_env_refused(server: Any, e2e: Any, tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    proc = e2e.run_cli(
        ["run", "-e", "LD_PRELOAD=/x.so", "-e", "REXEC_OK=1", server.address, f"touch {flag}"],
        token=server.token,
    )
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert proc.stderr == (
        b"rexec: server error (bad_request): environment variable(s) not allowed by the "
        b"server: LD_PRELOAD\n"
    )
    assert not flag.exists()
    # refused commands are audited too, with names only
    records = e2e.wait_until(
        lambda: [r for r in server.audit_records() if r.get("command") == f"touch {flag}"], 3
    )
    assert len(records) == 1
    assert records[0]["env"] == ["LD_PRELOAD", "REXEC_OK"]
    assert records[0]["error"].startswith("bad_request: environment variable(s) not allowed")
    assert "/x.so" not in json.dumps(records[0])


def test_env_usage_error(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["run", "-e", "NOEQUALS", server.address, "true"], token=server.token)
    assert proc.returncode == 2
    assert proc.stderr == b"rexec: -e expects K=V, got 'NOEQUALS'\n"


def test_cwd(server: Any, e2e: Any, tmp_path: Path) -> None:
    (tmp_path / "marker-file").write_text("x")
    proc = e2e.run_cli(["run", "-C", str(tmp_path), server.address, "pwd; ls"], token=server.token)
    assert proc.returncode == 0
    assert proc.stdout == f"{tmp_path}\nmarker-file\n".encode()
    missing = tmp_path / "missing"
    proc = e2e.run_cli(["run", "-C", str(missing), server.address, "pwd"], token=server.token)
    assert proc.returncode == 126
    assert proc.stdout == b""
    assert proc.stderr == f"rexec: no such directory: {missing}\n".encode()


def test_default_cwd_is_home(server: Any, e2e: Any) -> None:
    home = os.path.expanduser("~")
    proc = e2e.run_cli(["run", server.address, "pwd"], token=server.token)
    assert proc.returncode == 0
    assert proc.stdout == f"{home}\n".encode()
    # a relative -C is relative to home too, never to the server's own working directory
    for rel, expected in ((".", home), ("..", os.path.dirname(home))):
        proc = e2e.run_cli(["run", "-C", rel, server.address, "pwd -P"], token=server.token)
        assert (proc.returncode, proc.stdout) == (0, f"{os.path.realpath(expected)}\n".encode())


@pytest.mark.parametrize(
    ("closed", "script", "expect_out", "expect_err"),
    [
        ("<&-", "echo hi; cat", b"hi\n", b""),
        (">&-", "echo out; sleep 0.2; echo err >&2", None, b"err\n"),
        ("2>&-", "echo err >&2; sleep 0.2; echo out", b"out\n", None),
    ],
)
def test_closed_standard_fds(
    server: Any, e2e: Any, closed: str, script: str, expect_out: Any, expect_err: Any
) -> None:
    # a closed fd 0/1/2 must not become the socket (remote output written into the
    # connection, or stdin read from it)
    proc = subprocess.run(
        ["sh", "-c", f'exec "$0" "$@" {closed}', e2e.REXEC, "run", server.address, script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env({"REXEC_TOKEN": server.token}),
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    if expect_out is not None:
        assert proc.stdout == expect_out
    if expect_err is not None:
        assert proc.stderr == expect_err


# ---- --json -------------------------------------------------------------------------


def test_json_exact_fields(server: Any, e2e: Any) -> None:
    line = "printf out; printf 'err\\n' >&2; exit 3"
    proc = e2e.run_cli(["run", "--json", server.address, line], token=server.token)
    assert proc.returncode == 3
    assert proc.stderr == b""
    assert proc.stdout.endswith(b"\n") and proc.stdout.count(b"\n") == 1
    doc = json.loads(proc.stdout)
    duration = doc.pop("duration")
    assert isinstance(duration, float) and 0 < duration < 5
    assert doc == {
        "target": server.address,
        "command": line,
        "exit_code": 3,
        "signal": None,
        "timed_out": False,
        "stdout": "out",
        "stdout_encoding": "utf-8",
        "stderr": "err\n",
        "stderr_encoding": "utf-8",
        "exit_status": 3,
        "error": None,
    }
    proc = e2e.run_cli(["run", "--json", server.address, "echo", "a b"], token=server.token)
    assert json.loads(proc.stdout)["command"] == ["echo", "a b"]


def test_json_max_output_keeps_the_head_and_counts_the_rest(server: Any, e2e: Any) -> None:
    line = "yes | head -c 5000; yes e | head -c 3000 >&2; exit 4"
    argv = ["run", "--json", "--max-output", "1000", server.address, line]
    proc = e2e.run_cli(argv, token=server.token)
    assert proc.returncode == 4  # the command's status: dropping is no failure
    assert proc.stderr == b""
    doc = json.loads(proc.stdout)
    assert (doc["stdout"], doc["stderr"]) == ("y\n" * 500, "e\n" * 500)
    assert list(doc)[-4:] == ["exit_status", "error", "stdout_dropped", "stderr_dropped"]
    assert (doc["stdout_dropped"], doc["stderr_dropped"]) == (4000, 2000)
    # under the cap: the object has no *_dropped members; 0 is no limit
    for argv in (["--max-output", "5000"], ["--max-output", "0"], []):
        proc = e2e.run_cli(["run", "--json", *argv, server.address, line], token=server.token)
        doc = json.loads(proc.stdout)
        assert (len(doc["stdout"]), len(doc["stderr"])) == (5000, 3000)
        assert "stdout_dropped" not in doc and "stderr_dropped" not in doc


def test_json_max_output_far_past_the_cap_does_not_stall(server: Any, e2e: Any) -> None:
    line = "head -c 20000000 /dev/zero"
    argv = ["run", "--json", "--max-output", "1000", server.address, line]
    proc = e2e.run_cli(argv, token=server.token)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["stdout"], doc["stdout_dropped"]) == ("\0" * 1000, 19999000)


def test_json_binary_output_is_base64(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", "--json", server.address, "printf", "\\377\\376\\000abc"], token=server.token
    )
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["stdout_encoding"] == "base64"
    assert base64.b64decode(doc["stdout"]) == b"\xff\xfe\x00abc"
    assert (doc["stderr"], doc["stderr_encoding"]) == ("", "utf-8")


def test_binary_output_streams_raw(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", server.address, "printf", "\\377\\376\\000\\r\\n"], token=server.token
    )
    assert (proc.returncode, proc.stdout) == (0, b"\xff\xfe\x00\r\n")


# ---- stdin --------------------------------------------------------------------------


def test_stdin_forwarded_exactly(server: Any, e2e: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7) + b"\r\n\x00\x04"
    proc = e2e.run_cli(["run", server.address, "cat"], token=server.token, input=data)
    assert proc.returncode == 0
    assert len(proc.stdout) == len(data)
    assert proc.stdout == data


def test_stdin_from_file_and_devnull(server: Any, e2e: Any, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"line1\nline2\n")
    with open(src, "rb") as f:
        proc = e2e.run_cli(["run", server.address, "wc -l"], token=server.token, stdin=f)
    assert (proc.returncode, proc.stdout.strip()) == (0, b"2")
    proc = e2e.run_cli(["run", server.address, "cat"], token=server.token)  # /dev/null
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_no_stdin_gives_immediate_eof(server: Any, e2e: Any) -> None:
    env = e2e.clean_env({"REXEC_TOKEN": server.token})
    # our stdin is a pipe that never closes: with -n, cat must still return at once
    with subprocess.Popen(
        [e2e.REXEC, "run", "-n", server.address, "cat; echo rc=$?"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as p:
        try:
            assert p.stdin is not None
            p.stdin.write(b"must not arrive\n")
            p.stdin.flush()
            t0 = time.monotonic()
            out = _read_all(p)
            elapsed = time.monotonic() - t0
            rc = p.wait(5)  # exits on its own, stdin still open
        finally:
            p.kill()
    assert rc == 0
    assert out == b"rc=0\n"
    assert elapsed < 3


def _read_all(p: subprocess.Popen[bytes]) -> bytes:
    """Read the client's stdout to EOF without closing its stdin (bounded by a deadline)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    chunks = []
    deadline = time.monotonic() + 10
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"no EOF on the client's stdout within 10s: {b''.join(chunks)!r}")


def test_open_stdin_is_forwarded_live(server: Any, e2e: Any) -> None:
    # the contrast to -n: without it, cat waits for our stdin, so the deadline fires
    env = e2e.clean_env({"REXEC_TOKEN": server.token})
    with subprocess.Popen(
        [e2e.REXEC, "run", "--timeout", "1", server.address, "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as p:
        try:
            assert p.stdin is not None
            p.stdin.write(b"live\n")
            p.stdin.flush()
            out = _read_all(p)
            rc = p.wait(5)
        finally:
            p.kill()
    assert rc == 124
    assert out == b"live\n"


# ---- authentication -----------------------------------------------------------------


def _auth_cases(token: str) -> list[tuple[str, str]]:
    good = parse_token(token)
    wrong_secret = Token(good.key_id, bytes(b ^ 0x5A for b in good.secret)).format()
    return [("wrong secret", wrong_secret), ("unknown key id", generate_token().format())]


def test_wrong_token_fails_and_runs_nothing(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    srv = server_factory()
    ok = e2e.run_cli(["run", srv.address, "true"], token=srv.token)
    assert ok.returncode == 0
    assert len(srv.wait_audit(1)) == 1
    audit_before = srv.audit_path.read_bytes()
    for label, bad in _auth_cases(srv.token):
        flag = tmp_path / f"ran-{label.replace(' ', '-')}"
        proc = e2e.run_cli(["run", srv.address, f"touch {flag}"], token=bad)
        assert proc.returncode == 255, label
        assert proc.stdout == b""
        assert proc.stderr.startswith(b"rexec: authentication failed"), proc.stderr
        assert proc.stderr.count(b"\n") == 1
        assert not flag.exists(), label
    assert srv.audit_path.read_bytes() == audit_before
    failures = e2e.wait_until(lambda: srv.log_events("authentication failed"), 3)
    assert len(failures) == 2
    # the right token still works afterwards (2 failures < the default limit)
    ok = e2e.run_cli(["run", srv.address, "echo fine"], token=srv.token)
    assert (ok.returncode, ok.stdout) == (0, b"fine\n")


def test_token_file(server: Any, e2e: Any, tmp_path: Path) -> None:
    path = tmp_path / "tok"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (server.token + "\n").encode())
    os.close(fd)
    proc = e2e.run_cli(["run", "--token-file", str(path), server.address, "echo via-file"])
    assert (proc.returncode, proc.stdout) == (0, b"via-file\n")
    os.chmod(path, 0o644)
    proc = e2e.run_cli(["run", "--token-file", str(path), server.address, "echo no"])
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert f"token file {path} has mode 0644".encode() in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_no_token(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["run", server.address, "true"])
    assert proc.returncode == 255
    assert proc.stderr.startswith(b"rexec: no token for ")
    assert proc.stderr.count(b"\n") == 1


# ---- targets ------------------------------------------------------------------------


def _one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 255, (proc.returncode, proc.stderr)
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"rexec: ") and proc.stderr.endswith(b"\n")
    assert proc.stderr.count(b"\n") == 1, proc.stderr
    return proc.stderr.decode()


def test_bad_target(server: Any, e2e: Any) -> None:
    for target in ("bad host", "::1", "127.0.0.1:99999", "[::1"):
        msg = _one_line_error(e2e.run_cli(["run", target, "true"], token=server.token))
        assert msg.startswith(f"rexec: invalid address {target!r}"), msg
    proc = e2e.run_cli(["run", "bad host!", "true"], token=server.token)  # `!`: a host set
    assert (proc.returncode, proc.stderr) == (
        2,
        b"rexec: invalid host set 'bad host!': an empty name or a stray operator\n",
    )


def test_connection_refused(server: Any, e2e: Any) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    msg = _one_line_error(e2e.run_cli(["run", f"127.0.0.1:{port}", "true"], token=server.token))
    assert msg == f"rexec: cannot connect to 127.0.0.1:{port}: Connection refused\n"


def test_connect_timeout(server: Any, e2e: Any) -> None:
    # a listener that never accepts nor answers: the TCP connect succeeds, the handshake stalls
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        proc = e2e.run_cli(
            ["run", "--connect-timeout", "0.5", f"127.0.0.1:{port}", "true"],
            token=server.token,
            timeout=10,
        )
        elapsed = time.monotonic() - t0
    msg = _one_line_error(proc)
    assert msg == (
        f"rexec: handshake with 127.0.0.1:{port} timed out after 0.5s: "
        "the server sent nothing back (it may not be a rexec server)\n"
    )
    assert elapsed < 3


def test_unix_socket(server: Any, e2e: Any, tmp_path: Path) -> None:
    assert server.unix_path is not None
    assert f"unix:{server.unix_path}" in server.addresses
    assert (server.unix_path.stat().st_mode & 0o777) == 0o600
    proc = e2e.run_cli(
        ["run", f"unix:{server.unix_path}", "echo via-unix; exit 4"], token=server.token
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, b"via-unix\n", b"")
    missing = tmp_path / "nope.sock"
    msg = _one_line_error(e2e.run_cli(["run", f"unix:{missing}", "true"], token=server.token))
    assert msg == f"rexec: cannot connect to unix:{missing}: No such file or directory\n"


# ---- --trace ------------------------------------------------------------------------


def test_trace_prints_frames(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["run", "--trace", "-n", server.address, "echo hi"], token=server.token)
    assert proc.returncode == 0
    assert proc.stdout == b"hi\n"
    lines = proc.stderr.decode().splitlines()
    pattern = re.compile(r"rexec: [<>] [A-Z_]+ ch=\d+ len=\d+")
    assert lines and all(pattern.fullmatch(line) for line in lines), lines
    assert lines[0] == "rexec: > AUTH ch=0 len=32"
    assert lines[1].startswith("rexec: > EXEC ch=1 len=")
    assert "rexec: < STDOUT ch=1 len=3" in lines
    assert "rexec: < EXIT ch=1 len=16" in lines
    assert lines.index("rexec: < STDOUT ch=1 len=3") < lines.index("rexec: < EXIT ch=1 len=16")
    assert lines[-2:] == ["rexec: > CLOSE ch=0 len=0", "rexec: < CLOSE ch=0 len=0"]


def test_no_trace_by_default(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(["run", server.address, "echo hi"], token=server.token)
    assert (proc.stdout, proc.stderr) == (b"hi\n", b"")


# ---- the local reader goes away ------------------------------------------------------


def test_stdout_reader_gone_ends_the_command(server: Any, e2e: Any) -> None:
    # `rexec run HOST yes | head -1` must end, as `yes | head -1` does (SIGPIPE: 141),
    # and the remote command must not run on forever
    marker = e2e.marker("e2e-epipe-marker")
    env = e2e.clean_env({"REXEC_TOKEN": server.token})
    client = subprocess.Popen(
        [e2e.REXEC, "run", server.address, "yes", marker],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert client.stdout is not None and client.stderr is not None
        assert client.stdout.readline() == f"{marker}\n".encode()
        client.stdout.close()  # the reader is gone
        rc = client.wait(10)
        err = client.stderr.read()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    assert rc == 128 + signal.SIGPIPE
    assert err == b""
    assert e2e.wait_until(lambda: not e2e.cmdline_pids(marker), 3), "remote yes still runs"


# ---- Ctrl-C, stdin left open, a server that dies --------------------------------------


def _start_client(e2e: Any, server: Any, *args: str, stdin: Any = subprocess.DEVNULL) -> Any:
    return subprocess.Popen(
        [e2e.REXEC, "run", server.address, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env({"REXEC_TOKEN": server.token}),
    )


def _finish(client: Any, timeout: float = 10) -> tuple[int, bytes, bytes]:
    try:
        out, err = client.communicate(timeout=timeout)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    return client.returncode, out, err


@pytest.mark.parametrize(
    ("prefix", "interrupts", "status"),
    [("", 1, 130), ("trap '' INT; echo ready; ", 2, 137)],
)
def test_ctrl_c_forwards_sigint_then_sigkill(
    server: Any, e2e: Any, prefix: str, interrupts: int, status: int
) -> None:
    marker = f"sleep {e2e.marker('1000.555')}"
    client = _start_client(e2e, server, f"{prefix}{marker}; echo not-reached")
    try:
        assert e2e.wait_until(lambda: set(e2e.cmdline_pids(marker)) - {client.pid}, 10)
        for _ in range(interrupts):
            time.sleep(0.3)
            client.send_signal(signal.SIGINT)
        rc, out, err = _finish(client)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    assert rc == status, err
    assert b"not-reached" not in out
    assert err == b""
    assert e2e.cmdline_pids(marker) == []


def test_ctrl_c_reaches_a_command_whose_stdin_is_stalled(
    server: Any, e2e: Any, tmp_path: Path
) -> None:
    # the command never reads its stdin: its channel's window fills, yet the server keeps
    # reading the connection, so the first Ctrl-C's SIGNAL gets through at once
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    marker = f"sleep {e2e.marker('1000.559')}"
    with open(big, "rb") as stdin:
        client = _start_client(e2e, server, marker, stdin=stdin)
    try:
        assert e2e.wait_until(lambda: set(e2e.cmdline_pids(marker)) - {client.pid}, 10)
        time.sleep(0.5)  # let stdin fill every buffer on the way
        client.send_signal(signal.SIGINT)
        rc, out, err = _finish(client, timeout=5)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    assert (rc, out, err) == (130, b"", b"")  # 128 + SIGINT: the remote command's own death
    assert e2e.wait_until(lambda: not e2e.cmdline_pids(marker), 4), "remote command survived"


def test_command_exit_ends_the_client_while_stdin_stays_open(server: Any, e2e: Any) -> None:
    client = _start_client(e2e, server, "echo hi; exit 3", stdin=subprocess.PIPE)
    try:
        assert client.stdout is not None
        t0 = time.monotonic()
        out = _read_all(client)
        rc = client.wait(5)
        elapsed = time.monotonic() - t0
    finally:
        client.kill()
        client.wait(5)
    assert (rc, out) == (3, b"hi\n")
    assert elapsed < 3


def test_server_killed_mid_command(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    marker = f"sleep {e2e.marker('1000.888')}"
    client = _start_client(e2e, srv, f"echo begun; {marker}")
    try:
        remote = e2e.wait_until(
            lambda: [p for p in e2e.cmdline_pids(marker) if p != client.pid], 10
        )
        assert remote
        # `begun` has reached the client (read here, handed back below): only then may the
        # server die, or the test would race the server's pipe read against the kill
        assert select.select([client.stdout], [], [], 10)[0], "no output within 10 s"
        assert client.stdout.read(6) == b"begun\n"
        srv.proc.kill()  # no goodbye: the connection just drops
        srv.proc.wait(5)
        t0 = time.monotonic()
        rc, out, err = _finish(client)
        elapsed = time.monotonic() - t0
    finally:
        for pid in e2e.cmdline_pids(marker):  # orphans of the killed server: ours to clean
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert rc == 255
    assert out == b""  # nothing after `begun`
    assert err.startswith(b"rexec: ") and err.count(b"\n") == 1, err
    assert elapsed < 5


@pytest.mark.slow
def test_quiet_commands_outlive_the_client_keepalive(server: Any, e2e: Any, tmp_path: Path) -> None:
    # silence > KEEPALIVE_DEAD (30 s): the client PINGs and the server answers, also while
    # a command leaves its stdin unread (its window is full; the socket is still read)
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    with open(big, "rb") as stdin:
        held = _start_client(e2e, server, "sleep 34; wc -c", stdin=stdin)
    quiet = _start_client(e2e, server, "sleep 34; echo done")
    assert _finish(quiet, timeout=60) == (0, b"done\n", b"")
    assert _finish(held, timeout=30) == (0, b"16777216\n", b"")


# ---- cipher suites ------------------------------------------------------------------


def test_both_suites(server: Any, e2e: Any) -> None:
    for suite in ("aesgcm", "chachapoly"):
        proc = e2e.run_cli(
            ["run", "--suite", suite, server.address, f"echo {suite}"], token=server.token
        )
        assert (proc.returncode, proc.stdout) == (0, f"{suite}\n".encode())


def test_suite_refused_by_server(server_factory: Any, e2e: Any) -> None:
    srv = server_factory('[server]\nsuites = ["AESGCM"]\n')
    proc = e2e.run_cli(["run", "--suite", "chachapoly", srv.address, "true"], token=srv.token)
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"rexec: ") and proc.stderr.count(b"\n") == 1
    ok = e2e.run_cli(["run", "--suite", "aesgcm", srv.address, "echo ok"], token=srv.token)
    assert (ok.returncode, ok.stdout) == (0, b"ok\n")


# ---- a client killed mid-stream -----------------------------------------------------


def test_client_sigkill_mid_stream_cleans_up(server: Any, e2e: Any) -> None:
    marker = f"sleep {e2e.marker('1000.777')}"
    # warm up and let earlier connections finish, then take the fd baseline
    assert e2e.run_cli(["run", server.address, "true"], token=server.token).returncode == 0
    time.sleep(0.2)
    baseline = server.fd_count()
    env = e2e.clean_env({"REXEC_TOKEN": server.token})
    client = subprocess.Popen(
        [e2e.REXEC, "run", server.address, f"yes | head -c 10G; {marker}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # never read: the client blocks, the server backs off
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:

        def remote_group() -> int | None:
            pids = [p for p in e2e.cmdline_pids(marker) if p != client.pid]
            if len(pids) == 1 and len(e2e.group_members(pids[0])) >= 3:  # sh, yes, head
                return int(pids[0])
            return None

        pgid = e2e.wait_until(remote_group, 10)
        assert pgid, "the remote command did not start"
        assert os.getpgid(pgid) == pgid  # its own group, led by the shell
        time.sleep(0.3)  # let the stream fill every buffer on the way
        assert server.fd_count() > baseline
        client.kill()
        client.wait(5)
        t0 = time.monotonic()
        gone = e2e.wait_until(lambda: not e2e.group_members(pgid), 2.0)
        assert gone, f"remote group {pgid} still alive 2s after the client died"
        assert time.monotonic() - t0 < 2.0
        assert e2e.cmdline_pids(marker) == []
        back = e2e.wait_until(lambda: server.fd_count() == baseline, 3.0)
        assert back, f"server fds: {server.fd_count()} != baseline {baseline}"
        assert server.alive()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
        assert client.stdout is not None
        client.stdout.close()
    records = e2e.wait_until(
        lambda: [r for r in server.audit_records() if r.get("command", "").endswith(marker)], 3
    )
    assert len(records) == 1
    assert records[0]["signal"] in (signal.SIGTERM, signal.SIGPIPE, signal.SIGKILL)
    assert records[0]["bytes_out"] > 0


def test_server_address_parses(server: Any) -> None:
    # the ready file's address is what clients use; it must parse back to the same endpoint
    ep = parse_address(server.address)
    assert str(ep) == server.address and ep.port


def test_json_to_a_closed_pipe_ends_quietly(server: Any, e2e: Any) -> None:
    """`rexec run --json ... | true`: the reader is gone; exit 141, no traceback."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = e2e.run_cli(
            ["run", "--json", server.address, "echo hi"], token=server.token, stdout=w
        )
    finally:
        os.close(w)
    assert proc.returncode == 141
    assert b"Traceback" not in proc.stderr
