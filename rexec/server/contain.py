"""What outlives what: keeping every process a command starts from outliving its channel or
the server. One choice per server process, made at start from `[exec]`:

- "cgroup": each command runs in its own cgroup v2, created where the server can write (as
  root, or in a subtree delegated to its user, as systemd's Delegate=yes gives). Ending a
  channel signals and then kills the whole cgroup (cgroup.kill), so nothing escapes: not
  `setsid`, not a double fork. How (the fork inside the command's cgroup, the helper thread
  that moves the server on, the watchdog, a crashed predecessor's leftovers):
  rexec.server.cgroup.
- "pdeathsig" (no usable cgroup, or `cgroup = "off"`): the leader gets PR_SET_PDEATHSIG
  (SIGKILL when the server dies; set in the child by a preexec_fn, which costs the vfork fast
  path: about 4 ms a spawn, measured), and the server is a child subreaper: a process that
  escapes its group and is orphaned becomes the server's child, and the server kills it (and
  its group) when it notices (a scan of /proc after SIGCHLD or a channel's end, at most ten a
  second).
  Weaker: a SIGKILLed server takes the leaders with it, but what they started lives on
  under PID 1.
- "group" (`keep_orphans = true`, and the exec layer used on its own): process groups only;
  nothing but an explicit kill (deadline, disconnect, shutdown) touches a command.

Linux only. prctl goes through ctypes (no new dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, Literal

from rexec.errors import ConfigError
from rexec.server.cgroup import Cgroups, CgroupUnavailable, CommandCgroup, own_cgroup

__all__ = ["Containment", "containment", "use_containment"]

Mode = Literal["cgroup", "pdeathsig", "group"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_SWEEP_INTERVAL = 0.1  # seconds between two scans of /proc for inherited escapees


def _prctl() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn: Callable[..., int] = libc.prctl
    return fn


# ---- the process-wide choice --------------------------------------------------------------


class Containment:
    """How this process keeps commands contained; see the module docstring."""

    def __init__(self, mode: Mode = "group", *, keep_orphans: bool = False) -> None:
        self.mode: Mode = mode
        self.keep_orphans = keep_orphans
        self.reason = ""  # why cgroups are not used, when they are not
        self._cgroups: Cgroups | None = None
        self._ours: set[int] = set()  # children we started: never swept as escapees
        self._me = os.getpid()
        self._prctl: Callable[..., int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_pending = False
        self._last_sweep = 0.0
        self._log: Any = None
        self._reaped = (0, 0)  # crashed predecessors' subtrees and processes removed at start

    @classmethod
    def start(cls, setting: str, keep_orphans: bool) -> Containment:
        """Choose and set up the mode for this server (setting: auto, off or require).

        Nothing is logged yet: `announce()` does, once the server listens.
        """
        if keep_orphans:
            return cls("group", keep_orphans=True)
        reason = "cgroup = off"
        if setting != "off":
            try:
                cgroups = Cgroups(own_cgroup())
                cgroups.create()
            except CgroupUnavailable as exc:
                reason = str(exc)
                if setting == "require":
                    raise ConfigError(f"exec.cgroup = require, but {reason}") from None
            else:
                self = cls("cgroup")
                self._cgroups = cgroups
                self._ours.add(cgroups.start_watchdog())
                self._reaped = cgroups.reap_predecessors()
                cgroups.stage(asyncio.get_running_loop())
                return self
        self = cls("pdeathsig")
        self.reason = reason
        self._prctl = _prctl()
        if self._prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise ConfigError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.sweep_soon)
        return self

    def announce(self, log: Any) -> None:
        """Log the mode (and what a crashed predecessor left), once the server listens."""
        self._log = log
        if self.mode == "group":
            log.info("commands may outlive their channel (keep_orphans)", containment="group")
        elif self.mode == "pdeathsig":
            log.warning(
                "cgroups unavailable: commands die with the server (PR_SET_PDEATHSIG) and "
                "escaped processes are killed as the server inherits them (subreaper)",
                containment="pdeathsig",
                reason=self.reason,
            )
        elif self._cgroups is not None:
            trees, procs = self._reaped
            if trees:
                log.warning(
                    "removed what a crashed predecessor left", cgroups=trees, processes_killed=procs
                )
            log.info("each command runs in its own cgroup", containment="cgroup",
                     cgroup=str(self._cgroups.root))  # fmt: skip

    # -- spawning (called by the exec layer) --

    async def ready(self) -> None:
        """Before new_cgroup(): wait until the server may fork the next command."""
        if self._cgroups is not None:
            await self._cgroups.ready()

    def new_cgroup(self) -> CommandCgroup | None:
        return self._cgroups.new() if self._cgroups is not None else None

    @contextlib.contextmanager
    def spawning(self, cg: CommandCgroup | None) -> Iterator[Callable[[], None] | None]:
        """Around Popen: stand in the command's cgroup; yields the preexec_fn, if any."""
        if cg is not None and self._cgroups is not None:
            with self._cgroups.inside(cg):
                yield None
        elif self._prctl is not None:
            yield self._preexec
        else:
            yield None

    def _preexec(self) -> None:
        """In the child, before exec: die with the server (and if it is already gone, now)."""
        assert self._prctl is not None
        self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self._me:
            os.kill(os.getpid(), signal.SIGKILL)

    def adopt(self, pid: int) -> None:
        self._ours.add(pid)

    def finished(self, pid: int, cg: CommandCgroup | None) -> None:
        """The command's channel is done: its pid is reaped, its cgroup can go."""
        self._ours.discard(pid)
        if cg is not None and self._cgroups is not None:
            self._cgroups.release(cg)
        self.sweep_soon()

    # -- the subreaper (pdeathsig mode) --

    def sweep_soon(self) -> None:
        """A sweep within _SWEEP_INTERVAL: a /proc scan costs milliseconds, so a busy server
        sweeps at most ten times a second instead of at every command's end."""
        if self._loop is None or self._sweep_pending:
            return
        self._sweep_pending = True
        delay = max(0.0, self._last_sweep + _SWEEP_INTERVAL - self._loop.time())
        self._loop.call_later(delay, self.sweep)

    def sweep(self) -> int:
        """Kill and reap children we did not start: escapees we inherited. Returns killed."""
        self._sweep_pending = False
        if self._loop is not None:
            self._last_sweep = self._loop.time()
        killed = 0
        for pid, state, pgid, comm in _children(self._me):
            if pid in self._ours:
                continue
            if state not in ("Z", "X"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if pgid == pid:  # it leads a group of its own (setsid): all of it
                        os.killpg(pid, signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
                killed += 1
                if self._log is not None:
                    self._log.info("killed an escaped process", pid=pid, comm=comm)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        return killed

    def close(self) -> None:
        """Server shutdown: kill and remove our cgroups; a last sweep."""
        if self._cgroups is not None:
            self._cgroups.close()
            self._cgroups = None
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGCHLD)
            self.sweep()
            self._loop = None


def _children(ppid: int) -> list[tuple[int, str, int, str]]:
    """(pid, state, pgid, comm) of every child of ppid, from /proc."""
    out: list[tuple[int, str, int, str]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        close = stat.rfind(b")")
        fields = stat[close + 2 :].split()
        if int(fields[1]) == ppid:
            comm = stat[stat.find(b"(") + 1 : close].decode(errors="replace")
            out.append((int(entry.name), fields[0].decode(), int(fields[2]), comm))
    return out


_current = Containment()


def containment() -> Containment:
    """This process's containment (the server sets it at start; "group" otherwise)."""
    return _current


def use_containment(c: Containment) -> None:
    global _current
    _current = c
