"""What the front ends share: error lines, raw output sinks, frame tracing, Ctrl-C forwarding."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from rexec import FrameType


def err(message: str) -> None:
    if sys.stderr is None:  # started with fd 2 closed
        return
    sys.stderr.write(f"rexec: {message}\n")
    sys.stderr.flush()


def open_std_fds() -> None:
    """Put /dev/null on any closed fd 0-2, as ssh does: otherwise the socket takes that
    number, and remote output (or our stdin reads) would go through the connection itself."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`-e K=V` options as a dict; ValueError names a malformed one."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"-e expects K=V, got {pair!r}")
        env[key] = value
    return env


def writer(fd: int) -> Any:
    """A sink writing raw bytes to fd. A closed reader (EPIPE) raises BrokenPipeError, which
    ends the command as SIGPIPE would end a local writer (`rexec run H yes | head -1`)."""
    state = {"open": True}

    def write(data: bytes) -> None:
        if not state["open"]:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BrokenPipeError:
            state["open"] = False
            raise
        except BlockingIOError:  # a non-blocking terminal: fall back to a blocking write
            os.set_blocking(fd, True)
            write(bytes(view))

    return write


def trace_fn() -> Any:
    def trace(direction: str, ftype: FrameType, channel: int, length: int) -> None:
        arrow = ">" if direction == "send" else "<"
        sys.stderr.write(f"rexec: {arrow} {ftype.name} ch={channel} len={length}\n")

    return trace


class Interrupts:
    """Ctrl-C forwarding: the first SIGINT goes to the remote command, the second SIGKILL.

    A third one gives up on the server: when stdin backpressure stalls the connection (a
    command that does not read its stdin), no SIGNAL frame can get through, so the CLI
    closes the connection instead (and the server kills the command on disconnect).
    """

    def __init__(self) -> None:
        import signal

        self._signal = signal
        self.count = 0
        self.sent = 0
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self._old_handler = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.count += 1

    def poll(self) -> int | None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 512)
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.count > self.sent:
            self.sent = self.count
            return int(self._signal.SIGINT if self.sent == 1 else self._signal.SIGKILL)
        return None

    def forwarder(self, send: Callable[[int], object]) -> Callable[[], None]:
        """A callback for the wake-up fd: poll() and `send` the signal to forward, if any."""

        def forward() -> None:
            signum = self.poll()
            if signum is not None:
                send(signum)

        return forward

    def close(self) -> None:
        self._signal.set_wakeup_fd(self._old_wakeup)
        self._signal.signal(self._signal.SIGINT, self._old_handler)
        os.close(self.read_fd)
        os.close(self.write_fd)


SUBCOMMANDS = ("run", "cp", "shell", "serve", "token", "demo", "help")


def _bare_word(word: str) -> bool:
    """A name with no address syntax (no dot, colon, slash, bracket, @ or comma): it could be
    a subcommand as well as a host."""
    return bool(word) and word.isascii() and all(c.isalnum() or c in "-_" for c in word)


def unknown_command(word: str, resolve: Callable[..., object] | None = None) -> str | None:
    """The error for `rexec WORD ...` when WORD is neither a subcommand, nor a client-config
    alias, nor a host name that resolves; None when it may be a host.

    A name with address syntax (`lab1.example.net`, `10.0.0.7`, `h:8300`) is a host however
    it resolves, and so is a bare word when the lookup cannot say (DNS down: connecting will
    report it). The message suggests the subcommand the word is closest to, if any.
    """
    import socket

    if not _bare_word(word):
        return None
    from rexec.client.target import load_client_config
    from rexec.errors import ConfigError

    try:
        if word in load_client_config().hosts:
            return None
    except ConfigError:
        return None  # a broken config: the run reports it
    not_found = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    try:
        # bytes: a str would load the IDNA codec (start-up time, as sockdriver.open_socket)
        (resolve or socket.getaddrinfo)(word.encode("ascii"), None)
        return None
    except socket.gaierror as exc:
        if exc.errno not in not_found:
            return None
    except OSError:
        return None
    import difflib

    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    hint = f" (did you mean `rexec {close[0]}`?)" if close else ""
    return f"unknown command or host {word!r}{hint}"


def unwind_on_termination() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM and SIGHUP (a CI job cancelled, the
    terminal gone) raise TerminalSignal: `rexec run` unwinds, closes the connection (the
    server ends the command) and still reports (--json, --junit) before exiting 128 + N."""
    import signal

    def unwind(signum: int, frame: object) -> None:
        raise TerminalSignal(signum)

    old = {signum: signal.signal(signum, unwind) for signum in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for signum, handler in old.items():
            signal.signal(signum, handler)

    return restore


class TerminalSignal(Exception):
    """SIGTERM, SIGHUP or SIGQUIT arrived while rexec.cli.terminal had the terminal in a mode
    of its own: unwind (the `finally` restores it), then exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
