"""The interactive shell (`rexec shell TARGET`): one authenticated connection, a command per line.

Every line is one EXEC on a new channel (`/bin/sh -c LINE` on the server), so session state
lives here: `cd` and `export` are checked on the server, then sent as `cwd=`/`env=` with every
later command. Built-ins start with `:`; `cd`, `export`, `unset`, `pwd` and `exit` are handled
only when they are a simple command (no `;`, `|`, `&&`...); anything else goes to the server.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from rexec import (
    Client,
    ConnectionLost,
    ErrorCode,
    ExecError,
    ProtocolError,
    RemoteError,
    Result,
    RexecError,
    Suite,
)
from rexec.cli.common import TerminalSignal
from rexec.cli.lineedit import LineEditor, history_path
from rexec.cli.terminal import RawTerminal
from rexec.result import EXIT_FAILURE

if TYPE_CHECKING:
    from rexec import FrameType

RED, RESET = "\x1b[31m", "\x1b[0m"
BUILTINS = (":help", ":timeout", ":env", ":trace", ":exit", "cd", "export", "unset", "pwd", "exit")
BUILTIN_ARGS = {":trace": ("on", "off"), ":timeout": ("off",)}
# codes an ERROR frame carries for one command; any other code ends the connection
CHANNEL_CODES = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.EXEC_FAILED, ErrorCode.LIMIT, ErrorCode.POLICY}
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HELP = """\
Each line runs as `/bin/sh -c LINE` on the server, on a new channel of one connection,
with no stdin (it reads EOF), in the tracked directory and with the exported variables.
  cd [DIR|-]        change the remote directory (checked on the server; kept)
  export K=V ...    set variables for later commands (the server's allowlist applies)
  unset K ...       drop exported variables
  pwd               print the tracked remote directory
  exit [N], Ctrl-D  leave (with N, else the last command's status)
  :timeout SECS|off server-enforced deadline for later commands (status 124)
  :env              list the exported variables
  :trace on|off     print frame headers to stderr
  :help, :exit
Ctrl-C sends SIGINT to the running command (twice: SIGKILL); at the prompt it clears the line.
"""


class _Leave(Exception):
    """Raised by `exit`/`:exit` to end the loop; args[0] is the exit status."""


class _Lost(Exception):
    """The connection is gone; carries the one-line reason."""


def _write(fd: int, data: bytes) -> None:
    """Write all of data; a closed reader or a non-blocking terminal never crashes the shell."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            os.set_blocking(fd, True)
        except BrokenPipeError:
            return


def _say(message: str) -> None:
    """One line of our own on stderr, as the CLI writes them."""
    _write(2, f"rexec: {message}\n".encode(errors="replace"))


class Output:
    """Live sinks for stdout and stderr: per-stream incremental UTF-8 decoding (a character
    split across chunks survives; bad bytes become U+FFFD), optional red stderr, and
    whether the cursor ended mid-line (so the prompt starts on a fresh one)."""

    def __init__(self, red_stderr: bool) -> None:
        self._decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in (1, 2)}
        self._red = red_stderr
        self.mid_line = False

    def sink(self, fd: int) -> Callable[[bytes | bytearray], None]:
        return lambda data: self._emit(fd, self._decoders[fd].decode(data))

    def _emit(self, fd: int, text: str) -> None:
        if not text:
            return
        self.mid_line = not text.endswith("\n")
        if fd == 2 and self._red:  # reset before the newline: the prompt line stays plain
            body = text.removesuffix("\n")
            text = RED + body + RESET + text[len(body) :]
        _write(fd, text.encode("utf-8"))

    def finish(self) -> None:
        """End of a command: flush half characters and put the cursor on a new line."""
        for fd, decoder in self._decoders.items():
            self._emit(fd, decoder.decode(b"", final=True))
            decoder.reset()
        if self.mid_line:
            _write(1, b"\n")
            self.mid_line = False


class Shell:
    """The REPL: session state (cwd, env, timeout) kept locally and sent with every EXEC."""

    def __init__(
        self,
        target: str,
        *,
        token_file: str | None = None,
        connect_timeout: float | None = None,
        suite: Suite = Suite.AESGCM,
        interactive: bool = True,
        trace: bool = False,
    ) -> None:
        self.target = target
        self.endpoint = target  # the address, once known
        self._token_file = token_file
        self._connect_timeout = connect_timeout
        self._suite = suite
        self.interactive = interactive
        self.tracing = trace
        self.conn: Client | None = None
        self.user = self.host = "?"
        self.home: str | None = None
        self.cwd: str | None = None  # None: the server's default (the remote home)
        self.oldcwd: str | None = None
        self.env: dict[str, str] = {}
        self.timeout: float | None = None
        self.status = 0
        self.refused: RexecError | None = None  # why the last remote() returned None
        color = interactive and os.isatty(2) and "NO_COLOR" not in os.environ
        self.output = Output(red_stderr=color)

    # ---- connection ----------------------------------------------------------------

    def _trace(self, direction: str, ftype: FrameType, channel: int, length: int) -> None:
        """Always installed; prints only while `:trace on`, so toggling needs no reconnect."""
        if self.tracing:
            arrow = ">" if direction == "send" else "<"
            _say(f"{arrow} {ftype.name} ch={channel} len={length}")

    def connect(self) -> None:
        """Open and authenticate a connection; the first time, learn the remote home."""
        conn = Client(
            self.target,
            token_file=self._token_file,
            connect_timeout=self._connect_timeout,
            suite=self._suite,
            trace=self._trace,
        )
        info = conn.info
        self.conn, self.user, self.host = conn, info.user, info.host
        self.endpoint = str(conn.endpoint)
        if self.home is None:  # a token whose policy refuses this probe: no home, quietly
            result = self.remote("pwd -P", capture=True, quiet=True)
            if result is not None and result.exit_code == 0:
                self.home = self.cwd = _last_line(result.stdout)

    @staticmethod
    def _drop(conn: Client | None) -> None:
        """Close a connection that may already be dead, quietly."""
        if conn is not None:
            with contextlib.suppress(Exception):  # gone either way; close() aborts the socket
                conn.close()

    def close(self) -> None:
        self._drop(self.conn)
        self.conn = None

    def remote(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        capture: bool = False,
        timeout: float | None = None,
        from_home: bool = False,
        quiet: bool = False,
    ) -> Result | None:
        """Run one command with Ctrl-C forwarding. None when the server refused it (the reason
        is printed and the status set, unless quiet); raises _Lost when the connection is gone.

        capture: keep stdout in the Result (stderr still streams, so errors show live).
        """
        from rexec.cli.common import Interrupts

        if self.conn is None:
            raise _Lost("not connected")
        conn = self.conn
        interrupts = Interrupts()
        self.refused = None
        try:
            proc = conn.start(
                command,
                env=self.env if env is None else env,
                cwd=None if from_home else self.cwd,
                timeout=timeout,
            )
            conn.watch(interrupts.read_fd, interrupts.forwarder(proc.signal))
            result = proc.wait(
                stdout=None if capture else self.output.sink(1), stderr=self.output.sink(2)
            )
        except ExecError as exc:
            self._refused(exc, exc.exit_code or 127, quiet)
            return None
        except RemoteError as exc:
            if exc.code not in CHANNEL_CODES:
                raise _Lost(str(exc)) from None
            self._refused(exc, 1, quiet)
            return None
        except (ConnectionLost, ProtocolError, OSError) as exc:
            raise _Lost(str(exc)) from None
        finally:
            conn.unwatch(interrupts.read_fd)
            interrupts.close()
            if interrupts.count:
                self.output.mid_line = True  # the terminal echoed ^C
            self.output.finish()
        self.status = result.shell_status
        if result.timed_out:
            _say(f"command timed out after {result.duration:.1f}s (killed by the server)")
        return result

    def _refused(self, exc: RexecError, status: int, quiet: bool) -> None:
        self.refused = exc
        if not quiet:
            _say(str(exc))
            self.status = status

    # ---- the loop ------------------------------------------------------------------

    def prompt(self) -> str:
        where = "~" if self.cwd is None else self.cwd
        if where == self.home:
            where = "~"
        elif self.home not in (None, "/") and where.startswith(f"{self.home}/"):
            where = "~" + where[len(self.home or "") :]
        status = f" [{self.status}]" if self.status else ""
        sign = "#" if self.user == "root" else "$"
        text = f"{self.user}@{self.host}:{where}{status}{sign} "
        return "".join(c if c.isprintable() else "?" for c in text)  # remote names: no escapes

    def loop(self, read: Callable[[str], str]) -> int:
        """Read, dispatch, repeat; returns the exit status of the whole session."""
        while True:
            try:
                line = read(self.prompt() if self.interactive else "")
            except EOFError:  # as a shell's end of input: leave with the last status
                if self.interactive:
                    _write(1, b"\n")
                return self.status
            except KeyboardInterrupt:
                _write(1, b"^C\n")  # the line is dropped; readline starts a fresh one
                continue
            except UnicodeDecodeError:
                self._fail("that line is not valid UTF-8; not sent")
                continue
            # The server may have closed while we sat at the prompt (idle timeout, shutdown):
            # notice it before sending, so the line runs after a reconnect, not into the void.
            gone = self.conn.check_alive() if self.conn is not None and line.strip() else None
            if gone is not None and not self.reconnect(gone):
                return EXIT_FAILURE
            try:
                self.dispatch(line)
            except _Leave as leave:
                return int(leave.args[0])
            except KeyboardInterrupt:
                _write(1, b"\n")
            except _Lost as lost:
                if not self.reconnect(str(lost)):
                    return EXIT_FAILURE

    def reconnect(self, reason: str) -> bool:
        """Say the connection is gone (one line) and offer to reconnect; False to leave."""
        self.close()
        reason = reason.removeprefix(f"connection to {self.endpoint} lost: ")
        _say(f"connection to {self.target} lost: {reason}")
        if not self.interactive:
            return False
        while True:
            try:
                answer = input("reconnect? [Y/n] ").strip().lower()  # not into history
            except (EOFError, KeyboardInterrupt):
                _write(1, b"\n")
                return False
            if answer in ("n", "no"):
                return False
            if answer not in ("", "y", "yes"):
                continue
            try:
                self.connect()
                _say(f"reconnected to {self.user}@{self.host}")
                return True
            except KeyboardInterrupt:
                _write(1, b"\n")
            except RexecError as exc:
                _say(str(exc))

    def dispatch(self, line: str) -> None:
        """One line: nothing when blank, a built-in when it is one, else a remote command."""
        text = line.strip()
        if not text:
            return
        if text.startswith(":"):
            self.builtin(text.split())
            return
        words = _simple_words(text)
        head = text.split(None, 1)[0]
        if words and words[0] in ("cd", "export", "unset", "pwd", "exit"):
            getattr(self, f"do_{words[0]}")(words[1:], text)
            return
        if words is None and head in ("cd", "export", "unset"):
            _say(f"note: {head} in a compound command lasts for that line only")
        self.remote(text, timeout=self.timeout)

    # ---- built-ins -----------------------------------------------------------------

    def builtin(self, words: list[str]) -> None:
        cmd, args = words[0], words[1:]
        if cmd in (":exit", ":quit", ":q"):
            raise _Leave(0)
        if cmd == ":help":
            _write(1, HELP.encode())
        elif cmd == ":env":
            self._show_env()
        elif cmd == ":trace" and args in (["on"], ["off"]):
            self.tracing = args == ["on"]
        elif cmd == ":trace":
            _say(f":trace is {'on' if self.tracing else 'off'} (use :trace on|off)")
        elif cmd == ":timeout" and not args:
            shown = "off" if self.timeout is None else f"{self.timeout:g}s"
            _say(f":timeout is {shown} (use :timeout SECS|off)")
        elif cmd == ":timeout" and len(args) == 1:
            self._set_timeout(args[0])
        else:
            self._fail(f"unknown built-in {' '.join(words)!r} (try :help)")

    def _set_timeout(self, arg: str) -> None:
        if arg.lower() in ("off", "none", "0"):
            self.timeout = None
            return
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if not 0 < value < 1e9:
            return self._fail(f":timeout expects seconds > 0 or 'off', got {arg!r}")
        self.timeout = value

    def _fail(self, message: str) -> None:
        _say(message)
        self.status = 1

    def _show_env(self) -> None:
        lines = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(self.env.items()))
        _write(1, lines.encode(errors="replace"))

    def do_exit(self, args: list[str], line: str) -> None:
        if not args:
            raise _Leave(self.status)  # as sh's exit: the last command's status
        if len(args) == 1 and args[0].isdigit():
            raise _Leave(int(args[0]) & 0xFF)
        self._fail("exit: usage: exit [N]")

    def do_pwd(self, args: list[str], line: str) -> None:
        """The tracked directory is already physical (pwd -P), so -L/-P need no round trip."""
        if self.cwd is None:
            return self._fail("pwd: the remote directory is unknown")
        _write(1, f"{self.cwd}\n".encode(errors="replace"))

    def do_cd(self, args: list[str], line: str) -> None:
        """Let the server's shell resolve DIR (~, $VAR, quotes) from our cwd; adopt its pwd -P."""
        if len(args) > 1:
            return self._fail("cd: too many arguments")
        raw = line.split(None, 1)[1] if args else ""
        if args == ["-"]:
            if self.oldcwd is None:
                return self._fail("cd: no previous directory")
            raw = shlex.quote(self.oldcwd)
        command = f"cd -- {raw} && pwd -P" if raw else "cd && pwd -P"
        result = self.remote(command, capture=True)
        if result is None and isinstance(self.refused, ExecError) and self.cwd is not None:
            _say("cd: the current directory is gone; trying from the remote home")
            result = self.remote(command, capture=True, from_home=True)
        if result is None or result.exit_code != 0:
            return
        try:
            path = _last_line(result.stdout, strict=True)
        except UnicodeDecodeError:
            return self._fail("cd: the directory's name is not UTF-8; staying here")
        if path.startswith("/"):
            self.oldcwd, self.cwd = self.cwd, path
            if args == ["-"]:
                _write(1, f"{path}\n".encode())

    def do_export(self, args: list[str], line: str) -> None:
        """Evaluate the assignments in the server's shell with the new names in env= (which
        puts them through the allowlist); keep the values only if the server agreed."""
        if not args or args == ["-p"]:
            self._show_env()
            return
        names: list[str] = []
        for word in args:
            name = word.split("=", 1)[0]
            if not _NAME.fullmatch(name):
                return self._fail(f"export: {name!r} is not a valid variable name")
            if "=" not in word and name not in self.env:
                return self._fail(f"export: {name} has no value here (use export {name}=VALUE)")
            names.append(name)
        env = {**self.env, **{n: self.env.get(n, "") for n in names}}
        dump = " ".join(f'"${{{n}}}"' for n in names)
        result = self.remote(f"{line}\nprintf '%s\\0' {dump}", env=env, capture=True)
        if result is None or result.exit_code != 0:
            return
        values = result.stdout.split(b"\0")[: len(names)]
        try:
            decoded = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            return self._fail("export: the value is not UTF-8; not kept")
        self.env.update(zip(names, decoded, strict=True))

    def do_unset(self, args: list[str], line: str) -> None:
        for name in args:
            self.env.pop(name, None)


