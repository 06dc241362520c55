"""`rexec cp`'s progress display: text only, fed TransferProgress callbacks and a clock.

Pure on purpose (no I/O, no terminal queries): the caller passes the terminal's size and a
clock, writes what `frame()` and `clear()` return to stderr, and unit tests assert the exact
strings. One host: one line naming the current file. Many hosts: one line per host while
they fit on the screen (one row is kept for the cursor), else one aggregate line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

EVERY = 0.1  # seconds between two redraws: at most ~10 a second
BAR_MAX = 30  # columns of the bar itself, at most
BAR_MIN = 5  # under this many columns there is no bar
ERASE_LINE = "\r\x1b[K"
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


class Event(Protocol):
    """The fields of rexec.TransferProgress read here."""

    @property
    def path(self) -> str: ...
    @property
    def total_done(self) -> int: ...
    @property
    def total(self) -> int | None: ...


def format_size(n: float) -> str:
    """`0 B`, `1023 B`, `1.0 KiB`, `12.3 MiB`: binary units, one decimal past bytes."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """`0:05`, `12:34`, `1:02:03`."""
    whole = max(0, int(seconds + 0.5))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Host:
    """What is known of one host's transfer."""

    __slots__ = ("done", "ended", "failed", "label", "started", "total")

    def __init__(self, label: str) -> None:
        self.label = label
        self.done = 0
        self.total: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.failed = False


class Progress:
    """The display of one `rexec cp` run over `hosts` (one host: the current file's name)."""

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        columns: int = 80,
        rows: int = 24,
        clock: Callable[[], float] = time.monotonic,
        every: float = EVERY,
    ) -> None:
        self.hosts = {host: _Host(host) for host in hosts}
        self.single = len(self.hosts) == 1
        self.columns = max(20, columns)
        self.aggregate = len(self.hosts) > max(1, rows - 1)
        self.clock = clock
        self.every = every
        self.started = clock()
        self._last: float | None = None
        self._drawn = 0  # lines on the screen from the last frame (the cursor ends on the last)

    # ---- fed by the transfers ----------------------------------------------------------------

    def start(self, host: str) -> None:
        """host is connected: its rate counts from now."""
        self.hosts[host].started = self.clock()

    def update(self, host: str, event: Event) -> None:
        state = self.hosts[host]
        if state.started is None:
            state.started = self.clock()
        state.done = event.total_done
        state.total = event.total
        if self.single:
            state.label = shown(event.path)

    def finish(self, host: str, *, ok: bool) -> None:
        state = self.hosts[host]
        state.ended = self.clock()
        state.failed = not ok
        if ok and state.total is not None:
            state.done = state.total

    # ---- drawing -----------------------------------------------------------------------------

    def due(self) -> bool:
        """Time for a redraw (the first one at once, then at most one per `every` seconds)."""
        return self._last is None or self.clock() - self._last >= self.every

    def frame(self) -> str:
        """The text that replaces what the last frame drew with the state now."""
        self._last = self.clock()
        lines = [self.aggregate_line()] if self.aggregate else [self.line(h) for h in self.hosts]
        text = self.clear() + "\n".join(f"{line}\x1b[K" for line in lines)
        self._drawn = len(lines)
        return text

    def redraw(self) -> str:
        """frame(), once a first frame was drawn (after other output: put the display back)."""
        return self.frame() if self._last is not None else ""

    def clear(self) -> str:
        """The text that erases the last frame (before other output, or at the end)."""
        if not self._drawn:
            return ""
        up = f"\x1b[{self._drawn - 1}A" if self._drawn > 1 else ""
        self._drawn = 0
        return f"\r{up}\x1b[J"

    def close(self) -> str:
        """The final frame, left on the screen, and a newline; nothing when nothing was ever
        drawn (no host got as far as a transfer: its error line says it all)."""
        return self.frame() + "\n" if self._last is not None else ""

    # ---- the lines -----------------------------------------------------------------------------

    def line(self, host: str) -> str:
        state = self.hosts[host]
        width = self.columns - 1  # never the last column: some terminals wrap there
        if self.single:  # a fixed width, so that the bar does not jump from file to file
            label_width = max(8, width // 4)
        else:
            label_width = min(max(len(h) for h in self.hosts), max(8, width // 3))
        label = _fit(state.label, label_width).ljust(label_width)
        now = state.ended if state.ended is not None else self.clock()
        elapsed = now - state.started if state.started is not None else 0.0
        rest = _rest(state.done, state.total, elapsed, state.ended is not None, state.failed)
        return _compose(label, state.done, state.total, rest, width)

    def aggregate_line(self) -> str:
        states = list(self.hosts.values())
        ended = sum(1 for s in states if s.ended is not None)
        failed = sum(1 for s in states if s.failed)
        done = sum(s.done for s in states)
        totals = [s.total for s in states]
        total = None if None in totals else sum(t or 0 for t in totals)
        label = f"{ended}/{len(states)} hosts, {failed} failed"
        elapsed = self.clock() - self.started
        rest = _rest(done, total, elapsed, ended == len(states), False)  # the label counts failures
        return _compose(label, done, total, rest, self.columns - 1)


def _rest(done: int, total: int | None, elapsed: float, ended: bool, failed: bool) -> str:
    """What follows the bar, in fixed-width fields: `  450.0 MiB  112.5 MiB/s  ETA 0:05`
    while running, `... in 0:10` once done, `  450.0 MiB  failed`."""
    if failed:
        return f"{format_size(done):>10}  failed"
    rate = done / elapsed if elapsed > 0 else 0.0
    speed = f"{format_size(rate)}/s"
    if ended:
        when = f"in {format_duration(elapsed)}"
    elif total is None or rate <= 0:
        when = "ETA --:--"
    else:
        when = f"ETA {format_duration(max(0, total - done) / rate)}"
    return f"{format_size(done):>10} {speed:>12}  {when:<9}"  # fixed: the bar keeps its width


def _compose(label: str, done: int, total: int | None, rest: str, width: int) -> str:
    """`label  45% [=====>     ] rest`, the bar fitted to width (none when it does not fit,
    nor while the total is unknown)."""
    if total is None:
        return f"{label}  {rest}"[:width].rstrip()
    pct = 100 if total == 0 else min(100, done * 100 // total)
    bar_width = min(BAR_MAX, width - len(label) - len(rest) - 9)  # ` 100% [` and `] `
    if bar_width < BAR_MIN:
        return f"{label} {pct:3d}% {rest}"[:width].rstrip()
    filled = bar_width * pct // 100
    head = ">" if 0 < filled < bar_width else ""
    body = "=" * (filled - len(head)) + head
    return f"{label} {pct:3d}% [{body.ljust(bar_width)}] {rest}"[:width].rstrip()


def shown(text: str) -> str:
    """Text from a server (a file name, an error) as a terminal may show it: control
    characters (an escape sequence, a newline) as `?`, as `rexec run` shows error tails,
    so that remote bytes never drive the terminal; a name that is not UTF-8 escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or "\udc80" <= c <= "\udcff" else "?" for c in text)


def _fit(text: str, width: int) -> str:
    """text in width columns: its end kept (a file's name), `...` in front when cut."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]
