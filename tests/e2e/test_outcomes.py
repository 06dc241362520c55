"""How `rexec run` ends, as CI sees it: `--json` on every outcome (one object, its error kind,
its exit status), usage errors exit 2, `rexec WORD` for an unknown word, `--retry` (a late
server is waited for, a started command never runs twice), `--junit` for one host.

Many hosts: tests/e2e/test_fleet.py (the same kinds in JSON Lines, `--junit` per host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import rexec
from rexec.protocol.token import Token, generate_token, parse_token

KEYS = [
    "target",
    "command",
    "exit_code",
    "signal",
    "timed_out",
    "duration",
    "stdout",
    "stdout_encoding",
    "stderr",
    "stderr_encoding",
    "exit_status",
    "error",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_error(proc: subprocess.CompletedProcess[bytes], kind: str, status: int) -> dict[str, Any]:
    """The one JSON object of a run that failed: its kind and exit status as documented, and
    the same message as the one line on stderr."""
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert proc.stdout.endswith(b"\n") and proc.stdout.count(b"\n") == 1, proc.stdout
    doc = json.loads(proc.stdout)
    assert list(doc) == KEYS
    assert doc["exit_status"] == status
    assert doc["error"]["kind"] == kind, doc
    assert proc.stderr.decode().splitlines()[-1] in (
        f"rexec: {doc['error']['message']}",
        f"rexec run: error: {doc['error']['message']}",
    )
    return dict(doc)


def wrong_token(good: str) -> str:
    token = parse_token(good)
    return Token(token.key_id, bytes(b ^ 0x5A for b in token.secret)).format()


# ---- --json: one object per outcome, for each kind of error ----------------------------------


def test_json_connect(server: Any, e2e: Any) -> None:
    port = free_port()
    proc = e2e.run_cli(["run", "--json", f"127.0.0.1:{port}", "true"], token=server.token)
    doc = json_error(proc, "connect", 255)
    assert doc["error"]["message"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert (doc["target"], doc["command"], doc["exit_code"]) == (f"127.0.0.1:{port}", "true", None)


def test_json_connect_timeout(server: Any, e2e: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        proc = e2e.run_cli(
            ["run", "--json", "--connect-timeout", "0.5", f"127.0.0.1:{port}", "true"],
            token=server.token,
        )
    doc = json_error(proc, "timeout", 255)
    assert doc["error"]["message"].startswith(
        f"handshake with 127.0.0.1:{port} timed out after 0.5s"
    )


def test_json_auth(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    proc = e2e.run_cli(["run", "--json", srv.address, "true"], token=wrong_token(srv.token))
    doc = json_error(proc, "auth", 255)
    assert doc["error"]["message"].startswith("authentication failed")


def test_json_refused(server_factory: Any, e2e: Any) -> None:
    """A busy server (max_connections reached) refuses, and says so."""
    srv = server_factory("[limits]\nmax_connections = 1\nmax_unauthenticated = 1\n")
    with srv.connect():
        proc = e2e.run_cli(
            ["run", "--json", "--connect-timeout", "3", srv.address, "true"], token=srv.token
        )
    json_error(proc, "refused", 255)


def test_json_policy(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    made = e2e.run_cli(["token", "new", "--id", "ro", "--allow", "true", "--store", str(srv.store)])
    assert made.returncode == 0, made.stderr
    token = made.stdout.decode().strip()
    proc = e2e.run_cli(["run", "--json", srv.address, "echo hi; true"], token=token)
    doc = json_error(proc, "policy", 255)
    assert doc["error"]["message"].startswith("server error (policy): allow: shell command lines")


def test_json_usage(e2e: Any) -> None:
    proc = e2e.run_cli(["run", "--json", "--timeout", "-1", "127.0.0.1:9", "true"])
    doc = json_error(proc, "usage", 2)
    assert doc["error"]["message"] == "--timeout must be a positive number of seconds, got -1"
    assert (doc["target"], doc["command"]) == ("127.0.0.1:9", "true")


def test_json_protocol(server: Any, e2e: Any) -> None:
    """Not a rexec server: an SSH-like banner and garbage instead of a handshake."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(range(256)) * 4)
                    time.sleep(1)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        proc = e2e.run_cli(
            ["run", "--json", "--connect-timeout", "5", f"127.0.0.1:{port}", "true"],
            token=server.token,
        )
        thread.join(5)
    json_error(proc, "protocol", 255)


def test_json_exec(server: Any, e2e: Any) -> None:
    """An argv whose program does not exist (a shell line would run: sh says 127 itself)."""
    proc = e2e.run_cli(
        ["run", "--json", server.address, "no-such-cmd-e2e", "x"], token=server.token
    )
    doc = json_error(proc, "exec", 127)
    assert doc["error"]["message"] == "command not found: no-such-cmd-e2e"
    assert (doc["exit_code"], doc["command"]) == (127, ["no-such-cmd-e2e", "x"])
    proc = e2e.run_cli(["run", "--json", server.address, "no-such-cmd-e2e"], token=server.token)
    assert proc.returncode == 127 and json.loads(proc.stdout)["error"] is None


