"""The transfer channel's record stream (docs/PROTOCOL.md section 17), sans-I/O.

A transfer channel (opened by XFER) carries one record per data frame: a kind byte, then
the record's body. The **sender** (the side that has the files: the client for put, the
server for get) streams TREE, then ENTRY [OFFSET] DATA* END|ABORT per file (ENTRY alone for
a directory or a symlink, FAIL for an entry it cannot send), then DONE. The **receiver**
answers every ENTRY and FAIL with one RESULT, in order, and with `resume` every file ENTRY
with a HAVE first. The two stream checkers below enforce the order for each side, so a
peer's bytes become typed records or a RemoteProtocolError, never a surprise.

Record buffers are built behind frames.HEADROOM free bytes, so a connection queues them
without a copy (a DATA record is read from the file straight into its buffer).
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from rexec._record import FrozenRecord, setfield
from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol.frames import HEADROOM, MAX_PAYLOAD
from rexec.protocol.messages import MAX_WINDOW

MAX_DATA = MAX_PAYLOAD - 1  # file bytes in one DATA record (the kind byte takes one)
MAX_PATH = 4096  # bytes of a wire path, UTF-8
MAX_SOURCES = 4096  # paths in one get request
MAX_ERROR = 1024  # bytes of an error line
SHA256_LEN = 32
OFFSET = struct.Struct(">Q")
HEADER_LEN = struct.Struct(">H")  # a FILE record's ENTRY length
KINDS = ("file", "dir", "symlink")
STATUSES = ("ok", "skipped", "failed")


class Rec(IntEnum):
    """A record's kind byte. 0x01..0x0f: sender to receiver; 0x11..: receiver to sender."""

    TREE = 0x01
    ENTRY = 0x02
    DATA = 0x03
    END = 0x04
    ABORT = 0x05
    FAIL = 0x06
    OFFSET = 0x07
    DONE = 0x08
    FILE = 0x09  # a small file whole: ENTRY, its DATA and END in one record (no resume)
    HAVE = 0x11
    RESULT = 0x12


# ---- the XFER request ------------------------------------------------------------------


