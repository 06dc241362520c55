"""Server-side authentication: the token store, the per-address failure limiter, the proof.

The token store is a small JSON file (mode 0600) that `rexec token new` edits and a running
server re-reads when it changes, so a new token works without a restart. Every read, the hot
reloads included, applies rexec.statefile's StrictModes rule: a store another user owns or
could replace is refused. Secrets leave this module only as the bytes `lookup()` returns to
the handshake: never in a listing, repr or error message.

Lifecycle (docs/PROTOCOL.md 3.2): an entry may carry `expires`, `previous` (old secrets of a
rotated token, each valid until its overlap ends) and a `policy` (rexec.server.policy).
Revoking removes the entry. `lookup()` answers only for keys valid now, and
`invalid_reason()` tells the server why a live session's key stopped being valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rexec.errors import ConfigError, TokenError
from rexec.protocol.messages import auth_proof, verify_auth_proof
from rexec.protocol.token import Token, encode_secret, generate_token, parse_token
from rexec.secretfile import read_secret_file
from rexec.server.policy import Policy, check_run_as
from rexec.statefile import write_secret

__all__ = [
    "AuthRateLimiter",
    "TokenInfo",
    "TokenStore",
    "auth_proof",
    "parse_duration",
    "parse_expiry",
    "verify_auth_proof",
]

STORE_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ENTRY_KEYS = frozenset({"name", "key_id", "secret", "created"})
_OPTIONAL_KEYS = frozenset({"expires", "previous", "policy"})
REVOKED = "token revoked"
EXPIRED = "token expired"
RETIRED = "token rotated: this secret's overlap is over"


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
    expires: str | None = None  # ISO-8601 UTC; None: never
    policy: str = "-"  # Policy.summary()
    previous: tuple[tuple[str, str], ...] = ()  # (key id hex, valid until) of rotated secrets


@dataclass(frozen=True, repr=False)
class _Previous:
    """A rotated-out secret, still accepted until `until` (epoch seconds)."""

    token: Token
    until: float


@dataclass(frozen=True, repr=False)
class _Entry:
    name: str
    token: Token
    created: str
    expires: float | None = None  # epoch seconds
    previous: tuple[_Previous, ...] = ()
    policy: Policy = dataclasses.field(default_factory=Policy)

    def info(self) -> TokenInfo:
        return TokenInfo(
            self.name,
            self.token.key_id_hex,
            self.created,
            None if self.expires is None else iso_time(self.expires),
            self.policy.summary(),
            tuple((p.token.key_id_hex, iso_time(p.until)) for p in self.previous),
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "key_id": self.token.key_id_hex,
            "secret": encode_secret(self.token.secret),
            "created": self.created,
        }
        if self.expires is not None:
            doc["expires"] = iso_time(self.expires)
        if self.previous:
            doc["previous"] = [
                {
                    "key_id": p.token.key_id_hex,
                    "secret": encode_secret(p.token.secret),
                    "until": iso_time(p.until),
                }
                for p in self.previous
            ]
        if not self.policy.empty:
            doc["policy"] = self.policy.to_json()
        return doc


def iso_time(ts: float) -> str:
    """Epoch seconds as the store writes times: ISO-8601 UTC to the second, with Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> float:
    """ISO-8601 (a date, or a date and time); a time without a zone is UTC."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w`: seconds (>= 0). ConfigError otherwise."""
    value, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 12h)"
        ) from None
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"invalid duration {text!r}: must be zero or more")
    return number * _UNITS[unit]