def test_json_config(e2e: Any) -> None:
    proc = e2e.run_cli(["run", "--json", "127.0.0.1:9", "true"])  # no token anywhere
    doc = json_error(proc, "config", 255)
    assert doc["error"]["message"].startswith("no token for '127.0.0.1:9'")


def test_json_server_error(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", "--json", "-e", "LD_PRELOAD=/x.so", server.address, "true"], token=server.token
    )
    doc = json_error(proc, "server", 255)
    assert doc["error"]["message"].startswith("server error (bad_request): environment")


def test_json_command_timeout_and_success(server: Any, e2e: Any) -> None:
    proc = e2e.run_cli(
        ["run", "--json", "--timeout", "0.3", server.address, "echo x; sleep 5"],
        token=server.token,
    )
    assert proc.returncode == 124 and proc.stderr == b""
    doc = json.loads(proc.stdout)
    assert (doc["exit_status"], doc["timed_out"], doc["stdout"]) == (124, True, "x\n")
    assert doc["error"] == {
        "kind": "timeout",
        "message": "command timed out after 0.3s (killed by the server)",
    }
    proc = e2e.run_cli(["run", "--json", server.address, "exit 0"], token=server.token)
    assert proc.returncode == 0
    assert (json.loads(proc.stdout)["exit_status"], json.loads(proc.stdout)["error"]) == (0, None)


# ---- usage errors exit 2, for one host and for many -----------------------------------------

USAGE = [
    (["--timeout", "0"], "rexec: --timeout must be a positive number of seconds, got 0"),
    (["--timeout", "-1"], "rexec: --timeout must be a positive number of seconds, got -1"),
    (["--timeout", "abc"], "rexec run: error: argument --timeout: invalid float value: 'abc'"),
    (["--timeout", "nan"], "rexec: --timeout must be a positive number of seconds, got nan"),
    (["--connect-timeout", "0"], "rexec: --connect-timeout must be a positive number of "),
    (["-e", "X"], "rexec: -e expects K=V, got 'X'"),
    (["-e", "=v"], "rexec: -e expects K=V, got '=v'"),
    (["--fanout", "0"], "rexec: --fanout must be at least 1, got 0"),
    (["--fanout", "x"], "rexec run: error: argument --fanout: invalid int value: 'x'"),
    (["--bogus"], "rexec run: error: unrecognized arguments: --bogus"),
    (["-y"], "rexec run: error: unrecognized arguments: -y"),
    (["--retry", "-1"], "rexec: --retry must be a whole number >= 0, got -1"),
    (["--retry", "1.5"], "rexec run: error: argument --retry: invalid int value: '1.5'"),
    (["--retry-delay", "0"], "rexec: --retry-delay must be a positive number of seconds, got 0"),
    (["--junit", "/nonexistent-e2e/r.xml"], "rexec: --junit /nonexistent-e2e/r.xml: no directory"),
]


@pytest.mark.parametrize("target", ["127.0.0.1:9", "127.0.0.[1-2]:9"], ids=["one", "many"])
@pytest.mark.parametrize(("options", "line"), USAGE, ids=[" ".join(o) for o, _ in USAGE])
def test_usage_errors_exit_2(e2e: Any, target: str, options: list[str], line: str) -> None:
    """Nothing is contacted (port 9 would refuse: 255), one line, and with --json an object."""
    token = generate_token().format()
    proc = e2e.run_cli(["run", *options, target, "true"], token=token)
    assert (proc.returncode, proc.stdout) == (2, b""), proc.stderr
    assert proc.stderr.startswith(line.encode()) and proc.stderr.count(b"\n") == 1, proc.stderr
    proc = e2e.run_cli(["run", "--json", *options, target, "true"], token=token)
    doc = json_error(proc, "usage", 2)
    assert doc["target"] == target


def test_usage_errors_when_no_command_or_both_host_forms(e2e: Any, tmp_path: Path) -> None:
    proc = e2e.run_cli(["run", "--json", "127.0.0.1:9"], token=generate_token().format())
    assert json_error(proc, "usage", 2)["error"]["message"].startswith("no command given")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:9\n")
    proc = e2e.run_cli(["run", "h", "--hosts-from", str(hosts), "true"])
    assert (proc.returncode, proc.stderr) == (
        2,
        b"rexec: give HOSTS or --hosts-from FILE, not both\n",
    )


# ---- `rexec WORD`: not a subcommand, an alias or a host --------------------------------------