class XferRequest(FrozenRecord):
    """XFER's body: what to transfer, and the channel's output window."""

    __match_args__ = ("op", "paths", "recursive", "preserve", "resume", "into", "window")
    __slots__ = __match_args__
    op: str  # "put" | "get"
    paths: tuple[str, ...]  # put: (the destination,); get: the sources
    recursive: bool
    preserve: bool
    resume: bool
    into: bool  # put: the destination is a directory to put every source in (several sources)
    window: int

    def __init__(
        self,
        op: str,
        paths: tuple[str, ...],
        *,
        recursive: bool = False,
        preserve: bool = False,
        resume: bool = False,
        into: bool = False,
        window: int = 0,
    ) -> None:
        for name, value in zip(
            self.__match_args__, (op, paths, recursive, preserve, resume, into, window), strict=True
        ):
            setfield(self, name, value)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"op": self.op, "paths": list(self.paths)}
        for flag in ("recursive", "preserve", "resume", "into"):
            if getattr(self, flag):
                body[flag] = True
        body["window"] = self.window
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes | bytearray) -> XferRequest:
        """Validate an XFER body strictly; any problem is a RemoteProtocolError."""
        obj = _object(body, "XFER request")
        _members(obj, "XFER request", {"op", "paths", "window"}, {*_FLAGS})
        op = obj["op"]
        if op not in ("put", "get"):
            raise RemoteProtocolError("invalid XFER request: op must be 'put' or 'get'")
        paths = obj["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise RemoteProtocolError("invalid XFER request: paths must be an array of strings")
        if not 1 <= len(paths) <= (1 if op == "put" else MAX_SOURCES):
            want = "exactly 1 path" if op == "put" else f"1..{MAX_SOURCES} paths"
            raise RemoteProtocolError(f"invalid XFER request: {op} takes {want}")
        for p in paths:
            if "\0" in p or len(p.encode("utf-8", "surrogatepass")) > MAX_PATH:
                raise RemoteProtocolError("invalid XFER request: a path has NUL or is too long")
            wire_name(p)
        window = _int(obj["window"], "window", MAX_WINDOW)
        flags = {}
        for flag in _FLAGS:
            value = obj.get(flag, False)
            if not isinstance(value, bool):
                raise RemoteProtocolError(f"invalid XFER request: {flag} must be a boolean")
            flags[flag] = value
        if flags["into"] and op != "put":
            raise RemoteProtocolError("invalid XFER request: into is for put only")
        return cls(op, tuple(paths), window=window, **flags)


_FLAGS = ("recursive", "preserve", "resume", "into")


# ---- records ---------------------------------------------------------------------------


class Entry(FrozenRecord):
    """ENTRY: one file, directory or symlink the sender is about to send."""

    __match_args__ = ("path", "kind", "size", "mode", "mtime_ns", "target")
    __slots__ = __match_args__
    path: str
    kind: str
    size: int
    mode: int  # permission bits (0..0o7777)
    mtime_ns: int
    target: str | None  # a symlink's target, as read (never followed)

    def __init__(
        self, path: str, kind: str, size: int, mode: int, mtime_ns: int, target: str | None = None
    ) -> None:
        setfield(self, "path", path)  # (unrolled: one per file of a tree, on both sides)
        setfield(self, "kind", kind)
        setfield(self, "size", size)
        setfield(self, "mode", mode)
        setfield(self, "mtime_ns", mtime_ns)
        setfield(self, "target", target)


class Result(FrozenRecord):
    """RESULT: how the receiver ended one entry."""

    __match_args__ = ("path", "status", "sha256", "error")
    __slots__ = __match_args__
    path: str
    status: str  # "ok" | "skipped" | "failed"
    sha256: str | None  # hex, the receiver's hash of the whole file (files)
    error: str | None

    def __init__(self, path: str, status: str, sha256: str | None, error: str | None) -> None:
        setfield(self, "path", path)
        setfield(self, "status", status)
        setfield(self, "sha256", sha256)
        setfield(self, "error", error)


def record(kind: Rec, body: bytes | bytearray = b"") -> bytearray:
    """A record behind HEADROOM free bytes, ready to queue as a data frame's payload."""
    buf = bytearray(HEADROOM + 1)
    buf[HEADROOM] = kind
    buf += body
    if len(buf) - HEADROOM > MAX_PAYLOAD:
        raise LocalProtocolError(f"{kind.name} record of {len(buf) - HEADROOM} bytes is too big")
    return buf


def data_buffer(size: int) -> bytearray:
    """A DATA record of `size` (<= MAX_DATA) bytes to fill at [DATA_AT:]: read a file into it."""
    buf = bytearray(DATA_AT + size)
    buf[HEADROOM] = Rec.DATA
    return buf


DATA_AT = HEADROOM + 1  # where a DATA buffer's file bytes start


_jstr: Callable[[str], str] = json.encoder.encode_basestring


def _utf8(text: str) -> bytes:
    """JSON text as UTF-8. A name that is not UTF-8 holds lone surrogates (PEP 383's
    surrogateescape, as os gives it): each goes as a `\\udcXX` escape, so the record stays
    UTF-8 and the peer's os.fsencode gets the very bytes back (section 17.2)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return "".join(
            f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text
        ).encode()


def wire_name(name: str) -> str:
    """A local or wire name as it must be to reach the file system: one os.fsencode can
    encode (UTF-8, or surrogate-escaped bytes); RemoteProtocolError otherwise."""
    if not name.isascii():
        try:
            name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise RemoteProtocolError(f"name {name[:100]!r} is neither UTF-8 nor bytes") from None
    return name


def _json(kind: Rec, obj: dict[str, Any]) -> bytearray:
    return record(kind, _utf8(json.dumps(obj, separators=(",", ":"), ensure_ascii=False)))


def tree(files: int, size: int) -> bytearray:
    return _json(Rec.TREE, {"files": files, "bytes": size})


def entry(e: Entry) -> bytearray:
    return record(Rec.ENTRY, _entry_json(e))


def _entry_json(e: Entry) -> bytes:
    """ENTRY's JSON, written out by hand: the bytes json.dumps gives (compact, not ASCII-
    escaped), at a fraction of its cost per file. mtime_ns is unsigned on the wire: a time
    before 1970 goes as the epoch (the file still copies; -p gives it 1970)."""
    head = f'{{"path":{_jstr(e.path)},"kind":{_jstr(e.kind)},"mode":{int(e.mode)},'
    mtime = max(0, int(e.mtime_ns))
    if e.kind == "file":
        tail = f'"mtime_ns":{mtime},"size":{int(e.size)}}}'
    elif e.kind == "symlink":
        assert e.target is not None
        tail = f'"mtime_ns":{mtime},"target":{_jstr(e.target)}}}'
    else:
        tail = f'"mtime_ns":{mtime}}}'
    return _utf8(head + tail)


def small_file(e: Entry, size: int) -> tuple[bytearray, int] | None:
    """A FILE record for `e` with room for its `size` bytes of data at the returned offset
    (the caller reads them in, then calls seal_file with the hash); None if it would not fit
    in one record."""
    header = _entry_json(e)
    need = 1 + HEADER_LEN.size + len(header) + size + SHA256_LEN
    if need > MAX_PAYLOAD:
        return None
    buf = bytearray(HEADROOM + need)
    buf[HEADROOM] = Rec.FILE
    HEADER_LEN.pack_into(buf, HEADROOM + 1, len(header))
    at = HEADROOM + 1 + HEADER_LEN.size
    buf[at : at + len(header)] = header
    return buf, at + len(header)


def seal_file(buf: bytearray, digest: bytes) -> bytearray:
    """Put the file's SHA-256 at the end of a FILE record from small_file()."""
    buf[-SHA256_LEN:] = digest
    return buf