def parse_expiry(text: str, now: float) -> float:
    """`--expires`: a DURATION from now, or an ISO-8601 DATE / date-time (UTC if no zone)."""
    if text[:1].isdigit() and "-" in text:
        try:
            return _parse_time(text)
        except ValueError:
            raise ConfigError(
                f"invalid date {text!r}: use ISO-8601, e.g. 2030-01-31 or 2030-01-31T12:00:00Z"
            ) from None
    return now + parse_duration(text)


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
        self._by_id: dict[bytes, tuple[_Entry, Token, float | None]] = {}
        self._signature: _Signature | None = None
        self.serving = False  # loaded by a server: check run-as policies against our uid
        self.disabled: dict[str, str] = {}  # token name -> why this server refuses it

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, {len(self._entries)} tokens)"

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, serving: bool = False) -> TokenStore:
        """Read the store; a missing file is an empty store (first `rexec serve`).

        `serving`: the caller is the server, so a token whose run-as policy it cannot honour
        (not root, unknown user) is refused at load time: listed in `disabled`, never valid.
        """
        store = cls(Path(path))
        store.serving = serving
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
            for token in (entry.token, *(p.token for p in entry.previous)):
                if token.key_id in ids:
                    raise ConfigError(f"{label}: key_id is used twice")
                ids.add(token.key_id)
            names.add(entry.name)
            entries.append(entry)
        return entries

    @staticmethod
    def _parse_entry(label: str, raw: Any) -> _Entry:
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: must be an object")
        if not _ENTRY_KEYS <= set(raw) <= _ENTRY_KEYS | _OPTIONAL_KEYS:
            missing = sorted(_ENTRY_KEYS - set(raw))
            unknown = sorted(set(raw) - _ENTRY_KEYS - _OPTIONAL_KEYS)
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
        expires = None
        if "expires" in raw:
            expires = _time_value(label, "expires", raw["expires"])
        previous = raw.get("previous", [])
        if not isinstance(previous, list):
            raise ConfigError(f"{label}: previous: must be a list")
        old: list[_Previous] = []
        for j, item in enumerate(previous):
            where = f"{label}: previous[{j}]"
            if not isinstance(item, dict) or set(item) != {"key_id", "secret", "until"}:
                raise ConfigError(f"{where}: must be an object with key_id, secret and until")
            if not isinstance(item["key_id"], str) or not isinstance(item["secret"], str):
                raise ConfigError(f"{where}: key_id and secret must be strings")
            try:
                old_token = parse_token(f"rexec1:{item['key_id']}:{item['secret']}")
            except TokenError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            old.append(_Previous(old_token, _time_value(where, "until", item["until"])))
        policy = Policy()
        if "policy" in raw:
            policy = Policy.from_json(label, raw["policy"])
        return _Entry(name, token, created, expires, tuple(old), policy)

    def _set(self, entries: list[_Entry], signature: _Signature | None) -> None:
        self._entries = entries
        self._by_id = {e.token.key_id: (e, e.token, None) for e in entries}
        for e in entries:
            for p in e.previous:
                self._by_id[p.token.key_id] = (e, p.token, p.until)
        self.disabled = {}
        if self.serving:  # one token we cannot honour must not stop the others (or revokes)
            for e in entries:
                try:
                    check_run_as(e.policy, os.geteuid())
                except ConfigError as exc:
                    self.disabled[e.name] = f"token refused: {exc}"
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
        """The secret for `key_id` if it is valid now, else None (the caller uses a dummy PSK).

        Expired tokens and rotated-out secrets past their overlap answer like unknown ids.
        """
        found = self._by_id.get(key_id)
        if found is None or self.invalid_reason(key_id, time.time()) is not None:
            return None
        return found[1].secret

    def invalid_reason(self, key_id: bytes, now: float) -> str | None:
        """Why a session authenticated with `key_id` must end now, or None while it is valid."""
        found = self._by_id.get(key_id)
        if found is None:
            return REVOKED
        entry, _, until = found
        if entry.name in self.disabled:
            return self.disabled[entry.name]
        if entry.expires is not None and now >= entry.expires:
            return EXPIRED
        if until is not None and now >= until:
            return RETIRED
        return None

    def name_for(self, key_id: bytes) -> str | None:
        found = self._by_id.get(key_id)
        return found[0].name if found is not None else None

    def policy_for(self, key_id: bytes) -> Policy | None:
        """The token's current policy (edits apply to the next command), None if unknown."""
        found = self._by_id.get(key_id)
        return found[0].policy if found is not None else None

    def entries(self) -> list[TokenInfo]:
        return [e.info() for e in self._entries]

    def find(self, ident: str) -> TokenInfo:
        """The token called `ident`, or whose (current or previous) key id is `ident`."""
        return self._find(ident).info()

    def _find(self, ident: str) -> _Entry:
        for e in self._entries:
            if e.name == ident:
                return e
        try:
            found = self._by_id.get(bytes.fromhex(ident)) if len(ident) == 16 else None
        except ValueError:
            found = None
        if found is None:
            raise ConfigError(f"{self.path}: no token named {ident!r} (nor with that key id)")
        return found[0]

    @property
    def used_path(self) -> Path:
        """Side file: when each token last authenticated (rexec.server.usage)."""
        return Path(f"{self.path}.used")

    @property
    def learned_path(self) -> Path:
        """Side file: what learn-mode tokens ran (rexec.server.usage)."""
        return Path(f"{self.path}.learned")

    # -- writing ----------------------------------------------------------------------------

    def add(
        self,
        name: str,
        token: Token | None = None,
        *,
        expires: float | None = None,
        policy: Policy | None = None,
    ) -> Token:
        """Create a token called `name`, save the store, and return the token (shown once).

        `token`: store this one (a fleet server's derived key) instead of a fresh one.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"invalid token name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -"
            )
        with self._locked():
            if any(e.name == name for e in self._entries):
                raise ConfigError(f"{self.path}: a token named {name!r} already exists")
            if token is None:
                token = self._fresh_token()
            elif token.key_id in self._by_id:
                raise ConfigError(f"{self.path}: that key id is already in the store")
            created = iso_time(time.time())
            entry = _Entry(name, token, created, expires, (), policy or Policy())
            self._write([*self._entries, entry])
        return token

    def _fresh_token(self) -> Token:
        token = generate_token()
        while token.key_id in self._by_id:  # 2**-64 odds, but ids must be unique
            token = generate_token()
        return token

    def revoke(self, ident: str) -> TokenInfo:
        """Remove the token (and any rotated-out secrets of it): live sessions end."""
        with self._locked():
            entry = self._find(ident)
            self._write([e for e in self._entries if e is not entry])
        return entry.info()

    def rotate(self, ident: str, overlap: float) -> Token:
        """A new key id and secret; the old ones keep working for `overlap` seconds."""
        with self._locked():
            entry = self._find(ident)
            token = self._fresh_token()
            now = time.time()
            kept = tuple(p for p in entry.previous if p.until > now)
            if overlap > 0:
                kept += (_Previous(entry.token, now + overlap),)
            new = dataclasses.replace(entry, token=token, previous=kept)
            self._write([new if e is entry else e for e in self._entries])
        return token

    def update(
        self,
        ident: str,
        *,
        policy: Policy | None = None,
        expires: float | Literal[False] | None = False,
    ) -> TokenInfo:
        """Set a token's policy and/or expiry (`expires=False`: unchanged, None: never)."""
        with self._locked():
            entry = self._find(ident)
            new = entry
            if policy is not None:
                new = dataclasses.replace(new, policy=policy)
            if expires is not False:
                new = dataclasses.replace(new, expires=expires)
            self._write([new if e is entry else e for e in self._entries])
        return new.info()

    def policy(self, ident: str) -> Policy:
        """The policy of the token called `ident` (or with that key id)."""
        return self._find(ident).policy

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
            raise ConfigError(
                f"cannot create directory {parent} for token store {self.path}: {exc.strerror}"
            ) from None
        with _dir_lock(parent):
            entries, signature = self._read()  # another writer may have added a token
            self._set(entries, signature)
            yield

    def _write(self, entries: list[_Entry]) -> None:
        """Atomic replace with a fresh 0600 file (rexec.statefile.write_secret); rotated-out
        secrets past their overlap are dropped."""
        now = time.time()
        entries = [
            dataclasses.replace(e, previous=tuple(p for p in e.previous if p.until > now))
            for e in entries
        ]
        doc = {"version": STORE_VERSION, "tokens": [e.to_json() for e in entries]}
        write_secret(self.path, (json.dumps(doc, indent=2) + "\n").encode("ascii"), "token store")
        self._set(entries, self._stat_signature())


def _time_value(label: str, key: str, value: object) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _parse_time(value)
    raise ConfigError(f"{label}: {key} must be an ISO-8601 UTC time string")


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
