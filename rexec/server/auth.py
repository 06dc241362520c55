"""Server-side authentication: the token store, the per-address failure limiter, the proof.

The token store is a small JSON file (mode 0600) that `rexec token new` edits and a running
server re-reads when it changes, so a new token works without a restart. Every read, the hot
reloads included, applies rexec.statefile's StrictModes rule: a store another user owns or
could replace is refused. Secrets leave this module only as the bytes `lookup()` returns to
the handshake: never in a listing, repr or error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rexec.errors import ConfigError, TokenError
from rexec.protocol.messages import auth_proof, verify_auth_proof
from rexec.protocol.token import Token, format_token, generate_token, parse_token
from rexec.secretfile import read_secret_file
from rexec.statefile import write_secret

__all__ = [
    "AuthRateLimiter",
    "TokenInfo",
    "TokenStore",
    "auth_proof",
    "verify_auth_proof",
]

STORE_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ENTRY_KEYS = frozenset({"name", "key_id", "secret", "created"})


# inode, size, mtime, ctime: ctime changes with chmod and chown, which the StrictModes
# checks must see as well as new contents.
_Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never its secret."""

    name: str
    key_id: str  # hex
    created: str  # ISO-8601 UTC


@dataclass(frozen=True, repr=False)
class _Entry:
    name: str
    token: Token
    created: str


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise writers (two `rexec token new` at once) with flock on the directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class TokenStore:
    """The server's tokens, loaded from `path`; see the module docstring for the format."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: list[_Entry] = []
        self._by_id: dict[bytes, _Entry] = {}
        self._signature: _Signature | None = None

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, {len(self._entries)} tokens)"

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Read the store; a missing file is an empty store (first `rexec serve`)."""
        store = cls(Path(path))
        entries, signature = store._read()
        store._set(entries, signature)
        return store

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> tuple[list[_Entry], _Signature | None]:
        """Parse the file; the StrictModes checks run on the open descriptor (no race)."""
        found = read_secret_file(str(self.path), "token store", trusted=True)
        if found is None:
            return [], None
        data, st = found
        return self._parse(data), _signature(st)

    def _parse(self, data: bytes) -> list[_Entry]:
        where = str(self.path)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"version", "tokens"}:
            raise ConfigError(f"{where}: expected an object with keys 'version' and 'tokens'")
        if doc["version"] != STORE_VERSION:
            raise ConfigError(f"{where}: unsupported version {doc['version']!r} (expected 1)")
        if not isinstance(doc["tokens"], list):
            raise ConfigError(f"{where}: tokens: must be a list")
        entries: list[_Entry] = []
        names: set[str] = set()
        ids: set[bytes] = set()
        for i, raw in enumerate(doc["tokens"]):
            entry = self._parse_entry(f"{where}: tokens[{i}]", raw)
            label = f"{where}: tokens[{i}] ({entry.name!r})"
            if entry.name in names:
                raise ConfigError(f"{label}: name is used twice")
            if entry.token.key_id in ids:
                raise ConfigError(f"{label}: key_id is used twice")
            names.add(entry.name)
            ids.add(entry.token.key_id)
            entries.append(entry)
        return entries

    @staticmethod
    def _parse_entry(label: str, raw: Any) -> _Entry:
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: must be an object")
        if set(raw) != _ENTRY_KEYS:
            missing = sorted(_ENTRY_KEYS - set(raw))
            unknown = sorted(set(raw) - _ENTRY_KEYS)
            raise ConfigError(f"{label}: missing keys {missing}, unknown keys {unknown}")
        name = raw["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{label}: name must match [A-Za-z0-9._-]{{1,64}}")
        label = f"{label} ({name!r})"
        if not isinstance(raw["key_id"], str) or not isinstance(raw["secret"], str):
            raise ConfigError(f"{label}: key_id and secret must be strings")
        try:
            token = parse_token(f"rexec1:{raw['key_id']}:{raw['secret']}")
        except TokenError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        created = raw["created"]
        if not isinstance(created, str):
            raise ConfigError(f"{label}: created must be an ISO-8601 string")
        return _Entry(name, token, created)

    def _set(self, entries: list[_Entry], signature: _Signature | None) -> None:
        self._entries = entries
        self._by_id = {e.token.key_id: e for e in entries}
        self._signature = signature

    def _stat_signature(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return _signature(st)

    def reload_if_changed(self) -> bool:
        """Re-read the file if its inode, size, mtime or ctime changed; True if it was replaced.

        Cheap (one stat), so the server may call it on every new connection. If the new
        file is invalid the old tokens stay in force and ConfigError is raised once for that
        version of the file (the caller logs it). A deleted file empties the store: removing
        the file is a way to revoke every token.
        """
        signature = self._stat_signature()
        if signature == self._signature:
            return False
        try:
            entries, signature = self._read()
        except ConfigError:
            self._signature = signature  # report this version once, not on every call
            raise
        self._set(entries, signature)
        return True

    # -- queries ----------------------------------------------------------------------------

    def lookup(self, key_id: bytes) -> bytes | None:
        """The secret for `key_id`, or None (the caller then uses a dummy PSK)."""
        entry = self._by_id.get(key_id)
        return entry.token.secret if entry is not None else None

    def name_for(self, key_id: bytes) -> str | None:
        entry = self._by_id.get(key_id)
        return entry.name if entry is not None else None

    def entries(self) -> list[TokenInfo]:
        return [TokenInfo(e.name, e.token.key_id_hex, e.created) for e in self._entries]

    # -- writing ----------------------------------------------------------------------------

    def add(self, name: str) -> Token:
        """Create a token called `name`, save the store, and return the token (shown once)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"invalid token name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -"
            )
        with self._locked():
            if any(e.name == name for e in self._entries):
                raise ConfigError(f"{self.path}: a token named {name!r} already exists")
            token = generate_token()
            while token.key_id in self._by_id:  # 2**-64 odds, but ids must be unique
                token = generate_token()
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._write([*self._entries, _Entry(name, token, created)])
        return token

    def remove(self, name: str) -> bool:
        """Revoke the token called `name`; False if there is none."""
        with self._locked():
            kept = [e for e in self._entries if e.name != name]
            if len(kept) == len(self._entries):
                return False
            self._write(kept)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory lock and start from the file's current contents."""
        parent = self.path.parent
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {parent}: {exc.strerror}") from None
        with _dir_lock(parent):
            entries, signature = self._read()  # another writer may have added a token
            self._set(entries, signature)
            yield

    def _write(self, entries: list[_Entry]) -> None:
        """Atomic replace with a fresh 0600 file (rexec.statefile.write_secret)."""
        doc = {
            "version": STORE_VERSION,
            "tokens": [
                {
                    "name": e.name,
                    "key_id": e.token.key_id_hex,
                    "secret": format_token(e.token).rsplit(":", 1)[1],
                    "created": e.created,
                }
                for e in entries
            ],
        }
        data = (json.dumps(doc, indent=2) + "\n").encode("ascii")
        write_secret(self.path, data, "token store")
        self._set(entries, self._stat_signature())


class AuthRateLimiter:
    """Refuse a source address after `max_failures` failed authentications in `window` s.

    Pure (the caller passes `now`, e.g. time.monotonic()) and bounded: each address keeps at
    most `max_failures` timestamps, and the table holds at most `max_entries` addresses
    (expired ones are evicted first, then the least recently failed).
    """

    def __init__(self, max_failures: int, window: float, *, max_entries: int = 10_000) -> None:
        if max_failures < 1 or window <= 0 or max_entries < 1:
            raise ValueError("max_failures, window and max_entries must be positive")
        self.max_failures = max_failures
        self.window = window
        self.max_entries = max_entries
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def allowed(self, addr: str, now: float) -> bool:
        times = self._failures.get(addr)
        if times is None:
            return True
        recent = sum(1 for t in times if now - t < self.window)
        if recent == 0:
            del self._failures[addr]
        return recent < self.max_failures

    def record_failure(self, addr: str, now: float) -> None:
        times = self._failures.get(addr)
        if times is None:
            if len(self._failures) >= self.max_entries:
                self._evict(now)
            times = self._failures[addr] = deque(maxlen=self.max_failures)
        else:
            self._failures.move_to_end(addr)  # keep least recently failed first
        times.append(now)

    def prune(self, now: float) -> None:
        """Drop addresses whose failures have all expired."""
        expired = [a for a, ts in self._failures.items() if not ts or now - ts[-1] >= self.window]
        for addr in expired:
            del self._failures[addr]

    def _evict(self, now: float) -> None:
        self.prune(now)
        while len(self._failures) >= self.max_entries:
            self._failures.popitem(last=False)
