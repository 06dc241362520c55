"""A command on a remote pseudo-terminal, driven from the local one: `rexec shell HOST` on a
terminal (the remote user's interactive shell, as `ssh HOST` gives) and `rexec run -t`.

The local terminal goes raw, so every key (Ctrl-C, Ctrl-Z, arrows) reaches the remote pty as
typed and the remote line discipline does the rest; output goes to the screen as it arrives.
SIGWINCH is forwarded as WINDOW. `~.` at the start of a line disconnects and `~?` lists the
escapes, as in ssh. The terminal's settings are given back on every way out (terminal.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from rexec import Client, Disconnected, ExecError, Result, RexecError, SyncProcess
from rexec.cli.common import Interrupts, TerminalSignal, err, writer
from rexec.cli.terminal import (
    DISCONNECT,
    ESCAPE_HELP,
    HELP,
    EscapeParser,
    RawTerminal,
    WindowWatch,
    pty_request,
    window_size,
)
from rexec.result import EXIT_FAILURE

# The remote user's shell, interactive but not a login shell; the server's $SHELL (its
# configured shell, or the user's own for a run-as token), else /bin/sh. `exec`: the shell
# itself leads the pty's session, so its exit status is the session's.
SHELL_COMMAND = 'exec "${SHELL:-/bin/sh}" -i'
READ_SIZE = 16384


class PtySession:
    """One command on a remote pty, with the local terminal (stdin_fd) as its keyboard."""

    def __init__(
        self,
        client: Client,
        proc: SyncProcess,
        size: tuple[int, int],
        stdin_fd: int = 0,
        stdout_fd: int = 1,
    ) -> None:
        self.client = client
        self.proc = proc
        self.size = size  # what the remote pty was last told
        self.stdin_fd = stdin_fd
        self.write = writer(stdout_fd)
        self.escapes = EscapeParser()
        self._winch: WindowWatch | None = None
        self._writing = False  # proc.write() is under way (it may wait, serving the loop)
        self._paused = False  # stdin is not watched until that write is done

    def run(self) -> Result:
        """Until the command ends: its Result (the output went to the screen).

        Raises Disconnected for `~.`, and the connection's error if it ends first.
        """
        client, proc = self.client, self.proc
        self._winch = WindowWatch()
        client.watch(self.stdin_fd, self._keys)
        client.watch(self._winch.read_fd, self._resized)
        try:
            self._resized()  # the size may have changed since the request was made
            for _, data in proc:
                self.write(data)
            return proc.wait()
        finally:
            client.unwatch(self.stdin_fd)
            client.unwatch(self._winch.read_fd)
            self._winch.close()

    def _keys(self) -> None:
        if self._writing:  # a write below waits for the server's window: keys stay unread
            self.client.unwatch(self.stdin_fd)  # (and in order) until it is done
            self._paused = True
            return
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the local terminal is gone (hung up)
            self.client.unwatch(self.stdin_fd)
            self.proc.close_stdin()
            return
        send, actions = self.escapes.feed(data)
        if send:
            self._writing = True
            try:
                self.proc.write(send)
            finally:
                self._writing = False
                if self._paused and self.proc.status is None:
                    self._paused = False
                    self.client.watch(self.stdin_fd, self._keys)
        for action in actions:
            if action == HELP:
                self.write(ESCAPE_HELP)
            elif action == DISCONNECT:
                raise Disconnected("disconnected (~.)")

    def _resized(self) -> None:
        if self._winch is not None:
            self._winch.drain()
        size = window_size(self.stdin_fd)
        if size != self.size and all(size):
            self.size = size
            self.proc.resize(*size)


def run_on_pty(
    client: Client,
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    stdin: bool = True,
) -> Result:
    """Run `command` on a remote pty: its Result (output already written to stdout).

    With a local terminal on stdin: raw mode, keys, resizes and escapes (a PtySession); `~.`
    raises Disconnected, SIGTERM/SIGHUP/SIGQUIT TerminalSignal, the terminal restored
    first. Without one (`rexec run -t` in a pipe): stdin is forwarded as it is (unless
    `stdin` is False), Ctrl-C as SIGINT, and the output (one stream) goes to stdout.
    """
    interactive = stdin and os.isatty(0)
    req = pty_request(0 if interactive else 1)
    proc = client.start(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, pty=req)
    if interactive:
        with RawTerminal(0):
            return PtySession(client, proc, (req.rows, req.cols)).run()
    if stdin:
        proc.feed(0)
    interrupts = Interrupts()
    try:
        client.watch(interrupts.read_fd, interrupts.forwarder(proc.signal))
        return proc.wait(stdout=writer(1))
    finally:
        client.unwatch(interrupts.read_fd)
        interrupts.close()


def shell_main(args: argparse.Namespace) -> int:
    """`rexec shell TARGET` on a terminal (`rexec shell`'s parsed options): the remote user's
    interactive shell on a pty."""
    target: str = args.target
    client: Client | None = None
    try:
        from rexec import Suite

        client = Client(
            target,
            token_file=args.token_file,
            connect_timeout=args.connect_timeout,
            suite=Suite.CHACHAPOLY if args.suite == "chachapoly" else Suite.AESGCM,
        )
        result = run_on_pty(client, SHELL_COMMAND)
        client.close()
        return result.shell_status
    except TerminalSignal as exc:
        return 128 + exc.signum
    except ExecError as exc:
        err(str(exc))
        return exc.exit_code or 127
    except RexecError as exc:
        err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:  # Ctrl-C while connecting (raw mode makes it a key later)
        sys.stderr.write("\n")
        return 128 + 2
    finally:
        if client is not None:
            client.abort()
        sys.stdout.flush()
