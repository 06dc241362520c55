"""What commands inherit and what outlives what: signals, setsid escapees, a killed server.

Commands start with every signal at its default and nothing blocked, whatever the server
inherited (`nohup rexec serve &`). Everything a command started is gone when its channel
ends, a setsid escapee included; a server killed with SIGKILL leaves no command running. The
cgroup tests need a writable cgroup v2 hierarchy and skip with the reason when there is none;
the fallback (PR_SET_PDEATHSIG + subreaper) is forced with `[exec] cgroup = "off"`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# How the issue met it: `nohup rexec serve &` from a non-interactive shell ignores HUP (nohup)
# and INT and QUIT (a background job without job control); USR1 and a real-time signal for
# good measure. The Python wrapper also blocks signals, which the children would inherit.
IGNORING = ["sh", "-c", 'trap "" HUP INT QUIT USR1; exec "$@"', "sh"]
BLOCKING = [
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM})\n"
    "signal.signal(signal.SIGRTMIN + 3, signal.SIG_IGN)\n"
    "os.execv(sys.argv[1], sys.argv[1:])",
]


# glibc reserves real-time signals 32 and 33 for itself (thread cancellation, setxid) and
# refuses to change their disposition; GNU make 4.3 starts its children with both ignored.
# No program can reset them through the C library (ssh does not either): they are left out.
GLIBC_INTERNAL = (1 << 31) | (1 << 32)


def signal_masks(status: bytes) -> tuple[int, int]:
    """(blocked, ignored) from `grep ^Sig[IB] /proc/self/status` output, glibc's own left out."""
    lines = dict(line.split(b":\t") for line in status.splitlines())
    return int(lines[b"SigBlk"], 16), int(lines[b"SigIgn"], 16) & ~GLIBC_INTERNAL


def test_commands_do_not_inherit_ignored_signals(server_factory: Any, e2e: Any) -> None:
    srv = server_factory(wrapper=["nohup", *IGNORING])
    status = Path(f"/proc/{srv.pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M)[1], 16)  # type: ignore[index]
    assert ignored & (1 << (signal.SIGHUP - 1)) == 0  # the server catches what it inherited
    proc = e2e.run_cli(["run", srv.address, "kill -HUP $$; echo not-killed"], token=srv.token)
    assert (proc.returncode, proc.stdout) == (129, b""), proc.stderr  # as under ssh: Hangup
    proc = e2e.run_cli(["run", srv.address, "kill -INT $$; echo not-killed"], token=srv.token)
    assert (proc.returncode, proc.stdout) == (130, b""), proc.stderr
    proc = e2e.run_cli(
        ["run", srv.address, "grep", "^Sig[IB]", "/proc/self/status"], token=srv.token
    )
    assert signal_masks(proc.stdout) == (0, 0)


def test_commands_do_not_inherit_blocked_signals(server_factory: Any, e2e: Any) -> None:
    srv = server_factory(wrapper=BLOCKING)
    proc = e2e.run_cli(
        ["run", srv.address, "grep", "^Sig[IB]", "/proc/self/status"], token=srv.token
    )
    assert signal_masks(proc.stdout) == (0, 0)
    proc = e2e.run_cli(["run", srv.address, "kill -TERM $$; echo not-killed"], token=srv.token)
    assert (proc.returncode, proc.stdout) == (143, b"")


# ---- what outlives what ---------------------------------------------------------------------


def _cgroup_unavailable() -> str | None:
    """Why this machine gives a root test process no writable cgroup v2, or None."""
    try:
        own = next(
            ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln[:3] == "0::"
        )
    except StopIteration:
        return "no cgroup v2 hierarchy here (cgroup v1 only)"
    mounts = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    mount = next((f[4] for f in mounts if f[f.index("-") + 1] == "cgroup2"), None)
    if mount is None:
        return "cgroup2 is not mounted"
    probe = Path(mount) / own.lstrip("/") / f"rexec-test-probe.{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a cgroup under {probe.parent}: {exc.strerror}"
    return None


NO_CGROUP = _cgroup_unavailable()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"cgroup v2: {NO_CGROUP}")
FALLBACK = '[exec]\ncgroup = "off"\n'
MODES = [
    pytest.param(None, id="cgroup", marks=needs_cgroup),
    pytest.param(FALLBACK, id="pdeathsig-subreaper"),
]


