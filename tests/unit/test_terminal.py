"""rexec.cli.terminal: the escape parser byte by byte, raw mode, and restoring the terminal."""

from __future__ import annotations

import os
import signal
import termios
from collections.abc import Iterator

import pytest

from rexec.cli.terminal import (
    DISCONNECT,
    HELP,
    EscapeParser,
    RawTerminal,
    TerminalSignal,
    pty_request,
    raw_attrs,
    window_size,
)
from rexec.server.pty import set_winsize


def feed_all(parser: EscapeParser, *reads: bytes) -> tuple[bytes, list[str]]:
    out, actions = b"", []
    for data in reads:
        sent, acts = parser.feed(data)
        out += sent
        actions += acts
    return out, actions


@pytest.mark.parametrize(
    ("reads", "sent", "actions"),
    [
        ((b"~.",), b"", [DISCONNECT]),  # at the very start: a line start
        ((b"ls\r~.",), b"ls\r", [DISCONNECT]),
        ((b"ls\r", b"~", b"."), b"ls\r", [DISCONNECT]),  # a key per read
        ((b"echo a~.\r",), b"echo a~.\r", []),  # not at a line start: plain bytes
        ((b"~~",), b"~", []),  # ~~ sends one ~
        ((b"~~.",), b"~.", []),  # ... and the line no longer starts there
        ((b"~x",), b"~x", []),  # not an escape: both go
        ((b"~\r",), b"~\r", []),
        ((b"~?",), b"", [HELP]),
        ((b"~?~.",), b"", [HELP, DISCONNECT]),
        ((b"a\n~.rest",), b"a\n", [DISCONNECT]),  # LF counts too; the rest is dropped
        ((b"\x03~.",), b"\x03~.", []),  # Ctrl-C is a byte like any other
        ((b"\r~", b"", b"."), b"\r", [DISCONNECT]),  # an empty read changes nothing
    ],
)
def test_escapes(reads: tuple[bytes, ...], sent: bytes, actions: list[str]) -> None:
    assert feed_all(EscapeParser(), *reads) == (sent, actions)


def test_held_tilde_is_not_sent_until_the_next_key() -> None:
    parser = EscapeParser()
    assert parser.feed(b"~") == (b"", [])
    assert parser.pending
    assert parser.feed(b"a") == (b"~a", [])
    assert not parser.line_start


@pytest.fixture
def tty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_raw_mode_and_restore(tty: tuple[int, int]) -> None:
    _, slave = tty
    before = termios.tcgetattr(slave)
    with RawTerminal(slave):
        raw = termios.tcgetattr(slave)
        assert raw == raw_attrs(before)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not raw[1] & termios.OPOST
    assert termios.tcgetattr(slave) == before


def test_restored_after_an_exception(tty: tuple[int, int]) -> None:
    _, slave = tty
    before = termios.tcgetattr(slave)
    with pytest.raises(ZeroDivisionError), RawTerminal(slave):
        1 / 0  # noqa: B018
    assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_restored_after_a_signal(tty: tuple[int, int], signum: int) -> None:
    _, slave = tty
    before = termios.tcgetattr(slave)
    old = signal.getsignal(signum)
    with pytest.raises(TerminalSignal) as info, RawTerminal(slave):
        os.kill(os.getpid(), signum)
    assert info.value.signum == signum
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signum) == old


def test_pty_request_from_the_terminal(tty: tuple[int, int]) -> None:
    _, slave = tty
    set_winsize(slave, 31, 97)
    attrs = termios.tcgetattr(slave)
    attrs[6][termios.VERASE] = b"\x08"
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    assert window_size(slave) == (31, 97)
    req = pty_request(slave, "screen")
    assert (req.term, req.rows, req.cols) == ("screen", 31, 97)
    assert req.modes["erase"] == 8 and req.modes["intr"] == 3 and req.modes["echo"] is True
    assert pty_request(slave, "bad term!").term == "xterm"


def test_window_size_of_a_non_terminal() -> None:
    r, w = os.pipe()
    try:
        assert window_size(r) == (0, 0)
    finally:
        os.close(r)
        os.close(w)
