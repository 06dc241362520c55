"""The outcome of one remote command, and the errors that carry it.

Shared by the sync, async and CLI clients. Lean on purpose (no asyncio, no dataclasses):
`rexec run` imports it on its start-up path, where every import is latency (DESIGN.md 2a).
`CommandFailed` and `CommandTimeout` live here rather than in rexec.errors because they hold
a Result, and rexec.errors sits below everything (it imports nothing).
"""

from __future__ import annotations

from rexec._record import FrozenRecord, setfield
from rexec.errors import CommandError, ErrorCode
from rexec.protocol.messages import ExitStatus

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_TIMEOUT = 124  # as coreutils `timeout`
EXIT_FAILURE = 255  # as ssh: connection, auth or protocol failure
STDERR_TAIL_LINES = 5  # how much of stderr a CommandFailed message quotes
STDERR_TAIL_BYTES = 2048
# kept output (run_many, `rexec run --json/-b/--outdir`), per host and stream: the first bytes
MAX_OUTPUT = 64 * 1024 * 1024


class Result(FrozenRecord):
    """What a command did. stdout/stderr are bytes: decode for display only.

    Immutable, comparable and hashable, like the frozen dataclass it replaces.
    """

    __match_args__ = (
        "command",
        "exit_code",
        "signal",
        "timed_out",
        "duration",
        "stdout",
        "stderr",
        "target",
    )
    __slots__ = __match_args__
    command: str | tuple[str, ...]
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration: float
    stdout: bytes
    stderr: bytes
    target: str | None  # where it ran: the target as the caller named it

    def __init__(
        self,
        command: str | tuple[str, ...],
        exit_code: int | None,
        signal: int | None = None,
        timed_out: bool = False,
        duration: float = 0.0,
        stdout: bytes = b"",
        stderr: bytes = b"",
        target: str | None = None,
    ) -> None:
        setfield(self, "command", command)
        setfield(self, "exit_code", exit_code)
        setfield(self, "signal", signal)
        setfield(self, "timed_out", timed_out)
        setfield(self, "duration", duration)
        setfield(self, "stdout", stdout)
        setfield(self, "stderr", stderr)
        setfield(self, "target", target)

    @classmethod
    def from_status(
        cls,
        command: str | tuple[str, ...],
        status: ExitStatus,
        stdout: bytes = b"",
        stderr: bytes = b"",
        target: str | None = None,
    ) -> Result:
        return cls(
            command=command,
            exit_code=status.exit_code,
            signal=status.signal,
            timed_out=status.timed_out,
            duration=status.duration,
            stdout=stdout,
            stderr=stderr,
            target=target,
        )

    def with_output(self, stdout: bytes, stderr: bytes) -> Result:
        """The same outcome with this output (a caller that took the streams itself)."""
        return Result(
            self.command,
            self.exit_code,
            self.signal,
            self.timed_out,
            self.duration,
            stdout,
            stderr,
            self.target,
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def shell_status(self) -> int:
        """The status a shell would report: code, 128+N for signal N, 124 for a timeout."""
        if self.timed_out:
            return EXIT_TIMEOUT
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)

    def check(self) -> Result:
        """Return self when ok; raise CommandTimeout or CommandFailed (holding self) otherwise.

        The message names the command and where it ran, and ends with the last lines of
        stderr, which usually say why.
        """
        where = f" on {self.target}" if self.target is not None else ""
        if self.timed_out:
            head = f"command timed out after {self.duration:.1f}s{where}: {self._name()}"
            raise CommandTimeout(head + self._stderr_tail(), self)
        if self.exit_code != 0:
            how = (
                f"exit status {self.exit_code}"
                if self.exit_code is not None
                else f"signal {self.signal}"
            )
            head = f"command failed with {how}{where}: {self._name()}"
            raise CommandFailed(head + self._stderr_tail(), self)
        return self

    def _name(self) -> str:
        text = self.command if isinstance(self.command, str) else " ".join(self.command)
        return text if len(text) <= 80 else text[:77] + "..."

    def _stderr_tail(self) -> str:
        """The last lines of stderr, bounded, printable: remote bytes must not drive a terminal."""
        tail = self.stderr[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
        lines = [ln.rstrip("\r") for ln in tail.rstrip("\n").split("\n")][-STDERR_TAIL_LINES:]
        lines = ["".join(c if c.isprintable() or c == "\t" else "?" for c in ln) for ln in lines]
        if not any(lines):
            return ""
        return "".join(f"\n  stderr: {ln}" for ln in lines)

    def to_json_dict(self, target: str | None = None) -> dict[str, Any]:
        """One machine-readable object; output as text when valid UTF-8, else base64."""
        out: dict[str, Any] = {}
        target = self.target if target is None else target
        if target is not None:
            out["target"] = target
        out.update(
            command=self.command if isinstance(self.command, str) else list(self.command),
            exit_code=self.exit_code,
            signal=self.signal,
            timed_out=self.timed_out,
            duration=round(self.duration, 6),
        )
        for name, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            try:
                out[name] = data.decode("utf-8")
                out[f"{name}_encoding"] = "utf-8"
            except UnicodeDecodeError:
                import base64  # only here: it imports re

                out[name] = base64.b64encode(data).decode("ascii")
                out[f"{name}_encoding"] = "base64"
        return out


def timeout_message(duration: float) -> str:
    """What a command's server-side deadline did, in words (stderr, `--json`, JUnit)."""
    return f"command timed out after {duration:.1f}s (killed by the server)"


# An error's kind (`error.kind` in `rexec run --json`, HostResult.error_kind): that of the first
# class in its MRO named here. By name, so a class this version of rexec.errors does not have
# yet costs nothing. CommandTimeout: a command's deadline (exit 124); ConnectTimeout: connecting.
_KIND_BY_CLASS = {
    "HostSetError": "usage",
    "ConfigError": "config",
    "ServerRefused": "refused",
    "NotRexecServer": "protocol",
    "AuthError": "auth",
    "ConnectTimeout": "timeout",
    "CommandTimeout": "timeout",
    "TruncatedError": "truncated",
    "ConnectionLost": "connect",
    "PolicyError": "policy",
    "RemoteError": "server",
    "ExecError": "exec",
    "ProtocolError": "protocol",
    "TransferError": "transfer",  # rexec.transfer: some files of a put/get failed
}
_REFUSAL_CODES = frozenset({ErrorCode.LIMIT, ErrorCode.SHUTDOWN})


def error_kind(exc: BaseException, *, started: bool = False) -> str:
    """The kind of error `exc` is: `connect`, `auth`, `refused`, `policy`, `protocol`, ...

    `started`: the command had been sent when it happened. A connection that breaks then is
    `truncated` (the command may have run: never retry it); before, it is `connect`.
    A server ERROR saying it is at a limit or shutting down is a refusal.
    """
    kind = "internal"
    for cls in type(exc).__mro__:
        if cls.__name__ in _KIND_BY_CLASS:
            kind = _KIND_BY_CLASS[cls.__name__]
            break
    if kind == "connect" and started:
        return "truncated"
    if kind == "server" and getattr(exc, "code", None) in _REFUSAL_CODES:
        return "refused"
    return kind


def error_fields(exit_status: int, kind: str | None, message: str | None) -> dict[str, Any]:
    """The end of every `--json` object: `exit_status`, and `error` ({kind, message} or null)."""
    error = None if kind is None else {"kind": kind, "message": message or ""}
    return {"exit_status": exit_status, "error": error}


def dropped_fields(stdout_dropped: int, stderr_dropped: int) -> dict[str, int]:
    """`--json`'s `stdout_dropped`/`stderr_dropped`: only when output past the cap was dropped,
    so that every other object stays as it was."""
    fields = {}
    if stdout_dropped:
        fields["stdout_dropped"] = stdout_dropped
    if stderr_dropped:
        fields["stderr_dropped"] = stderr_dropped
    return fields


class Head:
    """The first `limit` bytes of a stream (None: all of it), and how many past them were
    dropped: kept output is bounded (a chatty command on many hosts must not exhaust memory),
    what streams live is not. The stream is read to its end either way (flow keeps flowing)."""

    __slots__ = ("data", "dropped", "limit")

    def __init__(self, limit: int | None = MAX_OUTPUT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, data: bytes | bytearray | memoryview) -> None:
        if self.limit is None:
            self.data += data
            return
        room = max(self.limit - len(self.data), 0)
        if len(data) <= room:
            self.data += data
        else:
            self.data += data[:room]
            self.dropped += len(data) - room


class _ResultError(CommandError):
    """A CommandError holding the command's Result (picklable with it)."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type[_ResultError], tuple[str, Result]]:
        return (type(self), (str(self), self.result))


class CommandFailed(_ResultError):
    """Result.check(): non-zero exit status or killed by a signal. `result` says everything."""


class CommandTimeout(_ResultError):
    """Result.check(): the server killed the command at its deadline. `result` has its output."""
