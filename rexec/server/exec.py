"""Process lifetime for one command: pump pipes, deadline, signals, group kill, reap.

This layer knows nothing of frames or sockets. The session layer hands in an ExecSpec and an
async OutputSink, feeds stdin, and gets one ExecOutcome back. The sink's slowness is the
backpressure: a pipe is read only while its sink is ready, so a slow client blocks the child on
a full pipe instead of growing our memory.

The command runs in its own session and process group; every kill acts on the whole group, and
nothing in the group outlives the command. Where the server set up cgroups
(rexec.server.contain), "the group" is the command's cgroup instead: a process that left the
process group (setsid) is still in it, and the kill is cgroup.kill. Linux only: pidfd_open
(kernel 5.3+) tells us the leader exited without reaping it, and /proc tells live group
members from zombies. The spawn itself (pipes or pty, signal dispositions, the fork in the
command's cgroup) is rexec.server.spawn's.

With a pty (rexec.server.pty), the command's output is one stream (1), read from the master,
and stdin is written to the master. A job-control shell there runs jobs in groups of their own
within the command's session, so without a cgroup "the group" is every group of that session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import Protocol

from rexec.protocol.events import Stream
from rexec.server.cgroup import CommandCgroup
from rexec.server.contain import containment
from rexec.server.procfs import live_members
from rexec.server.pty import session_groups, set_winsize
from rexec.server.spawn import ExecSpec, spawn

__all__ = ["ExecOutcome", "Execution", "OutputSink"]

# Once the group is dead, how long we still wait for pipe EOF. Only a process that escaped the
# group (setsid) can hold a pipe that long; after this we close our ends and finish.
_DRAIN_BOUND = 1.0
# After SIGKILL, how long we wait for group members to disappear (uninterruptible sleep).
_KILL_BOUND = 2.0
_PTY_READ = 64 * 1024  # the most a pty's output is read at once
# A pump whose sink never suspends yields to the loop after this much output: often enough
# for the deadline and the other pipe (~1 ms of work), rarely enough that a download does not
# pay a loop turn (an epoll_wait and the loop's bookkeeping) for every 256 KiB frame.
_YIELD_EVERY = 1024 * 1024


@dataclass(frozen=True)
class ExecOutcome:
    """How the command ended; everything the EXIT frame and the audit record need."""

    exit_code: int | None  # 0..255 when the leader exited; None when killed by a signal
    signal: int | None  # the signal that killed the leader, else None
    timed_out: bool  # the deadline fired (then signal is normally SIGTERM or SIGKILL)
    duration: float  # seconds, monotonic, start to reap
    stdout_bytes: int
    stderr_bytes: int


class OutputSink(Protocol):
    """Receives output; returning means "ready for more" (backpressure: see module doc).

    `data` is a fresh buffer, the sink's to keep: ExecSpec.headroom free bytes, then the
    output (the pipe is read straight into it, so a sink that frames it copies nothing).

    A sink may also have `send_now(stream, data) -> bool`: take the data (the same kind of
    buffer) at once if it can without waiting, else False, and the data comes again through
    the call. A pty's output then goes out from the loop's readiness callback itself: a
    keystroke's echo skips the pump task's wake-up, a loop turn and two selector changes.
    """

    async def __call__(self, stream: Stream, data: bytearray) -> None: ...


class _Pump:
    """State of one output pipe; shared by its pump task and the supervisor."""

    __slots__ = ("error", "fd", "nbytes", "owed", "pending", "stream", "task", "waiter", "watched")

    def __init__(self, stream: Stream, fd: int) -> None:
        self.stream = stream
        self.fd = fd
        self.nbytes = 0  # bytes the sink accepted
        self.owed = 0  # bytes in the pipe when the group died: delivered whatever the time
        self.waiter: asyncio.Future[None] | None = None  # set while waiting for readability
        self.task: asyncio.Task[None] | None = None
        # the send_now path (a pty's): what the callback read and left for the pump
        # (b"": end of file), a failure of send_now, and whether the reader stays registered
        self.pending: bytearray | None = None
        self.error: Exception | None = None
        self.watched = False


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _pending_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder)


class Execution:
    """One running command; start() it, then wait() for its outcome (or kill() it).

    Background tasks: one pump per output pipe and a supervisor that owns the deadline, the
    group kill, the reap and the final drain. All are finished when wait() or kill() returns.
    If the sink raises, the output has nowhere to go: the command is killed as on a disconnect
    and wait() re-raises the sink's exception (the outcome stays readable in `outcome`).
    """

    def __init__(
        self,
        spec: ExecSpec,
        sink: OutputSink,
        proc: subprocess.Popen[bytes],
        cgroup: CommandCgroup | None = None,
    ) -> None:
        self._spec = spec
        self._cgroup = cgroup
        self._contain = containment()
        self._sink = sink
        self._proc = proc
        self._pid = proc.pid
        self._loop = asyncio.get_running_loop()
        self._t0 = time.monotonic()
        self._t_reaped: float | None = None
        self._returncode: int | None = None
        self._group_gone = False  # observed empty: from now on never signal the pgid
        self._cgroup_empty = False  # the cgroup observed empty after the reap: no need to kill
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._kill_req: asyncio.Future[None] = self._loop.create_future()
        self._pumps: list[_Pump] = []
        self._stdin_fd = -1
        self._stdin_lock = asyncio.Lock()
        self._stdin_waiter: asyncio.Future[None] | None = None
        self._pidfd = -1
        self._drain_deadline: float | None = None
        self._sink_error: BaseException | None = None
        send_now = getattr(sink, "send_now", None) if spec.pty is not None else None
        self._send_now: Callable[[Stream, bytearray], bool] | None = send_now
        # a pty returns at most what its buffer holds (a few KiB): no use zeroing 256 KiB
        self._read_size = min(spec.chunk_size, _PTY_READ) if spec.pty else spec.chunk_size
        self._outcome: ExecOutcome | None = None
        self._supervisor: asyncio.Task[ExecOutcome] | None = None

    # ---------------------------------------------------------------- start

    @classmethod
    async def start(cls, spec: ExecSpec, sink: OutputSink) -> Execution:
        """Spawn the command in its own session and start pumping; raise ExecError if it can't."""
        child = await spawn(spec)
        self = cls(spec, sink, child.proc, child.cgroup)
        self._t0 = child.t0
        self._pidfd = child.pidfd
        self._loop.add_reader(self._pidfd, self._on_exit)
        if spec.stdin:
            self._stdin_fd = child.stdin_fd
            os.set_blocking(child.stdin_fd, False)
        for stream, fd in child.outputs:
            os.set_blocking(fd, False)
            pump = _Pump(stream, fd)
            pump.task = self._loop.create_task(self._pump(pump))
            self._pumps.append(pump)
        self._supervisor = self._loop.create_task(self._supervise())
        return self

    # ---------------------------------------------------------------- public

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id and the session id."""
        return self._pid

    @property
    def outcome(self) -> ExecOutcome | None:
        """The outcome once the command is fully finished, else None."""
        return self._outcome

    async def write_stdin(self, data: bytes | bytearray) -> None:
        """Write all of data, waiting while the pipe is full (backpressure towards the client).

        Dropped silently when the child closed its stdin, stdin was not requested, or the
        command has finished: the client may race such writes and they are not errors.
        """
        async with self._stdin_lock:
            view = memoryview(data)
            while view:
                fd = self._stdin_fd
                if fd < 0:
                    return
                n = self._write_some(fd, view)
                if n < 0:
                    await self._writable(fd)
                    continue
                view = view[n:]

    def write_stdin_now(self, data: bytes | bytearray) -> int:
        """What of data the pipe (or pty) takes at once, without waiting: how much it took.

        0 while a write_stdin() waits (order is kept). Saves an interactive key the trip
        through a task; the caller hands the rest to write_stdin(). Dropped data counts as
        taken, as in write_stdin().
        """
        fd = self._stdin_fd
        if fd < 0:
            return len(data)
        if self._stdin_lock.locked():
            return 0
        return max(0, self._write_some(fd, data))

    def _write_some(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """One write to stdin: bytes written; -1 if it is full; all of data when it is gone
        (the child closed it, or a pty's every slave is closed: EIO)."""
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return -1
        except (BrokenPipeError, ConnectionResetError):
            self._close_stdin_now()
            return len(data)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._close_stdin_now()
            return len(data)

    async def close_stdin(self) -> None:
        """EOF to the child, after any write in progress; idempotent."""
        async with self._stdin_lock:
            self._close_stdin_now()

    def signal(self, signum: int) -> None:
        """Send signum to the whole process group; a no-op once the group is gone."""
        self._killpg(signum)

    def resize(self, rows: int, cols: int) -> None:
        """A pty command's new window size (SIGWINCH to its foreground job); else a no-op."""
        if self._spec.pty is not None and self._pumps and self._pumps[0].fd >= 0:
            with contextlib.suppress(OSError):  # the terminal is closing
                set_winsize(self._pumps[0].fd, rows, cols)

    async def kill(self) -> None:
        """Disconnect/shutdown: SIGTERM the group, kill_grace, SIGKILL, reap; idempotent.

        Output still in the pipes is discarded (nobody is left to receive it).
        """
        _wake(self._kill_req)
        assert self._supervisor is not None
        with contextlib.suppress(Exception):  # a sink failure is wait()'s to report
            await asyncio.shield(self._supervisor)

    async def wait(self) -> ExecOutcome:
        """The outcome, once the leader is reaped and all its output went to the sink.

        Idempotent. Cancelling wait() does not stop the command: use kill() for that.
        """
        assert self._supervisor is not None
        outcome = await asyncio.shield(self._supervisor)
        if self._sink_error is not None:
            raise self._sink_error
        return outcome

    # ---------------------------------------------------------------- pumps

    async def _pump(self, p: _Pump) -> None:
        """Read one pipe into the sink; the next read happens only once the sink returned."""
        loop = self._loop
        size = self._read_size
        head = self._spec.headroom
        sink = self._sink
        unyielded = 0
        try:
            while True:
                if p.error is not None:
                    raise p.error
                deadline = self._drain_deadline
                if deadline is not None and p.owed <= 0 and loop.time() >= deadline:
                    return
                if p.pending is not None:  # read by _read_now: the sink wants to be awaited
                    data, p.pending = p.pending, None
                    n = len(data) - head
                else:
                    data = bytearray(head + size)
                    try:
                        with memoryview(data) as view:
                            n = os.readv(p.fd, [view[head:]])
                    except BlockingIOError:
                        del data  # a quiet pipe must not pin a chunk's worth of memory
                        if deadline is None:
                            await self._readable(p, None)
                        else:
                            remaining = deadline - loop.time()
                            if remaining <= 0:
                                return
                            await self._readable(p, remaining)
                        continue
                    except OSError as exc:  # a pty master once every slave is closed: EOF
                        if exc.errno != errno.EIO:
                            raise
                        return
                    if n < size:
                        del data[head + n :]
                if n <= 0:
                    return
                p.owed -= n
                await sink(p.stream, data)
                p.nbytes += n
                # A sink that never suspends would let a fast child starve the loop (deadline,
                # the other pipe): yield after every _YIELD_EVERY bytes of full chunks.
                if n == size:
                    unyielded += n
                    if unyielded >= _YIELD_EVERY:
                        unyielded = 0
                        await asyncio.sleep(0)
        except Exception as exc:  # the sink failed: the output has nowhere to go
            if self._sink_error is None:
                self._sink_error = exc
            _wake(self._kill_req)
        finally:
            self._close_pump(p)

    async def _readable(self, p: _Pump, timeout: float | None) -> None:
        """Wait until p.fd is readable, the timeout passes, or the supervisor wakes us.

        With send_now, the reader stays registered between waits and reads by itself
        (_read_now); it wakes us only for what the sink cannot take at once.
        """
        fut = self._loop.create_future()
        direct = self._send_now is not None
        if not direct:
            self._loop.add_reader(p.fd, _wake, fut)
        elif not p.watched:
            self._loop.add_reader(p.fd, self._read_now, p)
            p.watched = True
        timer = None if timeout is None else self._loop.call_later(timeout, _wake, fut)
        p.waiter = fut
        try:
            await fut
        finally:
            p.waiter = None
            if timer is not None:
                timer.cancel()
            if not direct:
                self._loop.remove_reader(p.fd)

    def _read_now(self, p: _Pump) -> None:
        """p.fd is readable while its pump waits: read, and hand the data to send_now."""
        send_now = self._send_now
        assert send_now is not None
        if p.waiter is None or p.waiter.done():  # the pump is busy: it will read itself
            self._loop.remove_reader(p.fd)  # (level-triggered: would fire until then)
            p.watched = False
            return
        try:
            raw = os.read(p.fd, self._read_size)
        except BlockingIOError:  # already read (a readiness event from before)
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a pty master once every slave is closed
                p.error = exc
            raw = b""
        data = bytearray(self._spec.headroom)  # the sink's buffer: headroom, then the output
        data += raw
        try:
            if raw and send_now(p.stream, data):
                p.owed -= len(raw)
                p.nbytes += len(raw)
                return
        except Exception as exc:  # the pump reports it, as a failing sink call
            p.error = exc
        p.pending = data  # end of file, or the sink wants to be awaited: the pump's turn
        _wake(p.waiter)

    def _close_pump(self, p: _Pump) -> None:
        if p.fd >= 0:
            self._loop.remove_reader(p.fd)
            os.close(p.fd)
            p.fd = -1

    # ---------------------------------------------------------------- stdin

    async def _writable(self, fd: int) -> None:
        fut = self._loop.create_future()
        self._loop.add_writer(fd, _wake, fut)
        self._stdin_waiter = fut
        try:
            await fut
        finally:
            self._stdin_waiter = None
            if self._stdin_fd == fd:
                self._loop.remove_writer(fd)

    def _close_stdin_now(self) -> None:
        """Close our end of stdin, waking a writer blocked on a full pipe (it then drops)."""
        fd = self._stdin_fd
        if fd < 0:
            return
        self._stdin_fd = -1
        self._loop.remove_writer(fd)
        if self._stdin_waiter is not None:
            _wake(self._stdin_waiter)
        os.close(fd)

    # ---------------------------------------------------------------- supervisor

    def _on_exit(self) -> None:
        """The pidfd is readable: the leader exited (it stays a zombie until _reap)."""
        self._loop.remove_reader(self._pidfd)
        _wake(self._exited)

    def _reap(self) -> None:
        if self._returncode is None:
            self._returncode = self._proc.wait()  # a zombie: returns at once
            self._t_reaped = time.monotonic()

    def _killpg(self, signum: int) -> None:
        """Signal the group unless it is known to be gone.

        pid reuse: while the leader is unreaped, its zombie holds the pid, so the pgid cannot
        name another group. After the reap, remaining members still hold the pgid and we stop
        signalling as soon as we see the group empty. The residual race: the last member dies
        and the kernel hands the same number to a new group leader between our check and our
        kill() -- that needs the pid space (pid_max) to wrap within that instant.
        """
        if self._group_gone or self._outcome is not None:
            return
        try:
            os.killpg(self._pid, signum)
        except ProcessLookupError:
            if self._returncode is not None:
                self._group_gone = True
        except PermissionError:  # a member we may not signal (setuid); nothing we can do
            pass
        if self._spec.pty is not None:  # the jobs of a shell on the pty: same session
            for pgid in session_groups(self._pid) - {self._pid}:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signum)

    def _kill_all(self, signum: int) -> None:
        """Signal everything the command started: its cgroup if it has one, else its group."""
        if self._cgroup is not None:
            self._cgroup.signal(signum)
        else:
            self._killpg(signum)

    def _group_alive(self) -> bool:
        """After the reap: does a live (non-zombie) member of the group (or cgroup) remain?"""
        if self._cgroup is not None:
            if self._cgroup_empty or not self._cgroup.populated():
                self._cgroup_empty = True  # no process of the command can enter it again
                return False
            return True
        if self._group_gone:
            return False
        try:
            os.killpg(self._pid, 0)
        except ProcessLookupError:
            self._group_gone = True
            return False
        except PermissionError:
            pass
        if not live_members(self._pid) and not (
            self._spec.pty is not None and session_groups(self._pid)
        ):
            self._group_gone = True  # only zombies left: nothing runs, nothing to signal
            return False
        return True

    async def _group_gone_by(self, deadline: float) -> bool:
        """Poll (the kernel cannot notify us) until the group is gone or the deadline passes."""
        delay = 0.002
        while self._group_alive():
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        return True

    async def _terminate(self) -> None:
        """SIGTERM (and SIGCONT, for stopped members) the group, kill_grace, SIGKILL, reap."""
        grace = self._spec.kill_grace
        kill_at = self._loop.time() + grace
        self._kill_all(SIGTERM)
        self._kill_all(SIGCONT)
        if self._returncode is None:
            await asyncio.wait({self._exited}, timeout=grace)
            if self._exited.done():
                self._reap()
        if self._returncode is not None and await self._group_gone_by(kill_at):
            return
        self._kill_all(SIGKILL)
        if self._returncode is None:
            await self._exited  # SIGKILL cannot be caught
            self._reap()
        await self._group_gone_by(self._loop.time() + _KILL_BOUND)

    async def _drain(self) -> None:
        """Deliver what is left in the pipes: all bytes present now, then EOF or the bound."""
        live = [p for p in self._pumps if p.task is not None and not p.task.done()]
        if not self._kill_req.done():
            for p in live:
                if p.fd >= 0:
                    p.owed = _pending_bytes(p.fd)
            self._drain_deadline = self._loop.time() + _DRAIN_BOUND
            for p in live:
                if p.waiter is not None:  # re-check the pipe, now with the deadline
                    _wake(p.waiter)
        tasks = {p.task for p in live if p.task is not None}
        while tasks and not self._kill_req.done():
            await asyncio.wait(tasks | {self._kill_req}, return_when=asyncio.FIRST_COMPLETED)
            tasks = {t for t in tasks if not t.done()}
        if tasks:  # kill(): nobody is left to receive the output
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)

    async def _supervise(self) -> ExecOutcome:
        """Own the command's end: deadline or kill, the group's death, the reap, the drain."""
        spec = self._spec
        timed_out = False
        try:
            timeout = None
            if spec.timeout is not None:
                timeout = max(0.0, self._t0 + spec.timeout - time.monotonic())
            await asyncio.wait(
                {self._exited, self._kill_req}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if self._exited.done():
                self._reap()
                # e.g. `sleep 1000 &` left behind by a shell, unless keep_orphans lets it live
                if not self._contain.keep_orphans and self._group_alive():
                    await self._terminate()
            else:
                timed_out = not self._kill_req.done()
                await self._terminate()
            await self._drain()
        finally:
            await self._cleanup()
        rc = self._returncode
        if rc is None:  # SIGKILLed but stuck in the kernel (D state); Popen reaps it later
            rc = -SIGKILL
        assert self._t_reaped is not None
        self._outcome = ExecOutcome(
            exit_code=rc if rc >= 0 else None,
            signal=-rc if rc < 0 else None,
            timed_out=timed_out,
            duration=self._t_reaped - self._t0,
            stdout_bytes=sum(p.nbytes for p in self._pumps if p.stream == Stream.STDOUT),
            stderr_bytes=sum(p.nbytes for p in self._pumps if p.stream == Stream.STDERR),
        )
        return self._outcome

    async def _cleanup(self) -> None:
        """Leave nothing behind, even if the supervisor was cancelled or failed."""
        if self._returncode is None:  # only on cancellation or a bug: no grace, no hang
            self._kill_all(SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._returncode = self._proc.wait(timeout=5)
            self._t_reaped = time.monotonic()
        pending = [p.task for p in self._pumps if p.task is not None and not p.task.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for p in self._pumps:
            self._close_pump(p)
        self._close_stdin_now()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._cgroup is not None and not self._cgroup_empty and self._cgroup.populated():
            self._cgroup.kill()  # the channel ends: nothing in its cgroup lives on
        self._contain.finished(self._pid, self._cgroup)
