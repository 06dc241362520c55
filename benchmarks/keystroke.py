"""Keystroke round trip: a byte written to the client's terminal until its echo comes back
through the remote pty, for `rexec run -t ADDR cat` and `ssh -tt HOST cat` on 127.0.0.1.

The benchmark plays the user's terminal: each client runs on a local pty whose master we
hold. The remote `cat` reads in canonical mode, so the echo comes from the remote pty's line
discipline the moment the key arrives there: what is measured is the client, the wire and
the server, both ways. Keys are typed one at a time with a pause between them, as a person
types (never pipelined); every 40 keys a carriage return lets `cat` print the line (not
timed). Each round opens a new session; p50 is the median of every key, p99 the 99th
percentile of each round (its median over rounds is reported).
"""

from __future__ import annotations

import fcntl
import os
import select
import statistics
import struct
import subprocess
import termios
import time
from collections.abc import Callable

from benchmarks import procs
from benchmarks.model import Comparison, Contender, Row, Unavailable

LINE = 40  # keys per line before a carriage return
SESSION_TIMEOUT = 20.0
READY_TIMEOUT = 15.0


class Terminal:
    """A client command on a fresh local pty (40x120); we write keys and read the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        procs.on_cleanup("keystroke client", self.close)
        self.seen = bytearray()

    def wait_raw(self, timeout: float) -> None:
        """Until the client has put its terminal in raw mode: a key typed before that would
        be echoed by the local terminal, not the remote one."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.slave)[3] & termios.ICANON:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise Unavailable("the client never put its terminal in raw mode")
            time.sleep(0.005)

    def read_until(self, needle: bytes, timeout: float) -> None:
        """Read the screen until `needle` shows (everything before it is consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.seen.find(needle)
            if i >= 0:
                del self.seen[: i + len(needle)]
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"no {needle!r} within {timeout:.0f}s: {bytes(self.seen[-80:])!r}"
                )
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError as exc:
                    raise Unavailable(f"client ended: {bytes(self.seen[-80:])!r}") from exc
                if not data:
                    raise Unavailable("client ended")
                self.seen += data

    def key(self, byte: bytes) -> float:
        """One key: seconds from the write to its echo."""
        self.seen.clear()
        t0 = time.perf_counter()
        os.write(self.master, byte)
        self.read_until(byte, 5.0)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.master >= 0:
            proc = self.proc
            if proc.poll() is None:
                os.write(self.master, b"\x04")  # end cat: the session ends by itself
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    procs.stop_popen(proc)
            os.close(self.master)
            os.close(self.slave)
            self.master = -1


def session(argv: list[str], env: dict[str, str], keys: int, gap: float) -> list[float]:
    """One session: `keys` timed keystrokes (milliseconds)."""
    term = Terminal(argv, env)
    try:
        term.wait_raw(READY_TIMEOUT)
        # ready once a key echoes: the session is up and cat reads
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                term.key(b".")
                break
            except Unavailable:
                if time.monotonic() > deadline or term.proc.poll() is not None:
                    raise
        term.key(b"\r")
        term.read_until(b".\r\n", 5.0)  # cat's copy of the line
        times: list[float] = []
        for i in range(keys):
            time.sleep(gap)
            times.append(term.key(b"x") * 1000.0)
            if (i + 1) % LINE == 0:
                term.key(b"\r")
                term.read_until(b"x" * LINE + b"\r\n", 5.0)
        return times
    finally:
        term.close()


class Keystroke:
    """The samplers for one client: p50 rows get every key, p99 rows one value a round."""

    def __init__(self, argv: list[str], env: dict[str, str], keys: int, gap: float) -> None:
        self.argv, self.env, self.keys, self.gap = argv, env, keys, gap
        self.p99_row: Row | None = None

    def sample(self) -> list[float]:
        times = session(self.argv, self.env, self.keys, self.gap)
        if self.p99_row is not None:
            self.p99_row.samples.append(statistics.quantiles(times, n=100)[98])
        return times


def contenders(
    rows: list[tuple[Row, Row]],
    clients: list[tuple[list[str] | None, dict[str, str], str | None]],
    keys: int,
    gap: float,
) -> list[Contender]:
    """(p50 row, p99 row) and (argv, env, why unavailable) per client."""
    out: list[Contender] = []
    for (p50, p99), (argv, env, error) in zip(rows, clients, strict=True):
        if argv is None or error is not None:
            p50.unavailable = p99.unavailable = error or "unavailable"
            out += [Contender(p50, None), Contender(p99, None)]
            continue
        k = Keystroke(argv, env, keys, gap)
        k.p99_row = p99
        sample: Callable[[], list[float]] = k.sample
        out += [Contender(p50, sample), Contender(p99, None)]
    return out


TARGETS = [
    Comparison("keystroke.rexec", "keystroke.ssh", "<=", 1.0, "p50 <= ssh p50"),
    Comparison("keystroke.rexec_p99", "", "<=", 10.0, "p99 <= 10 ms"),
    Comparison("keystroke.rexec_p99", "keystroke.ssh_p99"),
]
