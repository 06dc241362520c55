"""rexec.server.exec against real processes: exit status, signals, group kills, pipes, stdin, leaks.

Every test runs under asyncio.wait_for, so a bug fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from rexec.errors import ExecError
from rexec.server.exec import ExecOutcome, Execution
from rexec.server.spawn import ExecSpec

T = TypeVar("T")
ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}
PY = sys.executable
MiB = 1 << 20


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def spec(*argv: str, **kw: Any) -> ExecSpec:
    kw.setdefault("env", ENV)
    return ExecSpec(argv=argv, **kw)


def sh(cmd: str, **kw: Any) -> ExecSpec:
    return spec("/bin/sh", "-c", cmd, **kw)


class Collect:
    """A sink that keeps everything, and can wait for some output to appear."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.sizes: list[int] = []
        self.changed = asyncio.Event()

    async def __call__(self, stream: int, data: bytearray) -> None:
        assert stream in (1, 2)
        assert isinstance(data, bytearray)
        (self.out if stream == 1 else self.err).extend(data)
        self.sizes.append(len(data))
        self.changed.set()

    async def until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self.changed.clear()
            await self.changed.wait()

    async def line(self) -> bytes:
        await self.until(lambda: b"\n" in self.out)
        return bytes(self.out.split(b"\n", 1)[0])


async def execute(s: ExecSpec) -> tuple[ExecOutcome, Collect]:
    sink = Collect()
    ex = await Execution.start(s, sink)
    return await ex.wait(), sink


def live_members(pgid: int) -> list[int]:
    """Non-zombie processes in group pgid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def assert_group_gone(pgid: int) -> None:
    """No process of the group runs any more.

    os.killpg(pgid, 0) also sees zombies: orphans are reparented to PID 1, which on some
    machines (containers, this VM) reaps them only every second or two. A zombie runs nothing.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    assert live_members(pgid) == []


def assert_dead(pid: int) -> None:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state in (b"Z", b"X"), f"process {pid} still runs"


def open_fds() -> set[str]:
    """This process's fds, after a collection: an earlier test's garbage (an event loop, a
    socket) must not close its fds in the middle of this test's count."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


async def fds_leaked(before: set[str], within: float = 2.0) -> list[str]:
    """The fds open now that were not `before` (fd -> file), once none is or `within` has
    passed. A transport's pipe may close in a loop callback just after the call that ended
    it (later on a loaded machine), so the loop runs meanwhile; a leaked fd stays. An fd
    closed meanwhile is not counted: garbage of earlier tests may close its own."""
    deadline = time.monotonic() + within
    while (new := open_fds() - before) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)

    def name(fd: str) -> str:
        try:
            return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
        except OSError:
            return fd

    return sorted(map(name, new))


def my_children() -> list[int]:
    """Processes (zombies included) whose parent is this test process."""
    me = os.getpid()
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == me:
                kids.append(int(name))
    return kids


# ---------------------------------------------------------------- exit status


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes(code: int) -> None:
    out, _ = run(execute(sh(f"exit {code}")))
    assert (out.exit_code, out.signal, out.timed_out) == (code, None, False)
    assert 0 < out.duration < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_killed_by_signal(sig: signal.Signals, tmp_path: Path) -> None:
    out, _ = run(execute(sh(f"ulimit -c 0; kill -{sig.name[3:]} $$", cwd=str(tmp_path))))
    assert (out.exit_code, out.signal, out.timed_out) == (None, sig, False)


# ---------------------------------------------------------------- output


def test_stdout_and_stderr_separate_and_exact() -> None:
    out, sink = run(execute(sh("printf 'out\\n'; printf 'err\\n' >&2; printf more")))
    assert out.exit_code == 0
    assert bytes(sink.out) == b"out\nmore"
    assert bytes(sink.err) == b"err\n"
    assert (out.stdout_bytes, out.stderr_bytes) == (8, 4)


def test_binary_output_exact() -> None:
    data = bytes(range(256)) * 4096 + b"\xff\xfe\x80\x00"
    script = (
        "import sys; d = bytes(range(256)) * 4096 + b'\\xff\\xfe\\x80\\x00';"
        "sys.stdout.buffer.write(d); sys.stderr.buffer.write(d[::-1])"
    )
    out, sink = run(execute(spec(PY, "-c", script)))
    assert out.exit_code == 0
    assert bytes(sink.out) == data
    assert bytes(sink.err) == data[::-1]


def test_chunks_bounded_by_chunk_size() -> None:
    out, sink = run(execute(spec("head", "-c", "100000", "/dev/zero", chunk_size=1000)))
    assert out.stdout_bytes == 100000 == len(sink.out)
    assert max(sink.sizes) <= 1000


def test_headroom_in_front_of_every_chunk() -> None:
    """The pipe is read straight behind `headroom` free bytes (the session frames in place)."""
    script = "import sys; sys.stdout.write('a' * 70000); sys.stdout.flush(); print('b')"
    out, sink = run(execute(spec(PY, "-c", script, chunk_size=65536, headroom=8)))
    assert out.stdout_bytes == 70002
    assert len(sink.out) == 70002 + 8 * len(sink.sizes) and len(sink.sizes) >= 2
    pos, payload = 0, bytearray()
    for size in sink.sizes:
        assert sink.out[pos : pos + 8] == bytes(8) and 8 < size <= 8 + 65536
        payload += sink.out[pos + 8 : pos + size]
        pos += size
    assert payload == b"a" * 70000 + b"b\n"


BOTH_SCRIPT = """
import random, sys
a = random.Random(1).randbytes(20 << 20)
b = random.Random(2).randbytes(20 << 20)
o, e = sys.stdout.buffer, sys.stderr.buffer
for i in range(0, len(a), 1 << 20):
    o.write(a[i : i + (1 << 20)]); o.flush()
    e.write(b[i : i + (1 << 20)]); e.flush()
