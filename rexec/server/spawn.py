"""Spawning one command: its pipes or pty, its signals, the fork in its cgroup, preexec.

`spawn()` starts the command described by an ExecSpec and hands back what the process
lifetime (rexec.server.exec) works with: the Popen, a pidfd, our ends of the pipes. The
command runs in its own session and process group; where the server set up cgroups
(rexec.server.contain) it is forked inside the command's cgroup, with no code run in it.

Signals: a command starts with every signal at its default disposition and an empty signal
mask, as under ssh, whatever the server inherited (`nohup rexec serve &` ignores SIGHUP, a
background job of a script ignores SIGINT and SIGQUIT). No preexec_fn resets them in the
child: it is unsafe once the process has threads and costs the vfork fast path (+4 ms a
spawn in a server-sized process, measured); only the no-cgroup fallback of
rexec.server.contain pays that, for prctl.
Instead `prepare_signals()` uses what execve does: it resets a *caught* signal to its default
but keeps an *ignored* one ignored. So the server never ignores a signal: one it inherited as
ignored it catches with a handler that does nothing (the same effect for the server), and it
unblocks its signal mask, which children inherit. Exceptions: SIGPIPE and SIGXFSZ, which
Python ignores for itself and Popen's restore_signals resets in the child; and SIGTTOU, where
a handler would make a background server's terminal writes retry forever under `stty
tostop` (job-control shells never ignore it for their jobs); and glibc's own real-time signals
32 and 33, which the C library refuses to change (GNU make 4.3 starts children with them
ignored; no program can reset them through libc, sshd included).

With a pty (rexec.server.pty), the command's stdin, stdout and stderr are the terminal's
slave and its controlling terminal; its output is one stream (1), read from the master, and
stdin is written to the master. Making the terminal the controlling one needs a preexec_fn
(an ioctl only the child can make for itself): pty commands, interactive by nature, pay the
vfork cost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import os
import signal as _signal
import subprocess
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from signal import SIGKILL
from typing import Any

from rexec.errors import ExecError
from rexec.protocol.events import Stream
from rexec.protocol.pty import PtyRequest
from rexec.server.cgroup import CommandCgroup
from rexec.server.contain import containment
from rexec.server.pty import controlling_terminal, open_pty

__all__ = ["ExecSpec", "Spawned", "prepare_signals", "spawn"]

# Kernel pipe buffer we ask for: bigger than the 64 KiB default lets one read() return a whole
# chunk and lets the child keep writing while the sink is busy. Memory stays bounded by it.
_PIPE_SIZE = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


# Left ignored if inherited so: see the module docstring.
_KEEP_IGNORED = frozenset({_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGTTOU})
# signal's C core: the same calls without signal.py's IntEnum conversions, which made
# prepare_signals() cost ~200 us a spawn (one enum lookup per signal and call); now ~10 us.
_csignal: Any = importlib.import_module("_signal")


def _ignore(_signum: int, _frame: types.FrameType | None) -> None:
    """Catch-and-ignore: for the server what SIG_IGN was; for a child, default after exec."""


def prepare_signals() -> None:
    """Make sure children start with default signal dispositions and nothing blocked.

    Idempotent and cheap (a table lookup per signal, one sigprocmask); the server calls it
    at start and every spawn calls it again. Needs the main thread, where
    asyncio runs the server; elsewhere it does what it may.
    """
    ignored = _csignal.SIG_IGN
    for signum in _csignal.valid_signals():
        if signum in _KEEP_IGNORED:
            continue
        try:
            if _csignal.getsignal(signum) == ignored:
                _csignal.signal(signum, _ignore)
        except (OSError, ValueError):  # not settable, or not the main thread
            continue
    blocked = _csignal.pthread_sigmask(_csignal.SIG_BLOCK, ())
    if blocked:
        _csignal.pthread_sigmask(_csignal.SIG_UNBLOCK, blocked)


@dataclass(frozen=True)
class ExecSpec:
    """What to run and how; validated by the session layer, checked for sanity here."""

    argv: tuple[str, ...]  # exact argv; a shell command line arrives as ("/bin/sh", "-c", cmd)
    env: Mapping[str, str]  # the complete environment of the child
    cwd: str | None = None
    stdin: bool = False  # False: the child gets EOF at once (stdin from /dev/null)
    timeout: float | None = None  # server-enforced deadline in seconds, from start
    kill_grace: float = 2.0  # seconds between SIGTERM and SIGKILL
    chunk_size: int = 256 * 1024  # max bytes handed to the sink at once
    headroom: int = 0  # free bytes in front of each chunk: the sink frames it in place
    # run-as (a token policy, root servers only): Popen's user=, group=, extra_groups=
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    pty: PtyRequest | None = None  # run on a pseudo-terminal: one output stream, TERM set

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {self.chunk_size}")
        if self.headroom < 0:
            raise ValueError(f"headroom must be >= 0, not {self.headroom}")
        if self.kill_grace < 0:
            raise ValueError(f"kill_grace must be >= 0, not {self.kill_grace}")
        if self.timeout is not None and self.timeout < 0:
            raise ValueError(f"timeout must be >= 0, not {self.timeout}")


def _pipe() -> tuple[int, int]:
    """A close-on-exec pipe with a larger buffer when the kernel allows it.

    Pipe buffers count against a per-user quota (fs/pipe-user-pages-soft, 64 MiB by default,
    about 85 commands with stdin at 256 KiB a pipe); past it the kernel refuses the resize or
    hands out small pipes: slower, still correct.
    """
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
    return r, w


def _chain(
    first: Callable[[], None] | None, second: Callable[[], None] | None
) -> Callable[[], None] | None:
    """One preexec_fn that runs both (either may be None)."""
    if first is None or second is None:
        return first or second

    def both() -> None:
        first()
        second()

    return both


def _spawn_error(spec: ExecSpec, exc: OSError) -> ExecError:
    """Turn Popen's OSError into a message that names the program or the directory."""
    prog = spec.argv[0]
    code = exc.errno
    if (
        spec.cwd is not None
        and exc.filename == spec.cwd
        and (exc.filename != prog or not os.path.isdir(spec.cwd))
    ):
        if code == errno.ENOENT:
            return ExecError(f"no such directory: {spec.cwd}")
        if code == errno.ENOTDIR:
            return ExecError(f"not a directory: {spec.cwd}")
        if code == errno.EACCES:
            return ExecError(f"permission denied: {spec.cwd}")
        return ExecError(f"cannot change directory to {spec.cwd}: {exc.strerror}")
    if code == errno.ENOENT:
        if "/" in prog and os.path.exists(os.path.join(spec.cwd or "", prog)):
            return ExecError(f"bad interpreter: {prog}")
        return ExecError(f"command not found: {prog}")
    if code == errno.EACCES:
        return ExecError(f"permission denied: {prog}")
    if code == errno.ENOEXEC:
        return ExecError(f"exec format error: {prog}")
    if code == errno.ENOTDIR:
        return ExecError(f"not a directory: {prog}")
    return ExecError(f"cannot execute {prog}: {exc.strerror or exc}")