@pytest.fixture
def leftovers(e2e: Any) -> Iterator[list[str]]:
    """Markers of processes a test starts; whatever still runs at teardown is killed."""
    markers: list[str] = []
    yield markers
    for m in markers:
        for pid in e2e.cmdline_pids(m):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _running(e2e: Any, markers: list[str]) -> list[int]:
    """Live `sleep MARKER` processes (exactly that argv: not a shell or client naming it)."""
    found = []
    for m in markers:
        for pid in e2e.cmdline_pids(f"sleep {m}"):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{m}\0".encode():
                    found.append(pid)
    return found


@pytest.mark.parametrize("config", MODES)
def test_setsid_escapees_die_with_their_channel(
    server_factory: Any, e2e: Any, leftovers: list[str], config: str | None
) -> None:
    srv = server_factory(config)
    m1, m2 = e2e.marker("1000"), e2e.marker("1000")
    leftovers += [m1, m2]
    cmd = f"setsid sleep {m1} & (setsid sh -c 'sleep {m2}; true' &); sleep 0.2; echo started"
    proc = e2e.run_cli(["run", srv.address, cmd], token=srv.token)
    assert (proc.returncode, proc.stdout) == (0, b"started\n"), proc.stderr
    left = e2e.wait_until(lambda: not _running(e2e, [m1, m2]), 5)
    assert left, f"escaped processes still running: {_running(e2e, [m1, m2])}"


def _start_detached(e2e: Any, srv: Any, command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [e2e.REXEC, "run", srv.address, *command],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=e2e.clean_env({"REXEC_TOKEN": srv.token}),
    )  # fmt: skip


@needs_cgroup
def test_sigkilled_server_leaves_no_command_running(
    server_factory: Any, e2e: Any, leftovers: list[str]
) -> None:
    srv = server_factory()
    ms = [e2e.marker("1000") for _ in range(3)]
    leftovers += ms
    client = _start_detached(e2e, srv, [f"sleep {ms[0]} & setsid sleep {ms[1]} & sleep {ms[2]}"])
    try:
        assert e2e.wait_until(lambda: len(_running(e2e, ms)) == 3, 10)
        srv.proc.kill()
        srv.proc.wait(5)
        assert e2e.wait_until(lambda: not _running(e2e, ms), 5), _running(e2e, ms)
    finally:
        client.kill()
        client.wait(5)


def test_sigkilled_server_takes_the_command_with_it_in_fallback_mode(
    server_factory: Any, e2e: Any, leftovers: list[str]
) -> None:
    """Without cgroups the leader dies with the server (PR_SET_PDEATHSIG); what the leader
    started itself is not covered (README, "What outlives what")."""
    srv = server_factory(FALLBACK)
    m = e2e.marker("1000")
    leftovers.append(m)
    client = _start_detached(e2e, srv, ["sleep", m])
    try:
        assert e2e.wait_until(lambda: _running(e2e, [m]), 10)
        srv.proc.kill()
        srv.proc.wait(5)
        assert e2e.wait_until(lambda: not _running(e2e, [m]), 5), _running(e2e, [m])
    finally:
        client.kill()
        client.wait(5)


