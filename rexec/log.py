"""Structured logging (structlog) for the server, and the append-only audit log.

Logs are for operators: console lines on a TTY, JSON lines otherwise, each carrying the
connection id, peer and key id bound by the server. The audit log is a separate record of
who ran what, one JSON line per command, written so that concurrent records never tear.
Secrets are never logged; a redacting processor backs that rule up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Collection, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from rexec.errors import AuditLogError, ConfigError
from rexec.statefile import open_trusted

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
REDACTED = "[REDACTED]"
# A key is sensitive if a word in it names a secret, unless it only names where a secret
# lives or which one it is (token_file, token_name, key_id are fine to log).
_SENSITIVE = re.compile(r"secret|token|psk|passw(or)?d|passphrase|private_?key", re.I)
_HARMLESS_SUFFIX = re.compile(r"_(file|path|name|names|id|count|source)$", re.I)
_TOKEN_TEXT = re.compile(r"(rexec1:[0-9a-f]{16}:)[A-Za-z0-9_-]{43}=?")


def _sensitive(key: str) -> bool:
    return bool(_SENSITIVE.search(key)) and not _HARMLESS_SUFFIX.search(key)


def _scrub(value: Any, depth: int = 0) -> Any:
    """Redact sensitive keys in nested dicts and token text inside strings."""
    if depth > 8:
        return value
    if isinstance(value, str):
        return _TOKEN_TEXT.sub(r"\1" + REDACTED, value) if "rexec1:" in value else value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _sensitive(k) else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: defence in depth, in case a secret ever reaches a log call."""
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if _sensitive(key) else _scrub(value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the process: `fmt` is auto (console on a TTY), console or json."""
    stream = sys.stderr if stream is None else stream
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ConfigError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}") from None
    if fmt not in ("auto", "console", "json"):
        raise ConfigError(f"unknown log format {fmt!r}: use auto, console or json")
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    console = fmt == "console" or (fmt == "auto" and is_tty)
    # Tracebacks never include frame locals (a local may hold a secret), and are rendered
    # before redaction so that the redactor sees them too.
    if console:
        tracebacks: Processor = structlog.processors.format_exc_info
    else:
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        tracebacks = structlog.processors.ExceptionRenderer(transformer)
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        tracebacks,
        redact_secrets,
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=is_tty))
    else:
        processors.append(structlog.processors.JSONRenderer(default=repr))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> FilteringBoundLogger:
    """A bound logger; the server binds conn, peer and key_id once per connection."""
    return cast(FilteringBoundLogger, structlog.get_logger("rexec").bind(**bind))


# -- audit log ------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    """One finished (or failed-to-start) command. `env` holds names only, never values."""

    conn: str
    peer: str
    key_id: str
    key_name: str | None
    channel: int
    argv: Sequence[str] | None = None  # exactly one of argv / command
    command: str | None = None
    cwd: str | None = None
    env: Collection[str] = ()  # a Mapping works too: only its keys are written
    start: float = 0.0  # time.time() when the command started
    duration: float = 0.0  # seconds
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    bytes_out: int = 0
    bytes_err: int = 0
    error: str | None = None  # why the command could not start, if it did not
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": _iso(now if now is not None else datetime.now(UTC).timestamp()),
            "conn": self.conn,
            "peer": self.peer,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "channel": self.channel,
        }
        if self.argv is not None:
            record["argv"] = list(self.argv)
        else:
            record["command"] = self.command
        record.update(
            cwd=self.cwd,
            env=sorted(self.env),
            start=_iso(self.start),
            duration=round(self.duration, 6),
            exit_code=self.exit_code,
            signal=self.signal,
            timed_out=self.timed_out,
            bytes_out=self.bytes_out,
            bytes_err=self.bytes_err,
        )
        if self.error is not None:
            record["error"] = self.error
        record.update(self.extra)
        return record


class AuditLog:
    """Append-only JSON lines, one `os.write` per record on an O_APPEND fd.

    O_APPEND makes each write land whole at the end of the file, so records from threads
    or processes never interleave; there is no user-space buffer, so a crash loses nothing
    already written. json.dumps escapes non-ASCII (and surrogate-escaped bytes), so every
    line is valid ASCII JSON whatever the command line held.

    The file is trusted state (rexec.statefile): opened with O_NOFOLLOW, created 0600, and
    refused if it is not ours, gives group or others access, or sits in a directory others
    can write. Rotation: every write first checks that the path still names our file (one
    lstat) and reopens it if not, so logrotate without copytruncate (rename, then the next
    record creates a new file) loses nothing; `reopen()` (the server's SIGHUP) forces it.
    When a record cannot be written, `error` says why until a later write succeeds, and that
    write is preceded by an "audit-log-recovered" record counting what was lost.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()  # guards _fd against close() or reopen during a write
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)  # st_dev, st_ino of the open file
        self._closed = False
        self.error: str | None = None  # why the last write or reopen failed; None if healthy
        self._lost = 0  # records not written since the error
        self._failed_since = 0.0
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        self._open()  # an untrusted audit log stops the server from starting

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd, st = open_trusted(self.path, flags, "audit log", 0o600)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _current(self) -> int:
        """The descriptor of the file the path names now, reopened if it was moved away."""
        try:
            st = os.lstat(self.path)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if self._fd is None or ident != self._ident:
            self._close_fd()
            self._open()
        assert self._fd is not None
        return self._fd

    def _append(self, line: bytes) -> None:
        fd = self._current()
        written = os.write(fd, line)
        while written < len(line):  # only on a full disk or similar; keep the rest
            written += os.write(fd, line[written:])
        if self._fsync:
            os.fsync(fd)

    def _fail(self, exc: BaseException) -> str:
        if self.error is None:
            self._failed_since = datetime.now(UTC).timestamp()
        self.error = str(exc) if isinstance(exc, ConfigError) else _os_error(self.path, exc)
        return self.error

    def _recovered_line(self) -> bytes:
        doc = {
            "ts": _iso(datetime.now(UTC).timestamp()),
            "event": "audit-log-recovered",
            "failed_since": _iso(self._failed_since),
            "lost_records": self._lost,
            "error": self.error,
        }
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode("ascii")

    def _write_locked(self, line: bytes | None) -> None:
        """Write line (None: only the recovery record, as a probe); raise AuditLogError."""
        if self._closed:
            raise ValueError("audit log is closed")
        try:
            if self.error is not None:
                self._append(self._recovered_line())
                self.error, self._lost = None, 0
            if line is not None:
                self._append(line)
        except (OSError, ConfigError) as exc:
            if line is not None:
                self._lost += 1
            raise AuditLogError(self._fail(exc)) from None

    def write(self, record: AuditRecord | MutableMapping[str, Any]) -> None:
        """Append one record (an AuditRecord, or a ready dict for custom events).

        Raises AuditLogError (with `error` set) when the record could not be written.
        """
        doc = record.to_dict() if isinstance(record, AuditRecord) else dict(record)
        line = (json.dumps(doc, separators=(",", ":"), default=str) + "\n").encode("ascii")
        with self._lock:
            self._write_locked(line)

    def check(self) -> str | None:
        """None if records can be written now, else why not.

        Checks that the path still names a file we can trust (reopening it if it was moved),
        and after a failure tries to write the recovery record: a full disk that has room
        again, or a rotated or repaired file, makes the log healthy on the next check.
        """
        with self._lock:
            if self._closed:
                return "audit log is closed"
            try:
                if self.error is None:
                    self._current()
                else:
                    self._write_locked(None)
            except (OSError, ConfigError) as exc:
                self._fail(exc)
            except AuditLogError:
                pass
            return self.error

    def reopen(self) -> None:
        """Close and open the path again (SIGHUP after rotation); raise AuditLogError."""
        with self._lock:
            if self._closed:
                return
            self._close_fd()
            try:
                self._open()
            except (OSError, ConfigError) as exc:
                raise AuditLogError(self._fail(exc)) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_fd()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _os_error(path: Path, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot write audit log {path}: {reason}"