@dataclass(frozen=True)
class Spawned:
    """A command just forked: what Execution takes over (its fds, pidfd and cgroup with it)."""

    proc: subprocess.Popen[bytes]
    pidfd: int  # readable once the leader exited
    t0: float  # monotonic, just before the fork
    stdin_fd: int  # our end of its stdin (non-blocking is the caller's choice); -1: none
    outputs: list[tuple[Stream, int]]  # (stream, our end)
    cgroup: CommandCgroup | None  # None unless the server uses cgroups


async def spawn(spec: ExecSpec) -> Spawned:
    """Spawn the command in its own session; raise ExecError if it can't."""
    if not spec.argv:
        raise ExecError("empty command")
    contain = containment()
    await contain.ready()  # from here to the fork, no await: the cgroup stays ours
    prepare_signals()
    t0 = time.monotonic()
    parent_fds: list[int] = []
    child_fds: list[int] = []
    proc: subprocess.Popen[bytes] | None = None
    env = dict(spec.env)
    in_child = None  # a pty's preexec_fn
    outputs: list[tuple[Stream, int]] = []  # (stream, our end)
    cgroup = contain.new_cgroup()  # None unless the server uses cgroups
    try:
        try:
            if spec.pty is not None:
                master, slave = open_pty(spec.pty)
                parent_fds.append(master)
                child_fds.append(slave)
                if spec.uid is not None:  # run-as: the terminal is the user's, as sshd does
                    os.fchown(slave, spec.uid, -1 if spec.gid is None else spec.gid)
                stdin_r = out_w = err_w = slave
                if spec.stdin:  # its own fd: closing stdin must not close the master
                    stdin_w = os.dup(master)
                    parent_fds.append(stdin_w)
                outputs.append((Stream.STDOUT, master))
                env["TERM"] = spec.pty.term
                in_child = controlling_terminal
            else:
                if spec.stdin:
                    stdin_r, stdin_w = _pipe()
                    child_fds.append(stdin_r)
                    parent_fds.append(stdin_w)
                out_r, out_w = _pipe()
                parent_fds.append(out_r)
                child_fds.append(out_w)
                err_r, err_w = _pipe()
                parent_fds.append(err_r)
                child_fds.append(err_w)
                outputs += [(Stream.STDOUT, out_r), (Stream.STDERR, err_r)]
        except OSError as exc:  # out of file descriptors
            raise ExecError(f"cannot start {spec.argv[0]}: {exc.strerror}") from exc
        try:
            with contain.spawning(cgroup) as preexec:
                proc = subprocess.Popen(
                    spec.argv,
                    stdin=stdin_r if spec.stdin or spec.pty else subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    env=env,
                    cwd=spec.cwd,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=_chain(preexec, in_child),
                    user=spec.uid,
                    group=spec.gid,
                    extra_groups=spec.groups,
                )
            contain.adopt(proc.pid)
        except OSError as exc:
            raise _spawn_error(spec, exc) from exc
        except ValueError as exc:  # NUL byte in argv/env, "=" in an env name
            raise ExecError(f"invalid command: {exc}") from exc
        try:
            pidfd = os.pidfd_open(proc.pid)  # our unreaped child: only EMFILE can fail
        except OSError as exc:
            raise ExecError(f"cannot start {spec.argv[0]}: {exc.strerror}") from exc
    except BaseException:
        if proc is not None:  # unreaped, so its pgid is still ours to signal
            os.killpg(proc.pid, SIGKILL)
            if cgroup is not None:
                cgroup.kill()
            proc.wait()
        contain.finished(proc.pid if proc is not None else 0, cgroup)
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)

    return Spawned(proc, pidfd, t0, stdin_w if spec.stdin else -1, outputs, cgroup)
