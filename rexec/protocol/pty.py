"""The pseudo-terminal request of an EXEC: terminal type, size and modes (docs/PROTOCOL.md 10.2.1).

One definition for both ends: the client builds a `PtyRequest` (from its own terminal with
`read_modes`), the server validates the wire form with the same checks and applies the modes
to the pty it opens (`apply_modes`). Mode names are POSIX termios names, lowercased, so a
mode means the same thing on every system; the numeric positions come from `termios` at use.
"""

from __future__ import annotations

import termios
from collections.abc import Mapping

from rexec._record import FrozenRecord, setfield
from rexec.errors import LocalProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# control characters: the byte that produces the effect (0 = disabled, as _POSIX_VDISABLE)
CHAR_MODES: dict[str, int] = {
    "intr": termios.VINTR,
    "quit": termios.VQUIT,
    "erase": termios.VERASE,
    "kill": termios.VKILL,
    "eof": termios.VEOF,
    "susp": termios.VSUSP,
    "werase": termios.VWERASE,
}
# flags: (index in the tcgetattr list, bit)
_IFLAG, _LFLAG = 0, 3
FLAG_MODES: dict[str, tuple[int, int]] = {
    "echo": (_LFLAG, termios.ECHO),
    "iutf8": (_IFLAG, getattr(termios, "IUTF8", 0x4000)),
}
MAX_TERM = 64
# [A-Za-z0-9][A-Za-z0-9._+-]*, checked without re (off `rexec run`'s path)
_TERM_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_TERM_REST = _TERM_FIRST | frozenset("._+-")

ModeValue = int | bool
Modes = Mapping[str, ModeValue]


def _term_ok(term: str) -> bool:
    return term[0] in _TERM_FIRST and all(c in _TERM_REST for c in term)


def term_problem(term: object) -> str | None:
    """Why `term` is not an acceptable terminal type, or None (it ends up in TERM=)."""
    if not isinstance(term, str) or not 1 <= len(term) <= MAX_TERM or not _term_ok(term):
        return f"terminal type must be 1..{MAX_TERM} of A-Z a-z 0-9 . _ + - (got {term!r:.80})"
    return None


def size_problem(rows: object, cols: object) -> str | None:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            return f"pty {name} must be an integer 0..65535"
    return None


def modes_problem(modes: Mapping[str, object]) -> str | None:
    """Why a known mode has a bad value, or None. Unknown names are allowed (and ignored by
    the server), so a newer client's modes do not get its requests refused."""
    for name, value in modes.items():
        if name in CHAR_MODES:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                return f"pty mode {name!r} must be a character code 0..255"
        elif name in FLAG_MODES and not isinstance(value, bool):
            return f"pty mode {name!r} must be true or false"
    return None


class PtyRequest(FrozenRecord):
    """Ask for a pseudo-terminal: `conn.start(cmd, pty=PtyRequest("xterm", 24, 80))`.

    With a pty the command's stdin, stdout and stderr are the terminal: its output arrives
    as one stream (stdout), keystrokes go to stdin, and `resize()` changes the window size.
    `modes` maps termios names (intr, quit, erase, kill, eof, susp, werase: a character
    code, 0 disables; echo, iutf8: booleans) to values; unset modes keep the server's
    defaults.
    """

    __match_args__ = ("term", "rows", "cols", "modes")
    __slots__ = __match_args__
    term: str
    rows: int
    cols: int
    modes: Mapping[str, ModeValue]

    def __init__(
        self, term: str = "xterm", rows: int = 24, cols: int = 80, modes: Modes | None = None
    ) -> None:
        modes = dict(modes or {})
        problem = term_problem(term) or size_problem(rows, cols) or modes_problem(modes)
        if problem is not None:
            raise LocalProtocolError(problem)
        setfield(self, "term", term)
        setfield(self, "rows", rows)
        setfield(self, "cols", cols)
        setfield(self, "modes", modes)

    def __hash__(self) -> int:
        return hash((self.term, self.rows, self.cols, tuple(sorted(self.modes.items()))))

    def to_json(self) -> dict[str, object]:
        """The EXEC body's `pty` member."""
        body: dict[str, object] = {"term": self.term, "rows": self.rows, "cols": self.cols}
        if self.modes:
            body["modes"] = dict(self.modes)
        return body


if TYPE_CHECKING:
    Attrs = list[Any]  # what termios.tcgetattr returns: iflag, oflag, cflag, lflag, ..., cc
else:
    Attrs = list


def read_modes(attrs: Attrs) -> dict[str, ModeValue]:
    """The modes of a terminal, from its tcgetattr() list (to send the local ones along)."""
    cc = attrs[6]
    modes: dict[str, ModeValue] = {}
    for name, index in CHAR_MODES.items():
        value = cc[index]
        modes[name] = value[0] if isinstance(value, bytes) else int(value)
    for name, (field, bit) in FLAG_MODES.items():
        modes[name] = bool(attrs[field] & bit)
    return modes


def apply_modes(attrs: Attrs, modes: Modes) -> Attrs:
    """A copy of a tcgetattr() list with the known `modes` set (unknown names ignored)."""
    out = list(attrs)
    cc = list(out[6])
    out[6] = cc
    for name, value in modes.items():
        if name in CHAR_MODES:
            cc[CHAR_MODES[name]] = bytes([int(value)])
        elif name in FLAG_MODES:
            field, bit = FLAG_MODES[name]
            out[field] = out[field] | bit if value else out[field] & ~bit
    return out
