"""rexec.server.exec with a pseudo-terminal: controlling tty, one stream, size, modes, kills.

Real processes on real ptys; every test runs under asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from rexec.protocol.pty import PtyRequest
from rexec.server.exec import ExecOutcome, Execution
from rexec.server.pty import session_groups
from rexec.server.spawn import ExecSpec

T = TypeVar("T")
ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def sh(cmd: str, pty: PtyRequest | None = None, **kw: Any) -> ExecSpec:
    kw.setdefault("env", ENV)
    return ExecSpec(argv=("/bin/sh", "-c", cmd), pty=pty or PtyRequest("xterm", 24, 80), **kw)


class Collect:
    def __init__(self) -> None:
        self.out = bytearray()
        self.streams: set[int] = set()
        self.changed = asyncio.Event()

    async def __call__(self, stream: int, data: bytes) -> None:
        self.streams.add(stream)
        self.out.extend(data)
        self.changed.set()

    async def until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self.changed.clear()
            await self.changed.wait()


async def execute(s: ExecSpec) -> tuple[ExecOutcome, Collect]:
    sink = Collect()
    ex = await Execution.start(s, sink)
    return await ex.wait(), sink


def test_tty_is_controlling_terminal_and_output_is_one_stream() -> None:
    # stderr too arrives on stream 1; /dev/tty opens only with a controlling terminal
    cmd = "tty; echo err >&2; echo ctty > /dev/tty; echo TERM=$TERM; ps -o sid=,tpgid= -p $$"
    outcome, sink = run(execute(sh(cmd, PtyRequest("vt100", 24, 80))))
    assert outcome.exit_code == 0
    lines = bytes(sink.out).split(b"\r\n")
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1:4] == [b"err", b"ctty", b"TERM=vt100"]
    sid, tpgid = lines[4].split()
    assert sid == tpgid  # the shell leads its session and is the terminal's foreground
    assert sink.streams == {1}
    assert outcome.stdout_bytes == len(sink.out) and outcome.stderr_bytes == 0


def test_size_and_modes_applied() -> None:
    req = PtyRequest("xterm", 33, 101, {"erase": 8, "intr": 7, "echo": False, "nope": 1})
    outcome, sink = run(execute(sh("stty size; stty -a", req)))
    assert outcome.exit_code == 0
    text = bytes(sink.out).decode()
    assert text.startswith("33 101\r\n")
    assert "erase = ^H" in text and "intr = ^G" in text
    assert "-echo " in text


def test_resize_signals_sigwinch() -> None:
    async def go() -> bytes:
        sink = Collect()
        script = "trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done"
        ex = await Execution.start(sh(script, timeout=10), sink)
        await sink.until(lambda: b"ready" in sink.out)
        ex.resize(50, 132)
        await sink.until(lambda: b"50 132" in sink.out)
        await ex.kill()
        return bytes(sink.out)

    assert b"50 132\r\n" in run(go())


def test_stdin_goes_through_the_line_discipline() -> None:
    async def go() -> tuple[ExecOutcome, bytes]:
        sink = Collect()
        ex = await Execution.start(sh("read x; echo got:$x; exit 7", stdin=True), sink)
        await ex.write_stdin(b"abc\x7fd\r")  # DEL erases the c; CR is a newline
        outcome = await ex.wait()
        return outcome, bytes(sink.out)

    outcome, out = run(go())
    assert outcome.exit_code == 7
    assert out.endswith(b"got:abd\r\n")


def test_ctrl_c_byte_interrupts_the_foreground_job() -> None:
    async def go() -> ExecOutcome:
        sink = Collect()
        ex = await Execution.start(sh("exec sleep 100", stdin=True), sink)
        # before its exec the shell catches SIGINT (dash -c does): wait until sleep runs
        with open(f"/proc/{ex.pid}/comm", "rb") as f:
            while f.read() != b"sleep\n":
                await asyncio.sleep(0.01)
                f.seek(0)
        await ex.write_stdin(b"\x03")
        return await ex.wait()

    start = time.monotonic()
    outcome = run(go())
    assert outcome.signal == signal.SIGINT
    assert time.monotonic() - start < 5


def test_kill_reaches_jobs_in_other_process_groups() -> None:
    # an interactive shell puts a job in a group of its own, in the command's session
    async def go() -> int:
        sink = Collect()
        ex = await Execution.start(sh("set -m; sleep 1000 & echo bg; wait", stdin=True), sink)
        await sink.until(lambda: b"bg" in sink.out)
        groups = session_groups(ex.pid)
        assert len(groups) == 2, groups  # the shell's and the job's
        await ex.kill()
        return ex.pid

    pid = run(go())
    assert session_groups(pid) == set()


def test_timeout_with_job_in_its_own_group() -> None:
    outcome, _ = run(execute(sh("set -m; sleep 1000 & wait", timeout=0.5, kill_grace=0.5)))
    assert outcome.timed_out


def test_exit_with_output_pending_is_delivered_whole() -> None:
    outcome, sink = run(execute(sh("head -c 300000 /dev/zero | tr '\\0' x; exit 3")))
    assert outcome.exit_code == 3
    assert bytes(sink.out) == b"x" * 300000


def test_no_fd_leak() -> None:
    before = len(os.listdir("/proc/self/fd"))

    async def go() -> None:
        for _ in range(5):
            await execute(sh("echo hi", stdin=True))

    run(go())
    assert len(os.listdir("/proc/self/fd")) == before


class Immediate(Collect):
    """A sink with send_now that takes every other chunk at once and refuses the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.taken_now = 0
        self._refuse = False

    def send_now(self, stream: int, data: bytes) -> bool:
        self._refuse = not self._refuse
        if self._refuse:
            return False  # this chunk comes again through the awaited call
        self.streams.add(stream)
        self.out.extend(data)
        self.taken_now += 1
        self.changed.set()
        return True


def test_send_now_and_awaited_output_keep_order() -> None:
    async def go() -> tuple[ExecOutcome, Immediate]:
        sink = Immediate()
        script = "for i in $(seq 1 40); do echo line$i; sleep 0.005; done; exit 9"
        ex = await Execution.start(sh(script), sink)
        return await ex.wait(), sink

    outcome, sink = run(go())
    assert outcome.exit_code == 9
    assert bytes(sink.out) == b"".join(b"line%d\r\n" % i for i in range(1, 41))
    assert sink.taken_now > 5  # both paths were used
    assert outcome.stdout_bytes == len(sink.out)


def test_send_now_is_not_used_without_a_pty() -> None:
    async def go() -> Immediate:
        sink = Immediate()
        ex = await Execution.start(ExecSpec(argv=("/bin/sh", "-c", "echo a"), env=ENV), sink)
        await ex.wait()
        return sink

    sink = run(go())
    assert (bytes(sink.out), sink.taken_now) == (b"a\n", 0)