def end(digest: bytes) -> bytearray:
    if len(digest) != SHA256_LEN:
        raise LocalProtocolError("END carries a 32-byte SHA-256")
    return record(Rec.END, digest)


def abort(error: str) -> bytearray:
    return record(Rec.ABORT, one_line(error).encode())


def fail(path: str, kind: str, error: str) -> bytearray:
    return _json(Rec.FAIL, {"path": path, "kind": kind, "error": one_line(error)})


def offset(n: int) -> bytearray:
    return record(Rec.OFFSET, OFFSET.pack(n))


def done() -> bytearray:
    return record(Rec.DONE)


def have(n: int, digest: bytes) -> bytearray:
    return _json(Rec.HAVE, {"offset": n, "sha256": digest.hex()})


def result(r: Result) -> bytearray:
    """RESULT's JSON, by hand as ENTRY's (one per file)."""
    body = f'{{"path":{_jstr(r.path)},"status":{_jstr(r.status)}'
    if r.sha256 is not None:
        body += f',"sha256":{_jstr(r.sha256)}'
    if r.error is not None:
        body += f',"error":{_jstr(one_line(r.error))}'
    return record(Rec.RESULT, _utf8(body + "}"))


def one_line(text: str) -> str:
    """An error as one line of at most MAX_ERROR bytes (a name in it that is not UTF-8
    shown with backslash escapes)."""
    line = " ".join(text.split())
    return line.encode("utf-8", "backslashreplace")[:MAX_ERROR].decode("utf-8", "ignore")


# ---- paths -----------------------------------------------------------------------------


def check_path(path: object) -> str:
    """A wire path: relative, POSIX, no empty, `.` or `..` component, no NUL; else an error."""
    if not isinstance(path, str) or not path:
        raise RemoteProtocolError("a transfer path must be a non-empty string")
    # (a character is at most 4 bytes: short paths need no encoding to know)
    if len(path) > MAX_PATH // 4 and len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise RemoteProtocolError("a transfer path is longer than 4096 bytes")
    if "\0" in path or path.startswith("/"):
        raise RemoteProtocolError(f"transfer path {path[:100]!r} is absolute or has NUL")
    if not _BAD_PARTS.isdisjoint(path.split("/")):
        raise RemoteProtocolError(f"transfer path {path[:100]!r} has an empty, . or .. part")
    return wire_name(path)


_BAD_PARTS = frozenset(("", ".", ".."))


def placed(path: str, into: bool, name: str) -> list[str]:
    """Where an entry lands, as parts under the destination's base directory: the wire path
    itself when the destination is a directory to put sources `into`, else the path with
    its first part (the source's name) replaced by the destination's `name`."""
    parts = path.split("/")
    return parts if into else [name, *parts[1:]]


def wants_into(sources: int, is_dir: bool) -> bool:
    """scp's rule: sources land inside the destination (under their own names) when it is
    an existing directory or there are several. A single source to `DIR/` that is not
    there becomes DIR if it is a directory, and fails otherwise (the receiver's
    `dir_named`), as with scp and cp."""
    return is_dir or sources > 1


