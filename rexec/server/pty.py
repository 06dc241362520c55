"""Pseudo-terminals for commands that ask for one (EXEC `pty`, docs/PROTOCOL.md 10.2.1).

The exec layer spawns such a command with the pty's slave as stdin, stdout and stderr, in a
new session whose controlling terminal is that slave (as sshd and login do), and keeps the
master: it reads the terminal's output from it and writes keystrokes to it. Here: opening
the pair with the requested size and modes, making it the controlling terminal in the child,
resizing (TIOCSWINSZ, which sends SIGWINCH to the foreground process group), and finding the
process groups of a session, because a job-control shell puts each job in its own group.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from rexec.protocol.pty import PtyRequest, apply_modes
from rexec.server.procfs import live_processes

__all__ = ["controlling_terminal", "open_pty", "session_groups", "set_winsize"]

_WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Give the terminal (either end) a new size; the kernel signals SIGWINCH if it changed."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


def open_pty(req: PtyRequest) -> tuple[int, int]:
    """A (master, slave) pair, close-on-exec, sized and with the requested modes on the slave.

    The master is non-blocking (the exec layer polls it); the slave is for the child only.
    """
    master, slave = os.openpty()
    try:
        set_winsize(slave, req.rows, req.cols)
        if req.modes:
            attrs = termios.tcgetattr(slave)
            termios.tcsetattr(slave, termios.TCSANOW, apply_modes(attrs, req.modes))
        os.set_blocking(master, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def controlling_terminal() -> None:
    """preexec_fn of a pty command: its stdin (the slave) becomes the controlling terminal.

    Runs in the child after setsid (Popen's start_new_session) and before exec. Only the
    process itself can acquire a controlling terminal, so this is the one spawn that needs a
    preexec_fn (and gives up Popen's vfork fast path, ~2 ms: nothing for an interactive
    session). It calls nothing but ioctl: safe after fork even with other threads around.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def session_groups(sid: int) -> set[int]:
    """The process groups that have a live (non-zombie) member in session `sid`.

    A job-control shell on a pty runs each job in a group of its own (`vi`, `sleep 100 &`),
    all in the command's session: killing "the command" means killing all of them.
    """
    return {pgrp for pgrp, session in live_processes() if session == sid}