"""


def test_20mib_on_both_streams_no_deadlock() -> None:
    out, sink = run(execute(spec(PY, "-c", BOTH_SCRIPT)), timeout=60)
    assert out.exit_code == 0
    assert (out.stdout_bytes, out.stderr_bytes) == (20 * MiB, 20 * MiB)
    want_out = hashlib.sha256(random.Random(1).randbytes(20 * MiB)).hexdigest()
    want_err = hashlib.sha256(random.Random(2).randbytes(20 * MiB)).hexdigest()
    assert hashlib.sha256(sink.out).hexdigest() == want_out
    assert hashlib.sha256(sink.err).hexdigest() == want_err


SLOW_WRITER = """
import os
n = 0
while n < 32 << 20:
    n += os.write(1, bytes(65536))
    os.write(2, b"%d\\n" % n)
"""


def test_slow_sink_blocks_the_child() -> None:
    """A sink that does not return stops the reading: the child blocks on a full pipe."""

    async def main() -> None:
        gate = asyncio.Event()
        written = [0]
        out = [0]

        async def sink(stream: int, data: bytearray) -> None:
            if stream == 2:
                written[0] = int(data.rsplit(b"\n", 2)[-2])
                return
            await gate.wait()
            out[0] += len(data)

        ex = await Execution.start(spec(PY, "-c", SLOW_WRITER), sink)
        await asyncio.sleep(1.0)
        assert 0 < written[0] < 3 * MiB  # one chunk in the sink + the pipe buffer
        gate.set()
        outcome = await ex.wait()
        assert outcome.exit_code == 0
        assert out[0] == outcome.stdout_bytes == 32 * MiB

    run(main())


def test_output_left_in_pipe_is_delivered_to_a_slow_sink() -> None:
    """The child exits at once with 200 KB in the pipe; the sink needs longer than the
    bound on waiting for EOF, yet every byte is delivered before wait() returns."""

    async def main() -> None:
        got = bytearray()

        async def sink(stream: int, data: bytearray) -> None:
            await asyncio.sleep(0.15)
            got.extend(data)

        s = spec("head", "-c", "200000", "/dev/urandom", chunk_size=20000)
        ex = await Execution.start(s, sink)
        out = await ex.wait()
        assert out.exit_code == 0
        assert len(got) == out.stdout_bytes == 200000
        assert out.duration < 1.0  # the reap is early; the delivery took ~1.5 s

    run(main())


# ---------------------------------------------------------------- stdin


def test_stdin_streamed_exact() -> None:
    data = random.Random(3).randbytes(5 * MiB)

    async def main() -> None:
        sink = Collect()
        ex = await Execution.start(spec("cat", stdin=True), sink)
        for i in range(0, len(data), 100_000):
            await ex.write_stdin(data[i : i + 100_000])
        await ex.close_stdin()
        await ex.close_stdin()  # idempotent
        out = await ex.wait()
        assert out.exit_code == 0
        assert hashlib.sha256(sink.out).digest() == hashlib.sha256(data).digest()

    run(main())


def test_no_stdin_means_immediate_eof() -> None:
    t = time.monotonic()
    out, sink = run(execute(spec("cat")), timeout=5)
    assert out.exit_code == 0
    assert sink.out == b""
    assert time.monotonic() - t < 3


def test_stdin_write_after_child_closed_it_is_dropped() -> None:
    async def main() -> None:
        ex = await Execution.start(spec("true", stdin=True), Collect())
        await asyncio.sleep(0.2)  # true has exited: nobody reads the pipe
        await ex.write_stdin(b"x" * MiB)
        out = await ex.wait()
        await ex.write_stdin(b"late")  # after the end: dropped as well
        await ex.close_stdin()
        assert out.exit_code == 0

    run(main())


def test_stdin_write_waits_for_drain_and_kill_releases_it() -> None:
    async def main() -> None:
        ex = await Execution.start(spec("sleep", "1000", stdin=True), Collect())
        writer = asyncio.ensure_future(ex.write_stdin(b"x" * (8 * MiB)))
        done, _ = await asyncio.wait({writer}, timeout=0.5)
        assert not done  # the pipe is full and nobody reads it: backpressure
        await ex.kill()
        await writer  # released, silently
        assert (await ex.wait()).signal == signal.SIGTERM

    run(main())


# ---------------------------------------------------------------- deadline, kill, groups


def test_timeout_kills_grandchild() -> None:
    async def main() -> None:
        sink = Collect()
        ex = await Execution.start(
            sh("sleep 1000 & echo $!; sleep 1000", timeout=0.5, kill_grace=5), sink
        )
        grandchild = int(await sink.line())
        out = await ex.wait()
        assert out.timed_out
        assert (out.exit_code, out.signal) == (None, signal.SIGTERM)
        assert 0.5 <= out.duration < 3.0  # no full grace: sleep dies on SIGTERM
        assert_group_gone(ex.pid)
        assert_dead(grandchild)

    run(main())


def test_timeout_sigkill_when_sigterm_ignored() -> None:
    async def main() -> None:
        sink = Collect()
        s = sh("trap '' TERM; sleep 1000 & echo $!; sleep 1000", timeout=0.3, kill_grace=0.3)
        ex = await Execution.start(s, sink)
        grandchild = int(await sink.line())
        out = await ex.wait()
        assert out.timed_out
        assert (out.exit_code, out.signal) == (None, signal.SIGKILL)
        assert 0.6 <= out.duration < 3.0
        assert_group_gone(ex.pid)
        assert_dead(grandchild)

    run(main())


def test_timeout_continues_stopped_processes() -> None:
    """A stopped process would sit on SIGTERM until SIGKILL; SIGCONT lets it act on it."""
    out, _ = run(execute(sh("kill -STOP $$", timeout=0.3, kill_grace=5)))
    assert out.timed_out
    assert out.signal == signal.SIGTERM
    assert out.duration < 3


def test_kill_kills_grandchildren() -> None:
    async def main() -> None:
        sink = Collect()
        ex = await Execution.start(sh("sleep 1000 & echo $!; sleep 1000", kill_grace=5), sink)
        grandchild = int(await sink.line())
        t = time.monotonic()
        await ex.kill()
        assert time.monotonic() - t < 3.0  # sleep dies on SIGTERM: no full grace
        await ex.kill()  # idempotent
        out = await ex.wait()
        assert (out.exit_code, out.signal, out.timed_out) == (None, signal.SIGTERM, False)
        assert await ex.wait() is out
        assert_group_gone(ex.pid)
        assert_dead(grandchild)

    run(main())


def test_leader_exit_kills_background_grandchild() -> None:
    """`sleep 1000 &` holds stdout open; it is killed and wait() returns promptly."""

    async def main() -> None:
        sink = Collect()
        ex = await Execution.start(sh("sleep 1000 & echo $!", kill_grace=5), sink)
        t = time.monotonic()
        out = await ex.wait()
        assert time.monotonic() - t < 3.0  # no full grace
        assert (out.exit_code, out.signal, out.timed_out) == (0, None, False)
        assert_group_gone(ex.pid)
        assert_dead(int(sink.out))

    run(main())


ESCAPE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(1000)
print(pid, flush=True)
"""


