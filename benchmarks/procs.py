"""Every process the benchmark starts, it stops.

The benchmark makes itself a child subreaper, so daemons it starts (an OpenSSH
ControlPersist master forks into the background) stay its descendants. At the end, and on
SIGTERM/SIGINT/SIGHUP or interpreter exit, the registered graceful stops run first (close
connections, `ssh -O exit`, SIGTERM to the servers), then every remaining descendant of this
process gets SIGTERM, a short grace period, and SIGKILL. Temporary directories are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

PR_SET_CHILD_SUBREAPER = 36

_stops: list[tuple[str, Callable[[], None]]] = []
_tempdirs: list[Path] = []
_cleaned = False
_installed = False


def install() -> None:
    """Become a subreaper and route fatal signals and interpreter exit through cleanup()."""
    global _installed
    if _installed:
        return
    _installed = True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Unwind through every try/finally; cleanup() also runs from atexit.
    raise SystemExit(128 + signum)


def on_cleanup(name: str, stop: Callable[[], None]) -> None:
    """Register a graceful stop; stops run last-registered first."""
    _stops.append((name, stop))


def tempdir(prefix: str, parent: Path | None = None) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _tempdirs.append(path)
    return path


def _proc_table() -> dict[int, int]:
    """pid -> ppid for every live process."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." where comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2 and fields[0] != "Z":
            table[int(entry)] = int(fields[1])
    return table


def descendants(root: int | None = None) -> list[int]:
    """Live (non-zombie) descendants of root (default: this process)."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo and len(found) < 100_000:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _reap() -> None:
    for _ in range(10_000):
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def sweep(grace: float = 3.0) -> list[str]:
    """SIGTERM, then SIGKILL, every descendant still alive; returns what had to be killed."""
    pids = descendants()
    if not pids:
        _reap()
        return []
    killed = [f"{pid} {_cmdline(pid)}" for pid in pids]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not descendants():
            break
        time.sleep(0.05)
    for pid in descendants():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    _reap()
    return killed


def stop_popen(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0
) -> None:
    """Signal one process we started and wait for it, escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def cleanup() -> None:
    """Run the graceful stops, sweep the leftovers, remove temp dirs. Idempotent."""
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    # Ignore further SIGINT/SIGTERM while tidying up so a second Ctrl-C cannot leave orphans.
    saved: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    while _stops:
        name, stop = _stops.pop()
        try:
            stop()
        except BaseException as exc:  # cleanup must go on whatever happens
            sys.stderr.write(f"bench: stopping {name} failed: {exc!r}\n")
    leftovers = sweep()
    if leftovers:
        sys.stderr.write(
            f"bench: killed {len(leftovers)} leftover process(es): {'; '.join(leftovers[:5])}\n"
        )
    for path in _tempdirs:
        shutil.rmtree(path, ignore_errors=True)
    _tempdirs.clear()
    with contextlib.suppress(ValueError, TypeError):
        for saved_sig, handler in saved.items():
            signal.signal(saved_sig, handler)
