"""Printing the scenarios for a class: the bytes first, then the checks, then a verdict."""

from __future__ import annotations

from typing import TextIO

from rexec.demo.codec import MAX_BODY, hex_bytes
from rexec.demo.framed import FrameRecord
from rexec.demo.scenarios import Half, ScenarioResult, Transcript, describe

HALF_TITLES = {
    "naive": "naive  (the tutorial: no framing, one recv(1024) per reply)",
    "framed": "framed (u32 big-endian length + body, read with the same recv(1024))",
}


def frame_line(record: FrameRecord) -> str:
    """One decoded frame: the 4 header bytes in hex, the length they carry, the body."""
    frame = record.frame
    return (
        f"{record.route}  header {hex_bytes(frame.header)}  length={frame.length:<5}"
        f"  body {describe(frame.body)}"
    )


def frame_lines(transcript: Transcript) -> list[str]:
    """Every frame of a framed half, plus the refused oversize header if there was one."""
    lines = [frame_line(record) for record in transcript.frames]
    probe = transcript.probe
    if probe is not None and probe.server.refused is not None:
        refused = probe.server.refused
        lines.append(
            f"client -> server  header {hex_bytes(refused.header)}  length={refused.length}"
            f"  refused: over the {MAX_BODY}-byte cap, "
            f"{probe.server.body_buffered_at_refusal} body bytes read"
        )
    return lines


def write_half(out: TextIO, half: Half, show_frames: bool) -> None:
    """A half's story, its checks and (on request) its frames."""
    out.write(HALF_TITLES[half.kind] + "\n")
    for line in half.story:
        out.write(f"  {line}\n")
    for check in half.checks:
        out.write(f"  [{'ok' if check.ok else 'FAIL'}] {check.label}\n")
    if show_frames and half.kind == "framed":
        out.write("  frames, as each receiver decoded them:\n")
        for line in frame_lines(half.transcript):
            out.write(f"    {line}\n")


def write_scenario(out: TextIO, result: ScenarioResult, show_frames: bool) -> None:
    """One scenario: both halves, then its verdict."""
    out.write(f"\n== {result.name}: {result.title} ==\n")
    for half in result.halves:
        write_half(out, half, show_frames)
    if result.ok:
        verdict = "PASS (naive broke exactly as the lesson says; framed exact)"
    elif result.error is not None:
        verdict = f"FAIL (the scenario could not run: {result.error})"
    else:
        failed = [h.kind for h in result.halves if not h.ok]
        verdict = f"FAIL ({' and '.join(failed)} did not behave as the lesson says)"
    out.write(f"verdict {result.name}: {verdict}\n")
