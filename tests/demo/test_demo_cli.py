"""`rexec demo` as a class runs it: the real CLI in a subprocess, exit 0, a verdict each."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rexec.demo import main


def _rexec_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rexec", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_all_exits_0_with_a_verdict_per_scenario() -> None:
    done = _rexec_demo("all")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("truncation", "sticky", "empty"):
        assert out.count(f"verdict {name}: PASS") == 1
    assert "[FAIL]" not in out
    assert "3/3 scenarios behaved as the lesson says" in out
    assert "cut at 1024 of 8893 bytes" in out
    assert "b'echo oneecho two'" in out
    assert done.stderr == ""


def test_show_frames_prints_headers_in_hex_with_decoded_lengths() -> None:
    done = _rexec_demo("truncation", "--show-frames")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "server -> client  header 00 00 22 bd  length=8893" in out
    assert "client -> server  header 00 00 00 0a  length=10" in out
    assert "client -> server  header ff ff ff ff  length=4294967295  refused" in out
    assert "verdict sticky" not in out


def test_single_scenario_runs_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["empty"]) == 0
    out = capsys.readouterr().out
    assert "verdict empty: PASS" in out
    assert "verdict truncation" not in out
    assert "frames, as each receiver decoded them" not in out
    assert "1/1 scenarios behaved as the lesson says" in out


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "--show-frames" in capsys.readouterr().out


def test_every_run_prints_the_same_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for _ in range(2):
        assert main(["all", "--show-frames"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].count("[ok]") == 30
    assert "[FAIL]" not in outputs[0]
