"""Cgroup v2 containment ("cgroup" mode of rexec.server.contain): the server's subtree.

Each command runs in its own cgroup v2, `<own cgroup>/rexec.<pid>.<start>/c<n>`, created where
the server can write (as root, or in a subtree delegated to its user, as systemd's
Delegate=yes gives). Ending a channel signals and then kills the whole cgroup (cgroup.kill),
so nothing escapes: not `setsid`, not a double fork. The child is forked inside its cgroup
with no code run in it: the server stands in the next command's cgroup before the command
arrives and forks (vfork) there, so the child is born inside; a helper thread then moves the
server on into a fresh cgroup for the command after. Moving a process between cgroups waits
for an RCU grace period whenever no move happened in the last few milliseconds (5-20 ms here:
the kernel's cgroup_threadgroup_rwsem), which a move before each fork put on every command's
critical path; now no move waits in front of a command unless commands arrive faster than the
moves complete. Until the server has left, the command's cgroup lists the server too:
membership checks leave it out, and a kill waits for it to leave
(CommandCgroup.server_leaving). A small watchdog (`sh`, in its own session, reading a pipe
only the server holds) kills the server's subtree when the server dies, even by SIGKILL; and
a server that starts removes what a crashed predecessor left in the same parent cgroup (a
`rexec.<pid>.<start>` directory whose process is gone). This assumes the servers sharing a
parent cgroup share a pid namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rexec.errors import ExecError

__all__ = ["CgroupUnavailable", "Cgroups", "CommandCgroup", "own_cgroup"]

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


def own_cgroup() -> Path:
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


class Cgroups:
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