def _last_line(data: bytes, strict: bool = False) -> str:
    """The last line of a command's output (cd prints the directory again when CDPATH hits)."""
    return data.decode("utf-8", "strict" if strict else "replace").rstrip("\n").split("\n")[-1]


def _simple_words(line: str) -> list[str] | None:
    """The words of a simple command, unquoted; None if it has operators or bad quoting."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        words = list(lex)
    except ValueError:
        return None
    if any(w and all(c in lex.punctuation_chars for c in w) for w in words):
        return None
    return words


# ---- line editing --------------------------------------------------------------------


# ---- entry point ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rexec shell",
        description="Interactive shell on TARGET. On a terminal: the remote user's shell on a "
        "pseudo-terminal, as `ssh TARGET` gives (~. disconnects, ~? lists the escapes). With "
        "--repl, or when stdin is not a terminal: a line REPL, each line a remote command.",
    )
    p.add_argument(
        "target", metavar="TARGET", help="host[:port], unix:/path, or a client-config alias"
    )
    p.add_argument("--token-file", metavar="FILE", help="file holding the client token (mode 0600)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECS",
        help="deadline for connecting and the handshake",
    )
    p.add_argument("--trace", action="store_true", help="start with :trace on")
    p.add_argument("--suite", choices=("aesgcm", "chachapoly"), help="Noise cipher suite")
    p.add_argument(
        "--repl",
        action="store_true",
        help="the line REPL even on a terminal (each line one remote command; the default "
        "when stdin is not a terminal)",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if os.isatty(0) and not args.repl:
        from rexec.cli.ptyshell import shell_main

        return shell_main(args)
    interactive = os.isatty(0)
    if interactive:  # Ctrl-C must work even when started with SIGINT ignored (`cmd &`)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    shell: Shell | None = None
    try:
        suite = Suite.CHACHAPOLY if args.suite == "chachapoly" else Suite.AESGCM
        shell = Shell(
            args.target,
            token_file=args.token_file,
            connect_timeout=args.connect_timeout,
            suite=suite,
            interactive=interactive,
            trace=args.trace,
        )
        shell.connect()
        if interactive:
            where = f"{shell.user}@{shell.host} ({shell.endpoint})"
            _say(f"connected to {where}; :help for built-ins, Ctrl-D to leave")
        if not interactive:
            return shell.loop(input)
        read = LineEditor(history_path(), BUILTINS, BUILTIN_ARGS, _say).read
        with RawTerminal(0, cbreak=True):  # keys typed ahead (an early Ctrl-D) stay keys
            return shell.loop(read)
    except _Lost as lost:
        _say(f"connection to {args.target} lost: {lost}")
        return EXIT_FAILURE
    except RexecError as exc:
        _say(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _write(2, b"\n")
        return 130
    except TerminalSignal as exc:
        return 128 + exc.signum
    finally:
        if shell is not None:
            shell.close()
        sys.stdout.flush()
