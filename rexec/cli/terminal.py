"""The local terminal of an interactive pty session: raw mode, its size, and ssh's escapes.

`RawTerminal` puts the terminal in raw mode (keys go to the remote pty as typed, Ctrl-C
included) and gives back exactly the settings it found on every way out: a normal end, an
exception, a lost connection, SIGTERM/SIGHUP/SIGQUIT (turned into an exception so that the
`finally` runs), Ctrl-C storms (ISIG is off: they are bytes, not signals). Only SIGKILL
leaves the terminal raw, as it would for ssh.

`EscapeParser` is ssh's escape rule as a pure state machine: `~` as the first character of
a line is held back and looks at the next key: `~.` disconnects, `~?` lists the escapes,
`~~` sends one `~`, anything else sends both.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios
from types import FrameType, TracebackType

from rexec.cli.common import TerminalSignal
from rexec.protocol.pty import Attrs, PtyRequest, read_modes, term_problem

ESCAPE = 0x7E  # ~
ESCAPE_HELP = (
    b"Supported escape sequences:\r\n"
    b" ~.   - terminate connection\r\n"
    b" ~?   - this message\r\n"
    b" ~~   - send the escape character by typing it twice\r\n"
    b"(Note that escapes are only recognized immediately after newline.)\r\n"
)
_WINSIZE = struct.Struct("HHHH")
_NEWLINES = b"\r\n"

# what EscapeParser asks the session to do
DISCONNECT = "disconnect"
HELP = "help"


class EscapeParser:
    """Feed it the keys read from the terminal; it returns what to send and what to do.

    Pure: no I/O, so every rule is testable byte by byte. The line-start state survives
    across reads (a key per read, as a person types, or a paste in one read).
    """

    def __init__(self, escape: int = ESCAPE) -> None:
        self.escape = escape
        self.line_start = True  # the session starts at the beginning of a line
        self.pending = False  # an escape character was held back at the start of a line

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """(bytes to send to the remote side, actions in order). After DISCONNECT, the rest
        of `data` is dropped."""
        out = bytearray()
        actions: list[str] = []
        for byte in data:
            if self.pending:
                self.pending = False
                if byte == ord("."):
                    actions.append(DISCONNECT)
                    return bytes(out), actions
                if byte == ord("?"):
                    actions.append(HELP)
                    self.line_start = True  # ssh: the next ~ still starts an escape
                    continue
                if byte != self.escape:  # not an escape: the ~ was meant literally
                    out.append(self.escape)
                out.append(byte)
            elif self.line_start and byte == self.escape:
                self.pending = True
                continue
            else:
                out.append(byte)
            self.line_start = byte in _NEWLINES
        return bytes(out), actions


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd; (0, 0) when it does not know."""
    try:
        rows, cols, _, _ = _WINSIZE.unpack(
            fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * _WINSIZE.size)
        )
    except OSError:
        return 0, 0
    return rows, cols


def pty_request(fd: int, term: str | None = None) -> PtyRequest:
    """The pty to ask for: the terminal on fd's type ($TERM), size and modes (erase, intr,
    ...); 24x80 and the server's default modes when fd is no terminal."""
    term = term or os.environ.get("TERM") or "dumb"
    if term_problem(term) is not None:  # an odd $TERM: still a terminal
        term = "xterm"
    rows, cols = window_size(fd)
    try:
        modes = read_modes(termios.tcgetattr(fd))
    except termios.error:
        modes = {}
    if not rows or not cols:
        rows, cols = 24, 80
    return PtyRequest(term, rows, cols, modes)


def raw_attrs(attrs: Attrs) -> Attrs:
    """ssh's raw mode (cfmakeraw without touching the character size): no echo, no line
    editing, no signals from keys, no output processing, reads return each byte."""
    new = list(attrs)
    iflag, oflag, cflag, lflag = new[:4]
    iflag |= termios.IGNPAR
    iflag &= ~(termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON) & ~(
        termios.IXANY | termios.IXOFF
    )
    lflag &= ~(termios.ISIG | termios.ICANON | termios.ECHO | termios.ECHOE | termios.ECHOK) & ~(
        termios.ECHONL | termios.IEXTEN
    )
    oflag &= ~termios.OPOST
    new[:4] = [iflag, oflag, cflag, lflag]
    cc = list(new[6])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    new[6] = cc
    return new


def cbreak_attrs(attrs: Attrs) -> Attrs:
    """No line editing by the kernel, everything else as it was (echo, signals from keys).

    The REPL keeps its terminal so while its commands run: keys typed ahead then wait as
    plain bytes for readline. In the normal (canonical) mode an early Ctrl-D is not a byte
    but an end-of-file mark, which the kernel turns into a NUL when readline switches to
    its own mode: the Ctrl-D was lost. Echo stays on: readline echoes what it reads only
    when the terminal it found did (it takes no echo for a password prompt).
    """
    new = list(attrs)
    new[3] = new[3] & ~termios.ICANON
    cc = list(new[6])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    new[6] = cc
    return new


_UNWIND = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _unwind(signum: int, frame: FrameType | None) -> None:
    raise TerminalSignal(signum)


class RawTerminal:
    """`with RawTerminal(fd):` raw mode inside, the saved settings restored on the way out.

    The settings are restored with TCSADRAIN: output already written reaches the screen, and
    keys typed ahead stay for whoever reads next (the local shell). `cbreak=True`: the
    gentler `cbreak_attrs` mode instead of raw.
    """

    def __init__(self, fd: int, *, cbreak: bool = False) -> None:
        self.fd = fd
        self._mode = cbreak_attrs if cbreak else raw_attrs
        self.saved: Attrs | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> RawTerminal:
        self.saved = termios.tcgetattr(self.fd)
        for signum in _UNWIND:
            self._old[signum] = signal.signal(signum, _unwind)
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._mode(self.saved))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Give back the saved settings and signal handlers; idempotent."""
        saved, self.saved = self.saved, None
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        old, self._old = self._old, {}
        for signum, handler in old.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


class WindowWatch:
    """SIGWINCH as a readable fd (a wake-up pipe), for a selector loop to forward resizes."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._old = signal.signal(signal.SIGWINCH, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            os.write(self._write_fd, b"w")

    def drain(self) -> None:
        """Empty the pipe: one resize after any number of signals."""
        with contextlib.suppress(OSError):
            while os.read(self.read_fd, 512):
                pass

    def close(self) -> None:
        signal.signal(signal.SIGWINCH, self._old)
        os.close(self.read_fd)
        os.close(self._write_fd)
