"""`rexec demo`: why the tutorial socket program breaks, and how framing fixes it.

Everything runs on 127.0.0.1 with ports chosen at run time; the servers live in threads
this command owns and are gone before it returns. See docs/FRAMING.md for the lesson.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

CHOICES = ("truncation", "sticky", "empty", "all")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexec demo",
        description="Show, with real bytes on 127.0.0.1, why a TCP program needs framing.",
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        default="all",
        choices=CHOICES,
        help="which scenario to run (default: all)",
    )
    parser.add_argument(
        "--show-frames",
        action="store_true",
        help="print each framed message's header bytes in hex with the decoded length",
    )
    return parser


def main(argv: list[str]) -> int:
    """Run the chosen scenarios; 0 if every one behaved as the lesson says, 1 if not."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2

    from rexec.demo.report import write_scenario
    from rexec.demo.scenarios import NAMES, run_scenario

    out = sys.stdout
    names = NAMES if args.scenario == "all" else (args.scenario,)
    out.write("rexec demo: the tutorial socket pair vs. length-prefixed frames (127.0.0.1)\n")
    results = []
    for name in names:
        result = run_scenario(name)
        write_scenario(out, result, args.show_frames)
        out.flush()
        results.append(result)
    passed = sum(result.ok for result in results)
    out.write(f"\n{passed}/{len(results)} scenarios behaved as the lesson says\n")
    return 0 if passed == len(results) else 1
