"""Token usage side files: when each token last authenticated, and what learn-mode tokens ran.

Neither lives in the token store. The store is rewritten only by `rexec token` commands, so
its mtime keeps meaning "the tokens changed" (the server reloads on it), and a busy server
does not rewrite its credentials file on every connection.

- `<store>.used`: the server keeps last-use times in memory and writes the file atomically
  (rexec.statefile.write_secret) at most every FLUSH_INTERVAL seconds when something
  changed, and once at shutdown. `rexec token list` may therefore lag by up to
  FLUSH_INTERVAL. Format:
  `{"version": 1, "last_used": {"<token name>": "<ISO-8601 UTC>"}}`.
- `<store>.learned`: JSON lines `{"token": NAME, "argv": [...]}` or `{"token": NAME,
  "command": "..."}`, appended (O_APPEND, one write per line) the first time this server
  process sees each distinct request of a learn-mode token. Readers deduplicate.

Both are mode 0600 (they say who ran what) and keyed by token name, which survives rotation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from rexec.errors import ConfigError
from rexec.secretfile import read_secret_file
from rexec.server.auth import iso_time
from rexec.statefile import write_secret

__all__ = ["FLUSH_INTERVAL", "LastUsed", "Learned", "read_last_used", "read_learned"]

FLUSH_INTERVAL = 10.0
_MAX_SEEN = 10_000  # distinct learned requests remembered per server process
_MAX_SIDE_FILE = 64 * 1024 * 1024


class LastUsed:
    """Last successful authentication per token: in memory, flushed to the side file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: dict[str, float] = {}
        self._flushed_at = 0.0

    def touch(self, name: str, now: float) -> None:
        self._pending[name] = now

    def maybe_flush(self, now: float) -> None:
        """Write if something changed and FLUSH_INTERVAL has passed since the last write."""
        if self._pending and now - self._flushed_at >= FLUSH_INTERVAL:
            self._flushed_at = now
            self.flush()

    def flush(self) -> None:
        """Merge what we saw into the file (another server may share it), atomically."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            times = read_last_used(self.path)
        except ConfigError:
            times = {}  # unreadable or invalid: start over rather than never record again
        times.update({name: iso_time(ts) for name, ts in pending.items()})
        doc = {"version": 1, "last_used": dict(sorted(times.items()))}
        write_secret(
            self.path, (json.dumps(doc, indent=2) + "\n").encode("ascii"), "token usage file"
        )


def read_last_used(path: Path) -> dict[str, str]:
    """Token name -> ISO-8601 time of its last authentication; {} if nothing was recorded."""
    found = read_secret_file(str(path), "last-used file", _MAX_SIDE_FILE)
    if found is None:
        return {}
    try:
        doc = json.loads(found[0])
        times = doc["last_used"]
        if not isinstance(times, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not a valid last-used file") from None
    return {str(k): str(v) for k, v in times.items()}


class Learned:
    """Appends each distinct request of a learn-mode token to the learned side file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[str] = set()

    def record(self, name: str, argv: Sequence[str] | None, command: str | None) -> bool:
        """Append the request unless this process already recorded it; True if written."""
        doc: dict[str, object] = {"token": name}
        if argv is not None:
            doc["argv"] = list(argv)
        else:
            doc["command"] = command
        line = json.dumps(doc, separators=(",", ":")) + "\n"
        if line in self._seen:
            return False
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, line.encode("ascii"))
        finally:
            os.close(fd)
        if len(self._seen) < _MAX_SEEN:
            self._seen.add(line)
        return True


def read_learned(path: Path, name: str) -> list[tuple[str, ...] | str]:
    """What token `name` ran in learn mode, first seen first, each once: argv tuples, and
    strings for shell command lines."""
    found = read_secret_file(str(path), "learned file", _MAX_SIDE_FILE)
    if found is None:
        return []
    out: dict[tuple[str, ...] | str, None] = {}
    for number, raw in enumerate(found[0].splitlines(), 1):
        try:
            doc = json.loads(raw)
            if doc.get("token") != name:
                continue
            if "argv" in doc:
                argv = doc["argv"]
                if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                    raise TypeError
                out[tuple(argv)] = None
            elif isinstance(doc.get("command"), str):
                out[doc["command"]] = None
            else:
                raise TypeError
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"{path}:{number}: not a valid learned record") from None
    return list(out)
