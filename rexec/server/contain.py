"""What outlives what: keeping every process a command starts from outliving its channel or
the server. One choice per server process, made at start from `[exec]`:

- "cgroup": each command runs in its own cgroup v2, `<own cgroup>/rexec.<pid>.<start>/c<n>`,
  created where the server can write (as root, or in a subtree delegated to its user, as
  systemd's Delegate=yes gives). Ending a channel signals and then kills the whole cgroup
  (cgroup.kill), so nothing escapes: not `setsid`, not a double fork. The child is forked
  inside its cgroup with no code run in it: the server stands in the next command's cgroup
  before the command arrives and forks (vfork) there, so the child is born inside; a helper
  thread then moves the server on into a fresh cgroup for the command after. Moving a process
  between cgroups waits for an RCU grace period whenever no move happened in the last few
  milliseconds (5-20 ms here: the kernel's cgroup_threadgroup_rwsem), which a move before
  each fork put on every command's critical path; now no move waits in front of a command
  unless commands arrive faster than the moves complete. Until the server has left, the
  command's cgroup lists the server too: membership checks leave it out, and a kill waits for
  it to leave (CommandCgroup.server_leaving). A small watchdog (`sh`, in its
  own session, reading a pipe only the server holds) kills the server's subtree when the
  server dies, even by SIGKILL; and a server that starts removes what a crashed predecessor
  left in the same parent cgroup (a `rexec.<pid>.<start>` directory whose process is gone).
  This assumes the servers sharing a parent cgroup share a pid namespace.
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
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from rexec.errors import ConfigError, ExecError

__all__ = ["CommandCgroup", "Containment", "containment", "use_containment"]

Mode = Literal["cgroup", "pdeathsig", "group"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_SWEEP_INTERVAL = 0.1  # seconds between two scans of /proc for inherited escapees
# A cgroup move this soon after the last one finds the kernel's lock still warm (it cools
# one RCU grace period after the last move, 5-20 ms here): it is made on the loop at once.
_WARM_MOVE = 0.002
_SUBTREE = re.compile(r"^rexec\.(\d+)\.(\d+)$")
_WATCHDOG_NAME = "rexec-cgroup-watchdog"
# Runs when the server's end of the pipe closes (exit, crash, SIGKILL): kill the subtree, then
# remove its directories once empty (bounded: 50 tries, 0.1 s apart).
_WATCHDOG = """
read _ignored
root=$1
if [ -e "$root/cgroup.kill" ]; then echo 1 > "$root/cgroup.kill"; fi
i=0
while [ $i -lt 50 ]; do
  for d in "$root"/*/; do
    [ -e "$d/cgroup.procs" ] || continue
    [ -e "$root/cgroup.kill" ] || while read p; do kill -9 "$p"; done < "$d/cgroup.procs"
    rmdir "$d"
  done
  rmdir "$root" && exit 0
  [ -d "$root" ] || exit 0
  i=$((i + 1))
  sleep 0.1
done
"""


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    """A small kernel file, whole: cheaper than open() (no buffering or text layers), which
    made the two membership checks of every command's end cost ~0.1 ms."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): a pid plus this names a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])


def _prctl() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn: Callable[..., int] = libc.prctl
    return fn


# ---- cgroups ------------------------------------------------------------------------------


def _own_cgroup() -> Path:
    """This process's cgroup v2 directory; CgroupUnavailable names what is missing."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {exc.strerror}") from None
    own = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if own is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy (only cgroup v1)")
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                if fields[3] != "/":
                    raise CgroupUnavailable(f"cgroup2 mounted from {fields[3]}, not its root")
                mount = fields[4]
                break
    if mount is None:
        raise CgroupUnavailable("cgroup2 is not mounted")
    home = Path(mount) / own.lstrip("/")
    if own.endswith(" (deleted)") or not home.is_dir():
        raise CgroupUnavailable(f"our cgroup {own} is not visible at {home}")
    return home


class CgroupUnavailable(Exception):
    """Why this server cannot put commands in cgroups (auto mode falls back)."""


class CommandCgroup:
    """One command's cgroup: signal, kill and remove everything in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir = str(path)
        # Set when the server forked the command from inside this cgroup: done once the
        # server has moved out (see the module docstring). Until then the server is listed.
        self.server_leaving: Future[None] | None = None

    def _server_out(self) -> bool:
        f = self.server_leaving
        return f is None or f.done()

    def pids(self) -> list[int]:
        """The processes in the cgroup, the server itself left out."""
        me = os.getpid()
        try:
            listed = _read(f"{self._dir}/cgroup.procs")
        except OSError:
            return []
        return [pid for pid in map(int, listed.split()) if pid != me]

    def populated(self) -> bool:
        """Does a live process remain? (A zombie leader does not count, nor the server.)"""
        if not self._server_out():
            return bool(self.pids())
        try:
            return b"populated 1" in _read(f"{self._dir}/cgroup.events")
        except FileNotFoundError:
            return False

    def signal(self, signum: int) -> None:
        """Send signum to every process in the cgroup; SIGKILL is cgroup.kill (no fork race)."""
        if signum == signal.SIGKILL:
            self.kill()
            return
        if self._server_out():  # (else it is listed, as it leaves: pids() leaves it out)
            _check_not_inside(self.path)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def kill(self) -> None:
        if self.server_leaving is not None:  # wait (one grace period at most) until it left
            with contextlib.suppress(Exception):  # a failed move: the check below refuses
                self.server_leaving.result()
        _check_not_inside(self.path)
        try:
            _write(self.path / "cgroup.kill", "1")
            return
        except FileNotFoundError:  # kernel < 5.14: freeze, then kill what is listed
            pass
        with contextlib.suppress(OSError):
            _write(self.path / "cgroup.freeze", "1")
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir; False while a process (or a D-state one, or the server) is still inside."""
        if not self._server_out():
            return False
        try:
            os.rmdir(self._dir)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _check_not_inside(path: Path) -> None:
    """Never signal a cgroup the server itself is in (a failed move back would do that)."""
    with open("/proc/self/cgroup") as f:
        own = next((ln[3:].strip() for ln in f if ln.startswith("0::")), "")
    if str(path).endswith(own) and own not in ("", "/"):
        raise ExecError(f"refusing to kill cgroup {path}: the server is in it")


class _Cgroups:
    """This server's subtree: `home/rexec.<pid>.<start>/`, one directory per command."""

    def __init__(self, home: Path) -> None:
        self.home = home
        pid = os.getpid()
        self.root = home / f"rexec.{pid}.{_start_time(pid)}"
        self._count = 0
        self._leftover: list[CommandCgroup] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd = -1
        # staging (see the module docstring): the cgroup the server stands in, ready for the
        # next command; the helper thread's move in progress; None/None: move per spawn
        self._staged: CommandCgroup | None = None
        self._moving: Future[None] | None = None
        self._mover: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0  # spawns waiting in ready() for a move to end
        self._last_move = -1.0  # loop time the last move ended

    def create(self) -> None:
        """Make our subtree and prove we can move into it and back (else CgroupUnavailable)."""
        try:
            self.root.mkdir(mode=0o755)
            probe = self.root / "probe"
            probe.mkdir()
            try:
                _write(probe / "cgroup.procs", "0")
                _write(self.home / "cgroup.procs", "0")
            finally:
                probe.rmdir()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.root.rmdir()
            raise CgroupUnavailable(f"cannot use {self.home}: {exc.strerror}") from None

    def start_watchdog(self) -> int:
        read_end, self._watchdog_fd = os.pipe()  # both close-on-exec; stdin is dup'ed
        try:
            self._watchdog = subprocess.Popen(
                ["/bin/sh", "-c", _WATCHDOG, _WATCHDOG_NAME, str(self.root)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        return self._watchdog.pid

    def reap_predecessors(self) -> tuple[int, int]:
        """Kill and remove subtrees whose server is gone: (subtrees, processes) removed."""
        trees = procs = 0
        for entry in os.scandir(self.home):
            m = _SUBTREE.match(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            pid, start = int(m[1]), int(m[2])
            if _start_time(pid) == start:
                continue  # a live server (this one, or another sharing the cgroup)
            tree = Path(entry.path)
            children = _child_cgroups(tree)
            procs += sum(len(c.pids()) for c in children)
            _kill_tree(tree, children)
            trees += 1
        return trees, procs

    def stage(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, stand in the next command's cgroup (the first move starts now)."""
        self._loop = loop
        self._mover = ThreadPoolExecutor(1, thread_name_prefix="rexec-cgroup")
        self._advance()

    def _advance(self) -> Future[None]:
        """Start moving the server into a fresh cgroup, in the helper thread."""
        assert self._mover is not None and self._loop is not None
        self._count += 1
        path = self.root / f"c{self._count}"
        loop = self._loop
        fut = self._mover.submit(self._move_to, path)
        self._moving = fut
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._moved, f, path))
        return fut

    def _warm(self) -> bool:
        """Did a move end so recently that the next one waits for no grace period?"""
        assert self._loop is not None
        return self._loop.time() - self._last_move < _WARM_MOVE

    def _advance_now(self) -> None:
        """As _advance, on the loop: when forks queue up (a burst of commands) or a move
        just ended, this one waits for no grace period (~50 us), and a thread hop per fork
        would serialise a burst behind the helper thread."""
        self._count += 1
        path = self.root / f"c{self._count}"
        try:
            self._move_to(path)
        except OSError:  # back home (or failed to): each command moves the server again
            if self._mover is not None:
                self._mover.shutdown(wait=False)
                self._mover = None
            return
        self._staged = CommandCgroup(path)
        assert self._loop is not None
        self._last_move = self._loop.time()

    def _move_to(self, path: Path) -> None:
        """In the helper thread: mkdir and move in; on failure go home (and stop staging)."""
        try:
            path.mkdir()
            _write(path / "cgroup.procs", "0")
        except OSError:
            _write(self.home / "cgroup.procs", "0")
            with contextlib.suppress(OSError):
                path.rmdir()
            raise

    def _moved(self, fut: Future[None], path: Path) -> None:
        """On the loop, once a move is over: the new staging cgroup; remove what finished."""
        if fut is not self._moving:
            return  # close() took over
        self._moving = None
        if fut.exception() is None:
            self._staged = CommandCgroup(path)
            assert self._loop is not None
            self._last_move = self._loop.time()
        elif self._mover is not None:  # back home: each command moves the server again
            self._mover.shutdown(wait=False)
            self._mover = None
        self._remove_leftover()

    async def ready(self) -> None:
        """Wait for a move in progress: the next fork must happen in a fresh cgroup."""
        while self._moving is not None:
            self._waiting += 1
            try:
                with contextlib.suppress(Exception):  # a failed move: new() creates one
                    await asyncio.wrap_future(self._moving)
            finally:
                self._waiting -= 1

    def new(self) -> CommandCgroup:
        if self._staged is not None and self._moving is None:
            return self._staged
        self._count += 1
        path = self.root / f"c{self._count}"
        try:
            path.mkdir()
        except OSError as exc:
            raise ExecError(f"cannot create a cgroup for the command: {exc.strerror}") from None
        return CommandCgroup(path)

    @contextlib.contextmanager
    def inside(self, cg: CommandCgroup) -> Iterator[None]:
        """The server stands in cg while it forks, so the child starts there."""
        if cg is self._staged:  # already there: leave in the background, after the fork
            self._staged = None
            try:
                yield
            finally:
                if self._waiting or self._warm():
                    self._advance_now()
                else:
                    cg.server_leaving = self._advance()
            return
        try:
            _write(cg.path / "cgroup.procs", "0")
        except OSError as exc:
            raise ExecError(f"cannot enter the command's cgroup: {exc.strerror}") from None
        try:
            yield
        finally:
            _write(self.home / "cgroup.procs", "0")

    def release(self, cg: CommandCgroup) -> None:
        """Remove a finished command's cgroup (later, if something is still dying in it)."""
        if cg is self._staged:
            return  # nothing was forked in it (the spawn failed before): it stays staged
        self._leftover.append(cg)
        if self._moving is None:  # else after the move: rmdir would wait for it in the kernel
            self._remove_leftover()

    def _remove_leftover(self) -> None:
        self._leftover = [c for c in self._leftover if not c.remove()]

    def close(self) -> None:
        moving, self._moving = self._moving, None
        if moving is not None:
            with contextlib.suppress(Exception):
                moving.result()
        if self._mover is not None:
            self._mover.shutdown(wait=True)
            self._mover = None
        self._staged = None
        with contextlib.suppress(OSError):  # out of the subtree before it is killed
            _write(self.home / "cgroup.procs", "0")
        _kill_tree(self.root, _child_cgroups(self.root))
        if self._watchdog_fd >= 0:
            os.close(self._watchdog_fd)  # the watchdog wakes, finds nothing, exits
            self._watchdog_fd = -1
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(2)


def _child_cgroups(tree: Path) -> list[CommandCgroup]:
    try:
        return [CommandCgroup(Path(d.path)) for d in os.scandir(tree) if d.is_dir()]
    except OSError:  # removed meanwhile
        return []


def _kill_tree(tree: Path, children: list[CommandCgroup]) -> None:
    """cgroup.kill a subtree, then remove its directories (bounded wait for the dying)."""
    try:
        _write(tree / "cgroup.kill", "1")
    except FileNotFoundError:
        for c in children:
            c.kill()
    except OSError:
        pass
    deadline = time.monotonic() + 2.0
    while True:
        left = [c for c in children if not c.remove()]
        if not left:
            with contextlib.suppress(OSError):
                tree.rmdir()
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
        children = left


# ---- the process-wide choice --------------------------------------------------------------


class Containment:
    """How this process keeps commands contained; see the module docstring."""

    def __init__(self, mode: Mode = "group", *, keep_orphans: bool = False) -> None:
        self.mode: Mode = mode
        self.keep_orphans = keep_orphans
        self.reason = ""  # why cgroups are not used, when they are not
        self._cgroups: _Cgroups | None = None
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
                cgroups = _Cgroups(_own_cgroup())
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