# ---- the two stream checkers -----------------------------------------------------------


_decode = json.JSONDecoder().decode


def _object(body: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    try:  # (UTF-8 only, as section 17 says: no json.loads encoding detection per record)
        obj = _decode(str(body, "utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        raise RemoteProtocolError(f"{what} is not valid JSON") from None
    if type(obj) is not dict:
        raise RemoteProtocolError(f"{what} must be a JSON object")
    return obj


def _members(obj: dict[str, Any], what: str, required: set[str], optional: set[str]) -> None:
    missing = required - obj.keys()
    extra = obj.keys() - required - optional
    if missing or extra:
        raise RemoteProtocolError(
            f"invalid {what}: missing {sorted(missing)}, unknown {sorted(extra)}"
        )


def _int(value: object, name: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise RemoteProtocolError(f"{name} must be an integer in 0..{top}")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{name} must be a string")
    return value


_ENTRY_MEMBERS = {
    "file": frozenset(("path", "kind", "mode", "mtime_ns", "size")),
    "dir": frozenset(("path", "kind", "mode", "mtime_ns")),
    "symlink": frozenset(("path", "kind", "mode", "mtime_ns", "target")),
}
_RESULT_MEMBERS = frozenset(("path", "status", "sha256", "error"))


def _parse_entry(body: memoryview) -> Entry:
    obj = _object(body, "ENTRY")
    kind = obj.get("kind")
    required = _ENTRY_MEMBERS.get(kind) if isinstance(kind, str) else None
    if required is None or not isinstance(kind, str):
        raise RemoteProtocolError(f"ENTRY kind must be one of {', '.join(KINDS)}")
    if obj.keys() != required:
        _members(obj, "ENTRY", set(required), set())
    target = None
    if kind == "symlink":
        target = _text(obj["target"], "a symlink target")
        size = len(wire_name(target).encode("utf-8", "surrogateescape"))
        if not target or "\0" in target or size > MAX_PATH:
            raise RemoteProtocolError("a symlink target must be 1..4096 bytes without NUL")
    return Entry(
        check_path(obj["path"]),
        kind,
        _int(obj.get("size", 0), "size", 2**63 - 1),
        _int(obj["mode"], "mode", 0o7777),
        _int(obj["mtime_ns"], "mtime_ns", 2**63 - 1),
        target,
    )


class ReceiverStream:
    """What a receiver accepts from the sender, in order; `feed` returns each record decoded.

    Returns: ("tree", (files, bytes)), ("entry", Entry), ("offset", n), ("data", view),
    ("end", digest), ("abort", text), ("fail", (path, kind, error)), ("done", None),
    ("file", (Entry, data view, digest)).
    """

    def __init__(self, resume: bool) -> None:
        self.resume = resume
        self._state = "tree"  # tree | next | offset | data | done
        self._left = 0  # DATA bytes the current file may still have
        self._file: Entry | None = None

    @property
    def finished(self) -> bool:
        return self._state == "done"

    def feed(self, payload: bytes | bytearray | memoryview) -> tuple[str, Any]:
        if not payload:
            raise RemoteProtocolError("an empty transfer record")
        kind, body = payload[0], memoryview(payload)[1:]
        state = self._state
        if kind == Rec.DATA and state == "data":
            if not body or len(body) > self._left:
                raise RemoteProtocolError("DATA beyond the file's announced size")
            self._left -= len(body)
            return "data", body
        if state == "tree" and kind == Rec.TREE:
            obj = _object(body, "TREE")
            _members(obj, "TREE", {"files", "bytes"}, set())
            self._state = "next"
            return "tree", (_int(obj["files"], "files", 2**63), _int(obj["bytes"], "bytes", 2**63))
        if state == "next" and kind == Rec.ENTRY:
            e = _parse_entry(body)
            if e.kind == "file":
                self._file = e
                self._left = e.size
                self._state = "offset" if self.resume else "data"
            return "entry", e
        if state == "next" and kind == Rec.FILE and not self.resume:
            if len(body) < HEADER_LEN.size + SHA256_LEN:
                raise RemoteProtocolError("FILE record too short")
            (n,) = HEADER_LEN.unpack_from(body)
            e = _parse_entry(body[HEADER_LEN.size : HEADER_LEN.size + n])
            data = body[HEADER_LEN.size + n : len(body) - SHA256_LEN]
            if e.kind != "file" or len(data) != e.size:
                raise RemoteProtocolError("FILE record's data is not its ENTRY's size")
            return "file", (e, data, bytes(body[len(body) - SHA256_LEN :]))
        if state == "next" and kind == Rec.FAIL:
            obj = _object(body, "FAIL")
            _members(obj, "FAIL", {"path", "kind", "error"}, set())
            if obj["kind"] not in KINDS:
                raise RemoteProtocolError("FAIL kind must be file, dir or symlink")
            return "fail", (check_path(obj["path"]), obj["kind"], _text(obj["error"], "error"))
        if state == "next" and kind == Rec.DONE and not body:
            self._state = "done"
            return "done", None
        if state == "offset" and kind == Rec.OFFSET and len(body) == OFFSET.size:
            (n,) = OFFSET.unpack(body)
            assert self._file is not None
            if n > self._file.size:
                raise RemoteProtocolError("OFFSET beyond the file's size")
            self._left = self._file.size - n
            self._state = "data"
            return "offset", n
        if state == "data" and kind == Rec.END and len(body) == SHA256_LEN:
            if self._left:
                raise RemoteProtocolError(f"END with {self._left} bytes of the file not sent")
            self._state = "next"
            return "end", bytes(body)
        if state == "data" and kind == Rec.ABORT:
            self._state = "next"
            return "abort", bytes(body).decode("utf-8", "replace")
        name = Rec(kind).name if kind in Rec._value2member_map_ else f"kind {kind}"
        raise RemoteProtocolError(f"transfer record {name} is out of order or malformed")


class SenderStream:
    """What a sender accepts from the receiver: a HAVE for each file ENTRY when resuming
    (before its data), and one RESULT per ENTRY or FAIL, in the order they were sent (a
    file's RESULT after its HAVE; the earlier entries' RESULTs while it waits for it)."""

    def __init__(self) -> None:
        self._due: deque[str] = deque()  # paths awaiting their RESULT
        self._have: str | None = None  # the file awaiting its HAVE

    def sent(self, path: str, *, want_have: bool = False) -> None:
        """We sent an ENTRY or FAIL for `path` (and, for a resumed file, await its HAVE)."""
        self._due.append(path)
        if want_have:
            self._have = path

    @property
    def awaiting_have(self) -> bool:
        return self._have is not None

    @property
    def outstanding(self) -> int:
        """RESULTs still to come."""
        return len(self._due)

    def feed(self, payload: bytes | bytearray | memoryview) -> tuple[str, Any]:
        """("have", (offset, digest)) or ("result", Result)."""
        if not payload:
            raise RemoteProtocolError("an empty transfer record")
        kind, body = payload[0], memoryview(payload)[1:]
        if kind == Rec.HAVE and self._have is not None:
            obj = _object(body, "HAVE")
            _members(obj, "HAVE", {"offset", "sha256"}, set())
            digest = _hex(obj["sha256"])
            self._have = None
            return "have", (_int(obj["offset"], "offset", 2**63 - 1), digest)
        # A RESULT answers the oldest entry; while a HAVE is due, that may be an earlier file
        # (its END crossed our next ENTRY), never the file awaiting the HAVE: the newest one.
        if kind == Rec.RESULT and self._due and (self._have is None or len(self._due) > 1):
            obj = _object(body, "RESULT")
            if "path" not in obj or "status" not in obj or not _RESULT_MEMBERS.issuperset(obj):
                _members(obj, "RESULT", {"path", "status"}, {"sha256", "error"})
            path = obj["path"]
            if path != self._due[0]:
                raise RemoteProtocolError(f"RESULT for {str(path)[:100]!r} out of order")
            status = obj["status"]
            if status not in STATUSES:
                raise RemoteProtocolError("RESULT status must be ok, skipped or failed")
            sha = obj.get("sha256")
            if sha is not None:
                _hex(sha)
            error = obj.get("error")
            if error is not None:
                _text(error, "error")
            self._due.popleft()
            return "result", Result(path, status, sha, error)
        raise RemoteProtocolError(f"transfer record kind {kind} is out of order or malformed")


def _hex(value: object) -> bytes:
    try:
        digest = bytes.fromhex(_text(value, "sha256"))
    except ValueError:
        digest = b""
    if len(digest) != SHA256_LEN:
        raise RemoteProtocolError("sha256 must be 64 hex digits")
    return digest