def test_escaped_process_holding_pipe_does_not_hang() -> None:
    async def main() -> None:
        sink = Collect()
        ex = await Execution.start(spec(PY, "-c", ESCAPE), sink)
        escapee = 0
        try:
            escapee = int(await sink.line())
            t = time.monotonic()
            out = await ex.wait()
            assert time.monotonic() - t < 3.5
            assert out.exit_code == 0
            assert sink.out == b"%d\n" % escapee
        finally:
            if escapee:
                os.kill(escapee, signal.SIGKILL)

    run(main())


INT_CHILD = """
import os, signal, time
signal.signal(signal.SIGINT, lambda *a: (os.write(1, b"got INT\\n"), os._exit(0)))
os.write(1, b"ready\\n")
time.sleep(100)
"""


def test_signal_delivers_sigint_to_group() -> None:
    """Both the shell (the leader) and its child python get the SIGINT."""

    async def main() -> None:
        sink = Collect()
        cmd = 'trap \'echo sh-INT\' INT; "$0" -c "$1"; echo after $?; exit 7'
        ex = await Execution.start(spec("/bin/sh", "-c", cmd, PY, INT_CHILD), sink)
        await sink.line()  # the child's handler is in place
        ex.signal(signal.SIGINT)
        out = await asyncio.wait_for(ex.wait(), 5)
        assert out.exit_code == 7
        assert sink.out == b"ready\ngot INT\nsh-INT\nafter 0\n"
        ex.signal(signal.SIGINT)  # the group is gone: no error

    run(main())


