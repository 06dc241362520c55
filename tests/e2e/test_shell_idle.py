"""The shell notices a connection the server closed while the user sat at the prompt (idle
timeout), says why in one line, offers to reconnect, and then runs the typed line."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pexpect  # type: ignore[import-untyped]

PROMPT = re.compile(r"\S+@\S+:(\S+?)(?: \[(\d+)\])?[#$] ")


def test_idle_close_is_noticed_before_the_line_is_sent(
    e2e: Any, server_factory: Any, tmp_path: Path
) -> None:
    srv = server_factory("[limits]\nidle_timeout = 1.0\n")
    env = e2e.clean_env({"REXEC_TOKEN": srv.token, "XDG_STATE_HOME": str(tmp_path / "st")})
    env.update(TERM="xterm", NO_COLOR="1")
    child = pexpect.spawn(
        e2e.REXEC, ["shell", "--repl", srv.address], env=env, encoding="utf-8", timeout=10
    )
    try:
        child.expect_exact("rexec: connected to ")
        child.expect(PROMPT)
        idle_logged = e2e.wait_until(
            lambda: any("idle" in r.get("event", "") for r in srv.log_records()), 10
        )
        assert idle_logged, "the server never closed the idle connection"
        time.sleep(0.2)
        child.sendline("echo after-idle")
        child.expect(r"lost: [^\r\n]*idle")
        child.expect_exact("reconnect? [Y/n]")
        child.sendline("y")
        child.expect_exact("reconnected to ")
        child.expect_exact("after-idle\r\n")  # the typed line ran, on the new connection
        child.expect(PROMPT)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert "Traceback" not in (child.before or "")
