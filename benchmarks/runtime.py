"""Helpers shared by the measures: one persistent event loop, timing, waiting for files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import procs
from benchmarks.model import Unavailable

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the venv's real interpreter, never the pyenv bash shim
# The venv's console script; REXEC_BENCH_BIN overrides it (to test the harness itself).
REXEC_BIN = Path(os.environ.get("REXEC_BENCH_BIN") or Path(sys.executable).parent / "rexec")


class Loop:
    """One event loop for the whole run, so open connections survive between samples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        procs.on_cleanup("event loop", self.close)

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 120.0) -> T:
        if self.loop.is_closed():
            raise Unavailable("event loop closed")
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def atimed(coro: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


def wait_file(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> str:
    """Poll until path holds a complete line; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if text.endswith("\n") and text.strip():
            return text.strip()
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"{what} exited with {proc.returncode} before it was ready")
        time.sleep(0.02)
    raise Unavailable(f"{what} not ready within {timeout:.0f}s")


def tail(path: Path, lines: int = 2) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-200:]


def check_proc(res: subprocess.CompletedProcess[bytes], what: str) -> None:
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines() if res.stderr else []
        raise RuntimeError(f"{what}: exit {res.returncode} {err[-1] if err else ''}".strip())