def test_sink_failure_kills_command_and_is_reported() -> None:
    async def main() -> None:
        async def sink(stream: int, data: bytes) -> None:
            raise ConnectionError("client went away")

        ex = await Execution.start(sh("echo x; sleep 1000"), sink)
        with pytest.raises(ConnectionError, match="client went away"):
            await ex.wait()
        assert ex.outcome is not None
        assert ex.outcome.signal == signal.SIGTERM
        assert_group_gone(ex.pid)

    run(main())


def test_kill_with_stalled_sink_returns() -> None:
    async def main() -> None:
        async def sink(stream: int, data: bytes) -> None:
            await asyncio.Event().wait()  # a client that never reads again

        ex = await Execution.start(spec("head", "-c", "10M", "/dev/zero"), sink)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(ex.kill(), 5)
        assert (await ex.wait()).stdout_bytes == 0

    run(main())


def test_abandoned_execution_is_killed_at_loop_shutdown() -> None:
    pids: list[int] = []

    async def main() -> None:
        ex = await Execution.start(sh("sleep 1000 & sleep 1000"), Collect())
        pids.append(ex.pid)

    run(main())
    assert_group_gone(pids[0])


# ---------------------------------------------------------------- start errors, env, cwd


def test_missing_program() -> None:
    with pytest.raises(ExecError) as info:
        run(execute(spec("no-such-program-xyz")))
    assert str(info.value) == "command not found: no-such-program-xyz"


def test_missing_cwd() -> None:
    with pytest.raises(ExecError) as info:
        run(execute(spec("true", cwd="/nope")))
    assert str(info.value) == "no such directory: /nope"


