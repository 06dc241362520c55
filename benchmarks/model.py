"""Results, the interleaved runner, and the ratio/target bookkeeping."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["rexec", "peer", "floor"]
Better = Literal["lower", "higher"]


class Unavailable(Exception):
    """A contender cannot run here; the message is the reason shown in the table."""


def reason(exc: BaseException) -> str:
    """One short line describing why something failed."""
    if isinstance(exc, Unavailable):
        text = str(exc)
    else:
        msg = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {msg[-1] if msg else ''}".rstrip(": ")
    return text[:160]


@dataclass
class Row:
    key: str  # stable id, e.g. "cold_cli.ssh_curve25519"
    measure: str  # e.g. "cold CLI"
    name: str  # e.g. "ssh -o KexAlgorithms=curve25519-sha256"
    unit: str  # "ms", "s", "MB/s"
    better: Better
    role: Role
    note: str = ""
    samples: list[float] = field(default_factory=list)
    unavailable: str | None = None

    @property
    def ok(self) -> bool:
        return self.unavailable is None and bool(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.ok else None

    def quartiles(self) -> tuple[float, float] | None:
        if not self.ok:
            return None
        if len(self.samples) < 4:
            return min(self.samples), max(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]

    def to_json(self) -> dict[str, object]:
        q = self.quartiles()
        return {
            "key": self.key,
            "measure": self.measure,
            "name": self.name,
            "role": self.role,
            "unit": self.unit,
            "better": self.better,
            "note": self.note,
            "median": self.median,
            "p25": q[0] if q else None,
            "p75": q[1] if q else None,
            "n": len(self.samples),
            "samples": [round(s, 6) for s in self.samples],
            "unavailable": self.unavailable,
        }


@dataclass
class Comparison:
    """rexec row vs another row: ratio = rexec median / other median.

    With `other_key` "" the target is absolute: the rexec median itself vs `threshold`.
    """

    rexec_key: str
    other_key: str
    op: Literal["<=", "<", ">="] | None = None
    threshold: float | None = None
    label: str = ""  # the target as written in the brief

    def evaluate(self, rows: dict[str, Row]) -> dict[str, object]:
        mine, other = rows.get(self.rexec_key), rows.get(self.other_key)
        if self.other_key == "" and self.op is not None and self.threshold is not None:
            return self._absolute(mine)
        out: dict[str, object] = {
            "rexec": self.rexec_key,
            "other": self.other_key,
            "target": self.label or None,
            "ratio": None,
            "status": "-",
        }
        if mine is None or other is None:
            out["status"] = "n/a"
            return out
        if not mine.ok:
            out["status"] = "pending"
            return out
        if not other.ok:
            out["status"] = "n/a"
            return out
        a, b = mine.median, other.median
        assert a is not None and b is not None
        if b == 0:
            out["status"] = "n/a"
            return out
        ratio = a / b
        out["ratio"] = ratio
        if self.op is not None and self.threshold is not None:
            passed = {
                "<=": ratio <= self.threshold,
                "<": ratio < self.threshold,
                ">=": ratio >= self.threshold,
            }[self.op]
            out["status"] = "PASS" if passed else "MISS"
        return out

    def _absolute(self, mine: Row | None) -> dict[str, object]:
        out: dict[str, object] = {
            "rexec": self.rexec_key,
            "other": "",
            "target": self.label or None,
            "ratio": None,
            "value": None,
            "status": "n/a" if mine is None else "pending",
        }
        if mine is not None and mine.ok:
            value = mine.median
            assert value is not None and self.op is not None and self.threshold is not None
            out["value"] = value
            passed = {
                "<=": value <= self.threshold,
                "<": value < self.threshold,
                ">=": value >= self.threshold,
            }[self.op]
            out["status"] = "PASS" if passed else "MISS"
        return out


# A sampler does one unit of work and returns one or more measured values.
Sampler = Callable[[], Sequence[float]]


@dataclass
class Contender:
    row: Row
    sample: Sampler | None  # None: unavailable (row.unavailable says why)


def log(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def interleave(
    contenders: Sequence[Contender],
    rounds: int,
    budget_s: float,
    min_rounds: int = 2,
    verbose: bool = False,
    deadline: float | None = None,
) -> None:
    """Run the contenders round-robin (A B C A B C ...) so drift hits them all alike.

    Bounded by `rounds`, by `budget_s` for this group and by the whole run's `deadline`
    (time.monotonic(); both checked between rounds, after `min_rounds`).
    A contender that raises is marked unavailable with the reason and skipped from then on.
    The order is rotated every round so no contender always runs right after another.
    """
    live = [c for c in contenders if c.sample is not None and c.row.unavailable is None]
    start = time.monotonic()
    for r in range(max(1, rounds)):
        if r >= min_rounds and time.monotonic() - start > budget_s:
            log(f"  time budget ({budget_s:.0f}s) reached after {r} round(s)")
            break
        if r >= min_rounds and deadline is not None and time.monotonic() > deadline:
            log(f"  whole-run time budget reached after {r} round(s)")
            break
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for c in order:
            if c.row.unavailable is not None or c.sample is None:
                continue
            try:
                values = c.sample()
            except Unavailable as exc:
                c.row.unavailable = reason(exc)
            except Exception as exc:
                c.row.unavailable = reason(exc)
                if verbose:
                    traceback.print_exc()
            else:
                c.row.samples.extend(float(v) for v in values)
        live = [c for c in live if c.row.unavailable is None]
        if not live:
            break
    for c in contenders:
        if c.row.unavailable is None and not c.row.samples:
            c.row.unavailable = "no samples"
        status = c.row.unavailable or fmt_value(c.row.median, c.row.unit)
        log(f"  {c.row.name}: {status}")


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:g} {unit}"