# The real CLI, with the resolver answering "no such name" for frob and rnu from a
# sitecustomize on PYTHONPATH: no DNS query leaves the machine (tests stay on loopback).
_NO_SUCH_NAMES = """
import socket
_real = socket.getaddrinfo
def _getaddrinfo(host, *args, **kwargs):
    if host in (b"frob", b"rnu", "frob", "rnu"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _getaddrinfo
"""


def test_unknown_command_or_host(e2e: Any, tmp_path: Path) -> None:
    """`frob` and `rnu` do not resolve: a usage error naming the word (exit 2)."""
    (tmp_path / "sitecustomize.py").write_text(_NO_SUCH_NAMES)
    env = {"PYTHONPATH": str(tmp_path)}
    proc = e2e.run_cli(["frob"], env=env)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"rexec: unknown command or host 'frob'\n"
    proc = e2e.run_cli(["rnu", "id"], env=env)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"rexec: unknown command or host 'rnu' (did you mean `rexec run`?)\n"
    proc = e2e.run_cli(["rnu", "--json", "id"], env=env)
    doc = json_error(proc, "usage", 2)
    assert doc["error"]["message"] == "unknown command or host 'rnu' (did you mean `rexec run`?)"


def test_an_alias_or_an_address_is_a_host(server: Any, e2e: Any, tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'[hosts.rnu]\naddress = "{server.address}"\n')
    env = {"REXEC_CONFIG": str(config)}
    proc = e2e.run_cli(["rnu", "echo", "via-alias"], token=server.token, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"via-alias\n", b"")
    proc = e2e.run_cli([server.address, "echo", "via-address"], token=server.token)
    assert (proc.returncode, proc.stdout) == (0, b"via-address\n")
    proc = e2e.run_cli(["localhost:9", "true"], token=server.token)  # resolves: a host
    assert proc.returncode == 255 and b"cannot connect to localhost:9" in proc.stderr


# ---- --retry ----------------------------------------------------------------------------------


@contextlib.contextmanager
def late_server(e2e: Any, base: Path, delay: float = 1.0) -> Iterator[tuple[str, str]]:
    """(address, token) of a server that starts listening `delay` seconds from now."""
    port = free_port()
    base.mkdir(parents=True)
    token = e2e.new_token(base / "tokens.json", "early")  # start_server adds its own to it
    started: list[Any] = []
    errors: list[BaseException] = []

    def start() -> None:
        time.sleep(delay)
        try:
            started.append(e2e.start_server(base, listen=[f"127.0.0.1:{port}"]))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        thread.join(30)
        for srv in started:
            srv.stop()
    assert not errors, errors


def test_retry_waits_for_a_server_that_starts_late(e2e: Any, tmp_path: Path) -> None:
    with late_server(e2e, tmp_path / "late") as (address, token):
        proc = e2e.run_cli(["run", "--retry", "3", address, "echo up"], token=token)
    assert (proc.returncode, proc.stdout) == (0, b"up\n"), proc.stderr
    notices = proc.stderr.decode().splitlines()
    assert notices and all(
        line.startswith(f"rexec: cannot connect to {address}: Connection refused; retry ")
        for line in notices
    ), notices
    assert notices[0].endswith("retry 1/3 in " + notices[0].rsplit(" in ", 1)[1])


@pytest.mark.parametrize("api", ["sync", "async", "many"])
def test_the_api_retries_the_same_way(e2e: Any, tmp_path: Path, api: str) -> None:
    heard: list[int] = []
    with late_server(e2e, tmp_path / api) as (address, token):
        options: dict[str, Any] = {"token": token, "retry": 6, "retry_delay": 0.3}
        if api == "sync":
            options["on_retry"] = lambda exc, n, wait: heard.append(n)
            with rexec.Client(address, **options) as client:
                result = client.run("echo up")
        elif api == "async":
            options["on_retry"] = lambda exc, n, wait: heard.append(n)

            async def main() -> rexec.Result:
                async with rexec.connect(address, **options) as conn:
                    return await conn.run("echo up")

            result = asyncio.run(main())
        else:
            options["on_retry"] = lambda host, exc, n, wait: heard.append(n)
            [host_result] = rexec.run_many_sync([address], "echo up", **options)
            assert host_result.status == "ok", host_result
            result = host_result.to_result()
    assert (result.exit_code, result.stdout) == (0, b"up\n")
    assert heard and heard == list(range(1, len(heard) + 1))


