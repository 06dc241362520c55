"""The pytest plugin's pure parts: failure messages and host-set expansion."""

from __future__ import annotations

import pytest

import rexec
from rexec.pytest_plugin import (
    HostCommandFailed,
    HostCommandTimeout,
    check_result,
    describe_failure,
    expand_hosts,
)
from rexec.result import CommandFailed, CommandTimeout, Result


def test_failure_names_host_status_command_and_stderr_tail() -> None:
    stderr = b"".join(b"line %d\n" % i for i in range(1, 13))
    result = Result("systemctl is-active nginx", 3, stderr=stderr)
    assert describe_failure("lab2", result) == "\n".join(
        [
            "lab2: exit status 3: systemctl is-active nginx",
            "stderr (last 10 lines):",
            *(f"  line {i}" for i in range(3, 13)),
        ]
    )


def test_failure_by_signal_argv_and_empty_stderr() -> None:
    result = Result(("sh", "-c", "kill -9 $$"), None, signal=9)
    assert describe_failure("h", result) == (
        "h: killed by signal 9: sh -c 'kill -9 $$'\nstderr: (empty)"
    )


def test_timeout_and_long_command_and_undecodable_stderr() -> None:
    result = Result("x" * 300, None, signal=9, timed_out=True, duration=5.04, stderr=b"\xff\n")
    text = describe_failure("h", result)
    assert text == f"h: timed out after 5.0s: {'x' * 197}...\nstderr (last 1 lines):\n  \ufffd"


def test_check_result_raises_rexec_errors_that_carry_host_and_result() -> None:
    ok = Result("true", 0)
    assert check_result("h", ok) is ok
    failed = Result("false", 1, stderr=b"no\n")
    with pytest.raises(CommandFailed) as info:
        check_result("lab1", failed)
    assert isinstance(info.value, HostCommandFailed)
    assert (info.value.host, info.value.result) == ("lab1", failed)
    assert str(info.value) == "lab1: exit status 1: false\nstderr (last 1 lines):\n  no"
    slow = Result("sleep 9", None, signal=9, timed_out=True, duration=1.0)
    with pytest.raises(CommandTimeout) as tinfo:
        check_result("lab1", slow)
    assert isinstance(tinfo.value, HostCommandTimeout)
    assert tinfo.value.result is slow


def test_expand_hosts_takes_rexec_host_sets_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rexec, "expand_hosts", lambda spec: [f"<{spec}>"], raising=False)
    assert expand_hosts("lab[1-2]") == ["<lab[1-2]>"]


def test_expand_hosts_comma_list_without_host_sets() -> None:
    if getattr(rexec, "expand_hosts", None) is not None:
        pytest.skip("this rexec has host sets: rexec.expand_hosts is used instead")
    assert expand_hosts(" lab1, 127.0.0.1:9000,,[::1]:8222 ") == [
        "lab1",
        "127.0.0.1:9000",
        "[::1]:8222",
    ]
