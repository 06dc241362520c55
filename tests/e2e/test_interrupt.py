"""Ctrl-C reaches the remote command: the CLI forwards SIGINT, and a second Ctrl-C SIGKILL.

The classic ssh pain is a Ctrl-C that kills the local client but leaves the remote command
running. Here the remote process must be gone and the exit status must say how it died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def _start(e2e: Any, server: Any, command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [e2e.REXEC, "run", server.address, command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env({"REXEC_TOKEN": server.token}),
    )


def _remote(marker: str) -> list[int]:
    """The remote `sleep` processes themselves (not the CLI, whose argv holds the marker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv[:2] == [b"sleep", marker.split()[1].encode()]:
                found.append(int(entry))
    return found


def _wait_running(e2e: Any, marker: str) -> None:
    assert e2e.wait_until(lambda: _remote(marker), 10), f"{marker} never started"
    time.sleep(0.1)  # let the remote shell reach its wait


def test_ctrl_c_interrupts_the_remote_command(e2e: Any, server: Any) -> None:
    marker = "sleep 1000.24680"
    cli = _start(e2e, server, f"echo started; {marker}; echo after")
    try:
        _wait_running(e2e, marker)
        t0 = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err
    assert out == b"started\n"
    assert b"Traceback" not in err
    assert elapsed < 2.0
    assert e2e.wait_until(lambda: not _remote(marker), 2.0), "remote sleep survived"


def test_second_ctrl_c_kills_a_command_that_ignores_sigint(e2e: Any, server: Any) -> None:
    marker = "sleep 1000.13579"
    cli = _start(e2e, server, f"trap '' INT; {marker}")
    try:
        _wait_running(e2e, marker)
        cli.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            cli.wait(0.5)  # ignored remotely: still running
        assert _remote(marker)
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 128 + signal.SIGKILL, err
    assert e2e.wait_until(lambda: not _remote(marker), 2.0)


def test_killing_the_client_kills_the_remote_command(e2e: Any, server: Any) -> None:
    marker = "sleep 1000.97531"
    cli = _start(e2e, server, f"{marker} & {marker}")
    try:
        _wait_running(e2e, marker)
        cli.kill()
        cli.wait(5)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert e2e.wait_until(lambda: not _remote(marker), 2.0), "remote group survived"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_still_reports_and_ends_the_remote_command(
    e2e: Any, server: Any, tmp_path: Path, signum: int
) -> None:
    """A CI job cancelled (SIGTERM) or a terminal closed (SIGHUP): the CLI still prints its
    --json object and writes its --junit report, exits 128+N, and the command is ended."""
    marker = f"sleep 1000.{os.getpid()}{signum}"
    report = tmp_path / "report.xml"
    cli = subprocess.Popen(
        [e2e.REXEC, "run", "--json", "--junit", str(report), server.address, f"echo x; {marker}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env({"REXEC_TOKEN": server.token}),
    )
    try:
        _wait_running(e2e, marker)
        cli.send_signal(signum)
        out, err = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 128 + signum, err
    doc = json.loads(out)
    assert (doc["exit_status"], doc["stdout"]) == (128 + signum, "x\n")
    assert doc["error"] == {"kind": "interrupted", "message": f"ended by signal {signum}"}
    assert err == f"rexec: ended by signal {signum}\n".encode()
    assert b'type="interrupted"' in report.read_bytes()
    assert e2e.wait_until(lambda: not _remote(marker), 5.0), "remote sleep survived"
