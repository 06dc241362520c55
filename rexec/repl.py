"""The interactive shell (`rexec shell TARGET`): placeholder until the REPL lands."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    sys.stderr.write("rexec: the interactive shell is not implemented yet\n")
    return 2
