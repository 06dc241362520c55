"""How `rexec run` ends, in one place: error kinds, exit statuses, retries, --json, --junit,
and the rule for `rexec WORD` (subcommand, alias or host)."""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import rexec.errors
from rexec import (
    AuthError,
    CommandTimeout,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    ErrorCode,
    ExecError,
    HostResult,
    HostSetError,
    PolicyError,
    RemoteError,
    Result,
    TruncatedError,
)
from rexec.cli.common import unknown_command
from rexec.cli.outcome import (
    JUnitCase,
    Outcome,
    Tail,
    UsageError,
    failure_text,
    json_object,
    junit_xml,
    of_error,
    of_host,
    of_result,
)
from rexec.client.connecting import RETRY_TOTAL, RETRY_WAIT_MAX, Retry, retryable
from rexec.client.core import ClientCore
from rexec.errors import LocalProtocolError, NotRexecServer, RemoteProtocolError, ServerRefused
from rexec.protocol.notice import RefusalCode
from rexec.protocol.token import generate_token

# ---- error kinds and exit statuses ---------------------------------------------------------


def refused(code: RefusalCode = RefusalCode.BUSY, retry_after: int = 7) -> ServerRefused:
    return ServerRefused(code, retry_after, f"server refused the connection: {code.name}")


@pytest.mark.parametrize(
    ("exc", "started", "kind", "status"),
    [
        (ConnectionLost("cannot connect to h:1: Connection refused"), False, "connect", 255),
        (ConnectionLost("connection to h:1 lost: reset"), True, "truncated", 255),
        (TruncatedError("eof"), False, "truncated", 255),
        (ConnectTimeout("connecting to h:1 timed out after 1s"), False, "timeout", 255),
        (AuthError("authentication failed"), False, "auth", 255),
        (refused(), False, "refused", 255),
        (refused(RefusalCode.SUITE_NOT_ALLOWED), False, "refused", 255),
        (NotRexecServer("that is an SSH server"), False, "protocol", 255),
        (RemoteProtocolError("bad frame"), False, "protocol", 255),
        (PolicyError(ErrorCode.POLICY, "allow: no"), True, "policy", 255),
        (RemoteError(ErrorCode.BAD_REQUEST, "env X not allowed"), True, "server", 255),
        (RemoteError(ErrorCode.LIMIT, "too many commands"), True, "refused", 255),
        (RemoteError(ErrorCode.SHUTDOWN, "server is shutting down"), True, "refused", 255),
        (ExecError("command not found: x", exit_code=127), True, "exec", 127),
        (ExecError("permission denied: x", exit_code=126), True, "exec", 126),
        (ConfigError("no token for 'h'"), False, "config", 255),
        (HostSetError("invalid host set 'a[3-1]'"), False, "usage", 2),
        (UsageError("--timeout must be ...", parse=False), False, "usage", 2),
        (KeyboardInterrupt(), True, "interrupted", 130),
        (BrokenPipeError(), True, "interrupted", 141),
        (ValueError("a bug"), True, "internal", 255),
    ],
)
def test_every_error_has_one_kind_and_one_exit_status(
    exc: BaseException, started: bool, kind: str, status: int
) -> None:
    outcome = of_error(exc, started=started)
    assert (outcome.kind, outcome.exit_status) == (kind, status)
    assert outcome.result is None
    if not isinstance(exc, KeyboardInterrupt | BrokenPipeError):
        assert outcome.message == str(exc)


def test_results_map_to_their_shell_status() -> None:
    ok = of_result(Result("true", 0))
    assert (ok.exit_status, ok.kind, ok.message) == (0, None, None)
    assert of_result(Result("false", 3)).exit_status == 3
    assert of_result(Result("x", None, signal=9)).exit_status == 137
    late = of_result(Result("sleep 9", None, signal=9, timed_out=True, duration=2.04))
    assert (late.exit_status, late.kind) == (124, "timeout")
    assert late.message == "command timed out after 2.0s (killed by the server)"