def test_a_wrong_token_is_never_retried(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    t0 = time.monotonic()
    proc = e2e.run_cli(
        ["run", "--json", "--retry", "3", "--retry-delay", "0.5", srv.address, "true"],
        token=wrong_token(srv.token),
    )
    json_error(proc, "auth", 255)
    assert b"retry" not in proc.stderr and time.monotonic() - t0 < 5
    assert len(e2e.wait_until(lambda: srv.log_events("authentication failed"), 3)) == 1
    heard: list[int] = []
    with pytest.raises(rexec.AuthError):
        rexec.Client(
            srv.address,
            token=wrong_token(srv.token),
            retry=3,
            on_retry=lambda exc, n, wait: heard.append(n),
        )
    assert heard == []


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to a server and counts connections; cut() ends them all, as a
    network failure in the middle of a command would."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = self.listener.accept()
                self.accepted += 1
                up = socket.create_connection(self.target, 10)
                self.socks += [down, up]
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def cut(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()

    def run_cut(
        self, e2e: Any, argv: list[str], token: str, started: Callable[[], object], settle: float
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the CLI through this proxy, cut the connection once started() (and `settle`
        seconds more), and return how the CLI ended."""
        try:
            cli = subprocess.Popen(
                [e2e.REXEC, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=e2e.clean_env({"REXEC_TOKEN": token}),
            )
            assert e2e.wait_until(started, 15), "never ran"
            time.sleep(settle)
            self.cut()
            try:
                out, err = cli.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.communicate()
                raise
        finally:
            self.close()
        return subprocess.CompletedProcess(cli.args, cli.returncode, out, err)


def test_a_started_command_never_runs_twice(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    """The connection dies mid-command: --retry does not run it again (one line in the file,
    one connection), and --json says the result was truncated."""
    srv = server_factory()
    proxy = CuttingProxy(srv.address)
    runs = tmp_path / "runs"
    argv = ["run", "--json", "--retry", "3", "--retry-delay", "0.1", proxy.address]
    proc = proxy.run_cut(
        e2e,
        [*argv, f"echo run >> {runs}; sleep 30"],
        srv.token,
        lambda: runs.exists() and runs.read_bytes(),
        0.0,
    )
    doc = json_error(proc, "truncated", 255)
    assert doc["exit_code"] is None
    assert b"retry" not in proc.stderr
    assert runs.read_text() == "run\n"
    assert proxy.accepted == 1


@pytest.mark.parametrize(
    "mode",
    [["--json"], ["--json", "--fanout", "2"], ["-b"]],
    ids=["json", "fleet-json", "gather"],
)
def test_output_before_a_cut_connection_is_kept(
    server_factory: Any, e2e: Any, tmp_path: Path, mode: list[str]
) -> None:
    """The connection breaks mid-command: what the command printed before is still in the
    --json object (one host, or a host set's line) and under -b's header, not dropped."""
    srv = server_factory()
    proxy = CuttingProxy(srv.address)
    flag = tmp_path / "printed"
    line = f"printf 'out\\377\\n'; printf warn >&2; touch {flag}; sleep 30"
    # (0.3 s: the output's frames reach the client)
    proc = proxy.run_cut(e2e, ["run", *mode, proxy.address, line], srv.token, flag.exists, 0.3)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 255, err
    if mode == ["-b"]:
        header = f"---------------- {proxy.address} (1) truncated\n".encode()
        assert out == header + b"out\xff\n"
        assert err.splitlines(keepends=True)[1:] == [
            header,
            b"warn\n",
            f"1 host: 1 truncated ({proxy.address})\n".encode(),
        ]
        return
    doc = json.loads(out)
    assert doc["error"]["kind"] == "truncated"
    assert (doc["stdout"], doc["stdout_encoding"]) == ("b3V0/wo=", "base64")
    assert (doc["stderr"], doc["stderr_encoding"]) == ("warn", "utf-8")


# ---- --junit, one host ------------------------------------------------------------------------


def test_junit_for_one_host(server: Any, e2e: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    line = "printf '\\377\\001ok <&>\\n'; echo boom >&2; exit 3"
    proc = e2e.run_cli(["run", "--junit", str(report), server.address, line], token=server.token)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"\xff\x01ok <&>\n", b"boom\n")
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("rexec run", "1", "1")
    [case] = suite.findall("testcase")
    assert (case.get("classname"), case.get("name")) == ("rexec", server.address)
    assert 0 < float(case.get("time") or 0) < 10
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "exit"
    assert failure.get("message") == (
        f"command failed with exit status 3 on {server.address}: {line}\n  stderr: boom"
    )
    assert case.findtext("system-out") == "\ufffd\ufffdok <&>\n"
    assert case.findtext("system-err") == "boom\n"
    proc = e2e.run_cli(
        ["run", "--json", "--junit", str(report), server.address, "echo fine"], token=server.token
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["stdout"] == "fine\n"
    [case] = ET.parse(report).getroot().iter("testcase")
    assert case.find("failure") is None and case.findtext("system-out") == "fine\n"
    port = free_port()
    proc = e2e.run_cli(["run", "--junit", str(report), f"127.0.0.1:{port}", "true"], token="x")
    assert proc.returncode == 255
    [case] = ET.parse(report).getroot().iter("testcase")
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "config"