@needs_cgroup
def test_a_new_server_removes_what_a_crashed_one_left(
    server_factory: Any, e2e: Any, leftovers: list[str]
) -> None:
    """Server and watchdog both SIGKILLed (an OOM kill, say): the next start cleans up."""
    crashed = server_factory()
    ms = [e2e.marker("1000") for _ in range(3)]
    leftovers += ms
    client = _start_detached(
        e2e, crashed, [f"sleep {ms[0]} & setsid sleep {ms[1]} & sleep {ms[2]}"]
    )
    try:
        assert e2e.wait_until(lambda: len(_running(e2e, ms)) == 3, 10)
        [watchdog] = [  # the crashed server's: another server's may run too
            pid
            for pid in e2e.cmdline_pids(f"/rexec.{crashed.pid}.")
            if b"rexec-cgroup-watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        os.kill(watchdog, signal.SIGKILL)
        crashed.proc.kill()
        crashed.proc.wait(5)
        assert len(_running(e2e, ms)) == 3  # nobody left to clean up
        fresh = server_factory()
        assert e2e.wait_until(lambda: not _running(e2e, ms), 5), _running(e2e, ms)
        # Another test run's server starting meanwhile may have reaped them first (the
        # subtrees share the machine's cgroup tree); if this one did, it says how many.
        events = fresh.log_events("removed what a crashed predecessor left")
        assert len(events) <= 1
        if events:
            assert events[0]["processes_killed"] >= 3
    finally:
        client.kill()
        client.wait(5)


@needs_cgroup
def test_each_command_runs_in_its_own_cgroup(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    conn = srv.connect()
    try:
        a = conn.run("grep ^0:: /proc/self/cgroup")
        b = conn.run("grep ^0:: /proc/self/cgroup")
    finally:
        conn.close()
    pattern = rf"0::/(.+/)?rexec\.{srv.pid}\.\d+/c(\d+)\n"
    ma, mb = re.fullmatch(pattern, a.stdout.decode()), re.fullmatch(pattern, b.stdout.decode())
    assert ma and mb, (a.stdout, b.stdout)
    assert ma[2] != mb[2]
    srv.stop()
    assert not list(Path("/sys/fs/cgroup").glob(f"**/rexec.{srv.pid}.*"))  # removed at exit


@needs_cgroup
def test_commands_ending_at_once_while_the_server_leaves_their_cgroup(
    server_factory: Any, e2e: Any, leftovers: list[str]
) -> None:
    """The server forks each command from inside the command's cgroup and moves out in the
    background (rexec.server.cgroup); after an idle moment that move waits for an RCU grace
    period, so a command that ends at once is checked while the server is still listed in
    its cgroup. The server must not count (or signal) itself, and what the command left
    behind must still die."""
    srv = server_factory()
    conn = srv.connect()
    try:
        for _ in range(3):
            time.sleep(0.2)  # idle: the move after the next fork is a slow one
            assert (conn.run(["true"]).exit_code, srv.proc.poll()) == (0, None)
            time.sleep(0.2)
            m = e2e.marker("1000")
            leftovers.append(m)
            r = conn.run(f"setsid sleep {m} >/dev/null 2>&1 & echo started")
            assert (r.exit_code, r.stdout) == (0, b"started\n"), r.stderr
            assert e2e.wait_until(lambda m=m: not _running(e2e, [m]), 5), _running(e2e, [m])
        assert conn.run("echo alive").stdout == b"alive\n"
    finally:
        conn.close()
    assert srv.proc.poll() is None


def test_keep_orphans_lets_background_processes_live(
    server_factory: Any, e2e: Any, leftovers: list[str]
) -> None:
    srv = server_factory("[exec]\nkeep_orphans = true\n")
    m = e2e.marker("1000")
    leftovers.append(m)
    proc = e2e.run_cli(["run", srv.address, f"sleep {m} >/dev/null 2>&1 &"], token=srv.token)
    assert proc.returncode == 0
    assert e2e.wait_until(lambda: _running(e2e, [m]), 5)
    time_alive = e2e.wait_until(lambda: not _running(e2e, [m]), 1.0)
    assert not time_alive, "keep_orphans = true, yet the background process was killed"
