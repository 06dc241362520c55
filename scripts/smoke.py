"""A one-minute smoke test of an installed rexec: server up, a few commands, clean stop.

    .venv/bin/python scripts/smoke.py

Starts `rexec serve` on 127.0.0.1 port 0 with a fresh token store in a temp dir, runs
commands through the real CLI, checks exit codes and bytes, then stops the server with
SIGTERM and checks it exited 0. Prints one line per check; exits non-zero on any failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REXEC = str(Path(sys.executable).parent / "rexec")


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="rexec-smoke-") as tmp:
        base = Path(tmp)
        store = base / "tokens.json"
        token = subprocess.run(
            [REXEC, "token", "new", "--id", "smoke", "--store", str(store)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ready = base / "ready"
        server = subprocess.Popen(
            [
                REXEC,
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                str(store),
                "--state-dir",
                str(base / "state"),
                "--ready-file",
                str(ready),
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(base / "server.log", "wb"),  # noqa: SIM115 - closed with the dir
        )
        try:
            deadline = time.monotonic() + 15
            while not ready.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    print("FAIL server did not start")
                    return 1
                time.sleep(0.05)
            addr = ready.read_text().split()[0]
            env = {**os.environ, "REXEC_TOKEN": token}
            checks: list[tuple[list[str], bytes, int, bytes]] = [
                (["echo hello"], b"", 0, b"hello\n"),
                (["exit 3"], b"", 3, b""),
                (["cat"], b"\x00\xffbinary", 0, b"\x00\xffbinary"),
                (["printf", "%s|", "a b", "c"], b"", 0, b"a b|c|"),
                (["--timeout", "0.5", "sleep 30"], b"", 124, b""),
            ]
            for args, stdin, want_rc, want_out in checks:
                cmd = (
                    [REXEC, "run", addr, *args]
                    if args[0] != "--timeout"
                    else [REXEC, "run", *args[:2], addr, *args[2:]]
                )
                proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=30)
                ok = proc.returncode == want_rc and proc.stdout == want_out
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} rexec run {' '.join(args)!r}: "
                    f"rc={proc.returncode} stdout={proc.stdout[:40]!r}"
                )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                rc = server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                rc = -9
            ok = rc == 0
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} server stopped with status {rc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
