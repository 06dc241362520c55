"""A smoke suite for lab hosts: rexec's pytest plugin runs every test once per host.

    pytest docs/examples/test_smoke.py --rexec-hosts lab1,lab2 --junitxml smoke.xml

Each test takes the `rexec_host` fixture; a failed check names the host, the command, its
exit status and the last lines of its stderr.
"""

from __future__ import annotations

import time

import pytest


def test_shell_answers(rexec_host):
    assert rexec_host.check_output("echo ok") == "ok"


def test_clock_in_sync(rexec_host):
    offset = int(rexec_host.check_output("date +%s")) - time.time()
    assert abs(offset) < 60, f"{rexec_host.host}: clock off by {offset:.0f}s"


def test_tmp_writable(rexec_host):
    rexec_host.run('f=$(mktemp) && echo x > "$f" && rm "$f"', check=True)


@pytest.mark.parametrize("tool", ["sh", "tar", "python3"])
def test_tool_installed(rexec_host, tool):
    rexec_host.run(["sh", "-c", 'command -v "$1"', "sh", tool], check=True)