def test_a_host_result_carries_its_kind() -> None:
    unreachable = HostResult(
        "lab1", "unreachable", "x", error="cannot connect", error_kind="connect"
    )
    assert (of_host(unreachable).exit_status, of_host(unreachable).kind) == (255, "connect")
    assert unreachable.to_json_dict()["error"] == {"kind": "connect", "message": "cannot connect"}
    assert unreachable.to_json_dict()["exit_status"] == 255
    missing = HostResult("lab1", "exit", "x", 127, error="not found", error_kind="exec")
    assert (of_host(missing).exit_status, of_host(missing).result) == (127, None)
    ran = of_host(HostResult("lab2", "exit", "x", 2, stderr=b"oops\n"))
    assert ran.result is not None and ran.result.target == "lab2" and ran.kind is None
    policy = HostResult("lab3", "error", "x", error="server error (policy)", error_kind="policy")
    assert policy.label == "policy"  # the summary names the kind, not just `error`
    assert HostResult("lab4", "error", "x", error="?").label == "error"


# ---- --json --------------------------------------------------------------------------------

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


def test_json_objects_have_one_shape_for_every_outcome() -> None:
    ran = json_object("h", ["exit 3"], of_result(Result("exit 3", 3, stderr=b"e\n")))
    failed = json_object("h", ["a", "b"], of_error(ConnectionLost("cannot connect")), 0.5)
    missing = json_object("h", ["nope"], of_error(ExecError("not found", exit_code=127)))
    for doc in (ran, failed, missing):
        assert list(doc) == KEYS
        json.dumps(doc)
    assert (ran["exit_status"], ran["error"], ran["stderr"]) == (3, None, "e\n")
    assert failed["command"] == ["a", "b"] and failed["duration"] == 0.5
    assert failed["error"] == {"kind": "connect", "message": "cannot connect"}
    assert (failed["exit_code"], failed["exit_status"]) == (None, 255)
    assert (missing["exit_code"], missing["exit_status"], missing["error"]["kind"]) == (
        127,
        127,
        "exec",
    )


# ---- retries -------------------------------------------------------------------------------


def _core(exec_sent: bool = False) -> ClientCore:
    core = ClientCore(generate_token())
    core.exec_sent = exec_sent
    return core


@pytest.mark.parametrize(
    ("exc", "again"),
    [
        (ConnectionLost("refused"), True),
        (ConnectTimeout("timed out"), True),
        (TruncatedError("handshake cut"), True),
        (RemoteProtocolError("garbled handshake"), True),
        (refused(RefusalCode.BUSY), True),
        (refused(RefusalCode.RATE_LIMITED), True),
        (refused(RefusalCode.SHUTTING_DOWN), True),
        (refused(RefusalCode.SUITE_NOT_ALLOWED), False),
        (refused(RefusalCode.VERSION_NOT_SUPPORTED), False),
        (AuthError("wrong token"), False),
        (rexec.errors.AuthFailed("bad proof"), False),
        (NotRexecServer("ssh"), False),
        (LocalProtocolError("a bug"), False),
        (ConfigError("no token"), False),
        (PolicyError(ErrorCode.POLICY, "no"), False),
        (ExecError("not found", 127), False),
    ],
)
def test_only_failures_to_connect_are_retried(exc: BaseException, again: bool) -> None:
    assert retryable(exc) is again
    assert (Retry(3, 1.0, 0.0).after(exc, _core(), 0.0, 0.5) is not None) is again


def test_backoff_doubles_with_jitter_and_is_bounded() -> None:
    retry = Retry(10, 1.0, 0.0)
    lost = ConnectionLost("refused")
    waits = [retry.after(lost, _core(), 0.0, jitter) for jitter in (0.0, 0.999, 0.0, 0.5)]
    assert waits[0] == 1.0 and waits[1] == pytest.approx(2.999)  # 2 s plus up to half
    assert waits[2:] == [4.0, 10.0]
    many = [retry.after(lost, _core(), 0.0, 0.0) for _ in range(7)]
    assert many == [16.0, *[RETRY_WAIT_MAX] * 5, None]
    assert retry.done == 10


