"""How `rexec run` ends, decided in one place: exit status, error kind and message.

Both front ends (one host: rexec.cli.run; a host set: rexec.cli.fleet) turn what happened,
a Result, a HostResult or an exception, into an `Outcome` here; the exit status, the error
line on stderr, `--json` and `--junit` all read it. The kinds of errors themselves are
rexec.result.error_kind's (the fleet API sets them on each HostResult too).

This module is on `rexec run`'s start-up path: json and xml.etree load only when asked for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from rexec.errors import CommandError, ExecError
from rexec.result import EXIT_FAILURE, Result, error_fields, error_kind, timeout_message

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from rexec.client.fleet import HostResult

    class _Args(Protocol):
        target: str | None
        command: list[str]
        json: bool


EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # SIGINT
EXIT_SIGPIPE = 128 + 13  # SIGPIPE: our stdout's reader went away
EXIT_TRANSFER_FAILED = 1  # `rexec cp`: some file failed (its line on stderr), the rest copied
INTERRUPTED = "interrupted: closing the connection (the server stops the command)"
JUNIT_OUTPUT_MAX = 1024 * 1024  # bytes of each stream a JUnit testcase keeps (the last ones)

EXIT_STATUS_HELP = """\
exit status:
  0-255     the remote command's exit status (127: not found, 126: could not run it)
  124       its --timeout fired: the server killed it
  128+N     it was killed by signal N (130: after Ctrl-C)
  141       rexec's stdout was closed (`rexec run HOST yes | head -1`)
  2         usage error: a bad option or value, an unknown command or host
  255       connection, authentication, protocol, refusal or policy failure, or a bad
            client config; `--json` says which in error.kind
  many hosts: 0 when every host succeeded, else the highest status of a host
"""


class UsageError(Exception):
    """A bad `rexec run` command line (exit status 2).

    `parse`: an option parser error, printed as argparse does (`rexec run: error: ...`);
    else a one-line `rexec: ...`. `parsed`: the command line as far as it was read, so that
    `--json` still gets its object.
    """

    def __init__(self, message: str, *, parse: bool = True, parsed: Any = None) -> None:
        super().__init__(message)
        self.parse = parse
        self.parsed = parsed

    @property
    def line(self) -> str:
        return f"rexec run: error: {self}" if self.parse else f"rexec: {self}"


class Outcome:
    """How one host's run ended: its exit status; the error kind and message (None when the
    command ran to its exit and its deadline did not fire); its Result when it ran."""

    __slots__ = ("exit_status", "kind", "message", "result")
    exit_status: int
    kind: str | None
    message: str | None
    result: Result | None

    def __init__(
        self,
        exit_status: int,
        kind: str | None = None,
        message: str | None = None,
        result: Result | None = None,
    ) -> None:
        self.exit_status = exit_status
        self.kind = kind
        self.message = message
        self.result = result


def of_result(result: Result) -> Outcome:
    """The command ran to its exit (or its deadline)."""
    if result.timed_out:
        return Outcome(result.shell_status, "timeout", timeout_message(result.duration), result)
    return Outcome(result.shell_status, result=result)


def of_error(exc: BaseException, *, started: bool = False) -> Outcome:
    """Why there is no Result. `started`: the command had been sent (see error_kind)."""
    if isinstance(exc, UsageError):
        return Outcome(EXIT_USAGE, "usage", str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return Outcome(EXIT_INTERRUPTED, "interrupted", INTERRUPTED)
    if isinstance(exc, BrokenPipeError):
        return Outcome(EXIT_SIGPIPE, "interrupted", "stdout's reader went away")
    kind = error_kind(exc, started=started)
    if kind == "usage":
        status = EXIT_USAGE
    elif kind == "transfer":  # rexec.TransferError: some files failed, the rest were copied
        status = EXIT_TRANSFER_FAILED
    elif isinstance(exc, ExecError):
        status = exc.exit_code or 127
    else:
        status = EXIT_FAILURE
    return Outcome(status, kind, str(exc))


def of_host(r: HostResult) -> Outcome:
    """One host of a set: its HostResult already holds all of it."""
    ran = r.status in ("ok", "exit", "signal", "timeout") and r.error_kind != "exec"
    return Outcome(r.shell_status, r.error_kind, r.error, r.to_result(r.host) if ran else None)


def command_name(command: Sequence[str]) -> str | tuple[str, ...]:
    """CMD as a Result names it: one argument is a shell line, several an argv."""
    return command[0] if len(command) == 1 else tuple(command)


def retry_notice(exc: BaseException, n: int, retries: int, wait: float) -> str:
    return f"{exc}; retry {n}/{retries} in {wait:.1f}s"


# ---- --json ------------------------------------------------------------------------------


def json_object(
    target: str | None,
    command: Sequence[str],
    outcome: Outcome,
    duration: float = 0.0,
    output: tuple[bytes, bytes] = (b"", b""),
) -> dict[str, Any]:
    """`rexec run --json`'s object for one target (or for a host set that failed as a whole):
    Result.to_json_dict's fields, then `exit_status` and `error` ({kind, message} or null).
    `output`: what a command that has no Result printed before it was cut short."""
    result = outcome.result
    if result is None:  # nothing ran; a command that could not start has its 126/127
        code = outcome.exit_status if outcome.kind == "exec" else None
        name = command_name(command)
        result = Result(name, code, None, False, duration, output[0], output[1], target)
    return {
        **result.to_json_dict(target),
        **error_fields(outcome.exit_status, outcome.kind, outcome.message),
    }


def json_line(obj: dict[str, Any]) -> bytes:
    import json

    return json.dumps(obj).encode() + b"\n"


# ---- one line on stderr, and --json, for a run that failed before it began ----------------


def fail_early(args: _Args | None, exc: BaseException) -> int:
    """A failure before any command ran (usage, config): its line, its --json object, its
    exit status."""
    outcome = of_error(exc)
    line = exc.line if isinstance(exc, UsageError) else f"rexec: {outcome.message}"
    if sys.stderr is not None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if args is not None and args.json:
        write_stdout(json_line(json_object(args.target, args.command, outcome)))
    return outcome.exit_status


def write_stdout(data: bytes) -> bool:
    """All of data to fd 1; False when its reader went away."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(1, view) :]
    except BrokenPipeError:
        return False
    return True