def test_not_executable(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ExecError) as info:
        run(execute(spec("./x", cwd=str(tmp_path))))
    assert str(info.value) == "permission denied: ./x"


def test_env_and_cwd_applied(tmp_path: Path) -> None:
    env = {"PATH": ENV["PATH"], "FOO": "bar baz", "EMPTY": ""}
    out, sink = run(execute(spec("env", env=env, cwd=str(tmp_path))))
    assert out.exit_code == 0
    assert sorted(sink.out.decode().splitlines()) == sorted(f"{k}={v}" for k, v in env.items())
    out, sink = run(execute(spec("pwd", cwd=str(tmp_path))))
    assert bytes(sink.out) == str(tmp_path).encode() + b"\n"


# ---------------------------------------------------------------- leaks


def test_no_fd_or_task_leak(tmp_path: Path) -> None:
    async def main() -> None:
        async def all_kinds() -> None:
            await execute(sh("echo hi; echo there >&2"))
            await execute(sh("sleep 1000 & exit 3"))
            await execute(sh("sleep 1000", timeout=0.1, kill_grace=0.1))
            ex = await Execution.start(spec("cat", stdin=True), Collect())
            await ex.write_stdin(b"abc")
            await ex.kill()
            for bad in (spec("no-such-program-xyz"), spec("true", cwd="/nope")):
                with pytest.raises(ExecError):
                    await execute(bad)

        # other tests' long-lived children (e.g. the e2e session server) are not ours
        children = set(my_children())
        await all_kinds()  # warm up: the loop's own fds (self-pipe, executor) appear here
        before, tasks = open_fds(), asyncio.all_tasks()
        await all_kinds()
        assert await fds_leaked(before) == []
        assert asyncio.all_tasks() == tasks
        assert set(my_children()) - children == set()  # every leader reaped: no zombie

    run(main())


def test_many_concurrent_commands() -> None:
    async def main() -> None:
        async def one(i: int) -> None:
            out, sink = await execute(sh(f"head -c {i * 10000} /dev/zero; exit {i % 256}"))
            assert out.exit_code == i % 256
            assert len(sink.out) == i * 10000

        before = open_fds()
        await asyncio.gather(*(one(i) for i in range(100)))
        assert await fds_leaked(before) == []

    run(main(), timeout=120)


@pytest.mark.slow
def test_throughput_512mib(capsys: pytest.CaptureFixture[str]) -> None:
    """`head -c 512M /dev/zero` into a discarding sink; well above 500 MB/s on an idle box."""

    async def discard(stream: int, data: bytes) -> None:
        pass

    async def main() -> float:
        t = time.perf_counter()
        ex = await Execution.start(spec("head", "-c", "512M", "/dev/zero"), discard)
        out = await ex.wait()
        assert out.stdout_bytes == 512 * MiB
        return out.stdout_bytes / (time.perf_counter() - t) / 1e6

    rate = run(main(), timeout=60)
    with capsys.disabled():
        print(f"\nexec throughput: {rate:.0f} MB/s")
    assert rate > 200  # lenient: CI machines are loaded


def test_children_get_default_signals_and_an_empty_mask() -> None:
    """What we ignore or block (`nohup`, a background job) never reaches the command."""
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        out, sink = run(execute(sh("kill -HUP $$; echo not-killed")))
        assert (out.exit_code, out.signal, bytes(sink.out)) == (None, signal.SIGHUP, b"")
        out, sink = run(execute(spec("grep", "^Sig[IB]", "/proc/self/status")))
        masks = dict(line.split(b":\t") for line in bytes(sink.out).splitlines())
        assert int(masks[b"SigBlk"], 16) == 0
        # glibc's own signals 32 and 33 cannot be reset (GNU make 4.3 ignores them)
        assert int(masks[b"SigIgn"], 16) & ~((1 << 31) | (1 << 32)) == 0
        # for this process nothing changed that matters: HUP is still not fatal
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        signal.signal(signal.SIGQUIT, old_quit)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