def test_retries_stop_at_the_count_and_the_total() -> None:
    retry = Retry(2, 0.1, 100.0)
    lost = ConnectionLost("refused")
    assert retry.after(lost, _core(), 100.0, 0.0) == 0.1
    assert retry.after(lost, _core(), 100.1, 0.0) == 0.2
    assert retry.after(lost, _core(), 100.3, 0.0) is None  # 2 retries made
    late = Retry(100, 1.0, 0.0)
    assert late.after(lost, _core(), RETRY_TOTAL - 0.5, 0.0) is None  # would start past it
    assert Retry(0, 1.0, 0.0).after(lost, _core(), 0.0, 0.0) is None


def test_a_refusal_retry_after_is_honoured() -> None:
    assert Retry(1, 1.0, 0.0).after(refused(retry_after=7), _core(), 0.0, 0.0) == 7.0
    assert Retry(1, 1.0, 0.0).after(refused(retry_after=0), _core(), 0.0, 0.0) == 1.0


def test_a_core_that_sent_an_exec_is_never_retried() -> None:
    assert Retry(3, 1.0, 0.0).after(ConnectionLost("lost"), _core(exec_sent=True), 0, 0) is None


def test_a_started_command_marks_its_core() -> None:
    from rexec.protocol.messages import ServerInfo

    core = _core()
    core.info = ServerInfo(server="t", user="u", host="h", max_payload=262144, max_channels=3)
    core.conn.send_exec = lambda *a, **k: 1  # type: ignore[method-assign]
    assert not core.exec_sent
    core.start("true")
    assert core.exec_sent


@pytest.mark.parametrize(
    ("retries", "delay"), [(-1, 1.0), (1.5, 1.0), (True, 1.0), (1, 0.0), (1, -1.0), (1, 1e999)]
)
def test_retry_values_are_checked_at_the_call(retries: Any, delay: float) -> None:
    with pytest.raises(ValueError):
        Retry(retries, delay, 0.0)
    with pytest.raises(ValueError):
        rexec.connect("127.0.0.1:9", token=generate_token(), retry=retries, retry_delay=delay)
    with pytest.raises(ValueError):
        rexec.run_many(["h"], "true", token=generate_token(), retry=retries, retry_delay=delay)


def test_sync_client_retries_then_raises_the_last_error(tmp_path: Path) -> None:
    """A unix socket nobody listens on: every attempt fails at once; on_retry hears each."""
    heard: list[tuple[str, int, float]] = []
    target = f"unix:{tmp_path / 'nobody.sock'}"
    with pytest.raises(ConnectionLost, match="No such file"):
        rexec.Client(
            target,
            token=generate_token(),
            retry=2,
            retry_delay=0.01,
            on_retry=lambda exc, n, wait: heard.append((type(exc).__name__, n, wait)),
        )
    assert [(name, n) for name, n, _ in heard] == [("ConnectionLost", 1), ("ConnectionLost", 2)]
    assert 0.01 <= heard[0][2] <= 0.015 and 0.02 <= heard[1][2] <= 0.03


# ---- --junit -------------------------------------------------------------------------------