# ---- --junit -----------------------------------------------------------------------------


class Tail:
    """The last JUNIT_OUTPUT_MAX bytes of a stream, and how many came before them."""

    def __init__(self, limit: int = JUNIT_OUTPUT_MAX) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, data: bytes | bytearray) -> None:
        self.data += data
        if len(self.data) > 2 * self.limit:
            cut = len(self.data) - self.limit
            del self.data[:cut]
            self.dropped += cut

    def tee(self, sink: Callable[[bytes | bytearray], None]) -> Callable[[bytes | bytearray], None]:
        """A sink that writes to `sink` and keeps the tail here."""

        def write(data: bytes | bytearray) -> None:
            sink(data)
            self.add(data)

        return write


def check_junit_path(path: str) -> None:
    """Fail at the start, not after the run, when the report cannot be written there."""
    where = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise UsageError(f"--junit {path}: is a directory", parse=False)
    if not os.path.isdir(where):
        raise UsageError(f"--junit {path}: no directory {where}", parse=False)
    if not os.access(where, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--junit {path}: not writable", parse=False)


def failure_text(outcome: Outcome) -> str | None:
    """A failed host's JUnit failure message: its status and the end of its stderr (from
    CommandFailed's message, which quotes it), or its error. None when it succeeded."""
    result = outcome.result
    if outcome.kind in (None, "timeout") and result is not None:
        try:
            result.check()
        except CommandError as exc:
            return str(exc)
        return None
    if outcome.kind is None and outcome.exit_status == 0:
        return None
    return f"exit status {outcome.exit_status}, {outcome.kind}: {outcome.message}"


def _xml_text(data: bytes, dropped: int = 0, limit: int = JUNIT_OUTPUT_MAX) -> str:
    """Output as XML 1.0 text: UTF-8 (invalid bytes replaced), no characters XML forbids,
    only the last `limit` bytes."""
    import re

    if len(data) > limit:
        dropped += len(data) - limit
        data = data[-limit:]
    text = data.decode("utf-8", "replace")
    text = re.sub("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]", "\ufffd", text)
    return f"[{dropped} bytes before this left out]\n{text}" if dropped else text


class JUnitCase:
    """One testcase: a host, how it ended, how long it took, what it wrote."""

    __slots__ = ("dropped", "duration", "host", "outcome", "stderr", "stdout")
    host: str
    outcome: Outcome
    duration: float
    stdout: bytes
    stderr: bytes
    dropped: tuple[int, int]  # bytes of stdout, stderr left out before those kept

    def __init__(
        self,
        host: str,
        outcome: Outcome,
        duration: float,
        stdout: bytes = b"",
        stderr: bytes = b"",
        dropped: tuple[int, int] = (0, 0),
    ) -> None:
        self.host = host
        self.outcome = outcome
        self.duration = duration
        self.stdout = stdout
        self.stderr = stderr
        self.dropped = dropped


def junit_xml(
    command: Sequence[str], cases: Sequence[JUnitCase], started: float, elapsed: float
) -> bytes:
    """The report: one testsuite `rexec run`, one testcase per host (classname `rexec`, name
    the host), a <failure> for each host that did not succeed, its output in system-out/err."""
    import xml.etree.ElementTree as ET

    failures = [failure_text(case.outcome) for case in cases]
    suite = ET.Element(
        "testsuite",
        name="rexec run",
        tests=str(len(cases)),
        failures=str(sum(1 for f in failures if f is not None)),
        errors="0",
        skipped="0",
        time=f"{elapsed:.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    )
    properties = ET.SubElement(suite, "properties")
    name = command_name(command)
    shown = name if isinstance(name, str) else " ".join(name)
    ET.SubElement(properties, "property", name="command", value=_xml_text(shown.encode()))
    for case, failure in zip(cases, failures, strict=True):
        testcase = ET.SubElement(
            suite, "testcase", classname="rexec", name=case.host, time=f"{case.duration:.3f}"
        )
        if failure is not None:
            outcome = case.outcome
            kind = outcome.kind
            if kind is None:
                signal = outcome.result is not None and outcome.result.signal is not None
                kind = "signal" if signal else "exit"
            element = ET.SubElement(testcase, "failure", message=_xml_text(failure.encode()))
            element.set("type", kind)
            element.text = _xml_text(failure.encode())
        for tag, data, dropped in (
            ("system-out", case.stdout, case.dropped[0]),
            ("system-err", case.stderr, case.dropped[1]),
        ):
            if data or dropped:
                ET.SubElement(testcase, tag).text = _xml_text(data, dropped)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"


def write_junit(
    path: str, command: Sequence[str], cases: Sequence[JUnitCase], started: float
) -> None:
    """Write the report (replacing the file as a whole); a failure is one line on stderr."""
    data = junit_xml(command, cases, started, time.time() - started)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        with_path = f"--junit {path}: {exc.strerror or exc}"
        if sys.stderr is not None:
            sys.stderr.write(f"rexec: {with_path}\n")
        with contextlib.suppress(OSError):
            os.unlink(tmp)