def test_junit_xml_escapes_and_replaces_what_xml_cannot_hold() -> None:
    out = b"<a & b>\xff\x00\x1b[31m \xf0\x9f\x98\x80\n"
    failed = of_result(Result("x", 2, stdout=out, stderr=b"warn\n]]>boom\n", target="lab1"))
    cases = [
        JUnitCase("lab1", failed, 1.25, out, b"warn\n]]>boom\n"),
        JUnitCase("lab2", of_result(Result("x", 0, target="lab2")), 0.5),
        JUnitCase("lab3", of_error(ConnectTimeout("connecting to lab3:8222 timed out")), 3.0),
    ]
    root = ET.fromstring(junit_xml(["x"], cases, 0.0, 3.5))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("time")) == ("3", "2", "3.500")
    testcases = suite.findall("testcase")
    assert [(t.get("classname"), t.get("name"), t.get("time")) for t in testcases] == [
        ("rexec", "lab1", "1.250"),
        ("rexec", "lab2", "0.500"),
        ("rexec", "lab3", "3.000"),
    ]
    failure = testcases[0].find("failure")
    assert failure is not None and failure.get("type") == "exit"
    assert (
        failure.get("message")
        == failure.text
        == ("command failed with exit status 2 on lab1: x\n  stderr: warn\n  stderr: ]]>boom")
    )
    assert testcases[0].findtext("system-out") == "<a & b>\ufffd\ufffd\ufffd[31m \U0001f600\n"
    assert testcases[0].findtext("system-err") == "warn\n]]>boom\n"
    assert testcases[1].find("failure") is None and testcases[1].find("system-out") is None
    third = testcases[2].find("failure")
    assert third is not None and third.get("type") == "timeout"
    assert third.text == "exit status 255, timeout: connecting to lab3:8222 timed out"


def test_junit_keeps_the_tail_of_long_output() -> None:
    tail = Tail(limit=10)
    for _ in range(5):
        tail.add(b"0123456789")
    assert len(tail.data) + tail.dropped == 50 and len(tail.data) <= 20
    case = JUnitCase("h", Outcome(0), 0.0, bytes(tail.data), b"", (tail.dropped, 0))
    text = ET.fromstring(junit_xml(["x"], [case], 0.0, 0.0)).findtext(".//system-out")
    assert text == f"[{tail.dropped} bytes before this left out]\n" + tail.data.decode()


def test_a_timeout_failure_quotes_stderr() -> None:
    outcome = of_result(Result("x", None, 9, True, 1.0, b"", b"slow\n", "h"))
    text = failure_text(outcome)
    assert text is not None
    assert text.startswith("command timed out after 1.0s on h: x") and "stderr: slow" in text
    with pytest.raises(CommandTimeout):
        Result("x", None, 9, True, 1.0).check()
    assert failure_text(of_result(Result("x", 0))) is None


# ---- `rexec WORD`: a subcommand, an alias, or a host -----------------------------------------


class Resolver:
    def __init__(self, errno: int | None) -> None:
        self.errno = errno
        self.asked: list[bytes] = []

    def __call__(self, host: bytes, port: None) -> list[Any]:
        self.asked.append(host)
        if self.errno is not None:
            raise socket.gaierror(self.errno, "lookup failed")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("REXEC_CONFIG", "REXEC_TOKEN", "REXEC_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("frob", "unknown command or host 'frob'"),
        ("rnu", "unknown command or host 'rnu' (did you mean `rexec run`?)"),
        ("shel", "unknown command or host 'shel' (did you mean `rexec shell`?)"),
        ("sevre", "unknown command or host 'sevre' (did you mean `rexec serve`?)"),
        ("tokne", "unknown command or host 'tokne' (did you mean `rexec token`?)"),
        ("dmeo", "unknown command or host 'dmeo' (did you mean `rexec demo`?)"),
    ],
)
def test_a_bare_word_that_does_not_resolve_is_unknown(
    no_config: Path, word: str, message: str
) -> None:
    resolver = Resolver(socket.EAI_NONAME)
    assert unknown_command(word, resolver) == message
    assert resolver.asked == [word.encode()]


def test_hosts_stay_hosts(no_config: Path) -> None:
    assert unknown_command("rnu", Resolver(None)) is None  # it resolves: a host named rnu
    assert unknown_command("rnu", Resolver(socket.EAI_AGAIN)) is None  # DNS down: cannot say
    never = Resolver(socket.EAI_NONAME)
    for word in ("lab1.example.net", "10.0.0.7", "rnu:8300", "unix:/x", "lab[1-2]", "@lab", "a,b"):
        assert unknown_command(word, never) is None
    assert never.asked == []
    (no_config / "rexec").mkdir()
    (no_config / "rexec" / "client.toml").write_text('[hosts.rnu]\naddress = "127.0.0.1:1"\n')
    assert unknown_command("rnu", never) is None  # an alias
    assert never.asked == []
