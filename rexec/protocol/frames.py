"""rexec/1 framing: the 16-byte cleartext HELLO, then `u32 length` + body frames.

Lengths are checked the moment the 4 header bytes are in, before any body byte is
buffered, so a peer can never make us allocate more than one maximal frame.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from rexec._record import FrozenRecord, setfield
from rexec.errors import RemoteProtocolError
from rexec.protocol.noise import DHLEN, TAGLEN, Suite

MAGIC = b"RXEC"
VERSION = 1
HELLO_LEN = 16
HELLO = struct.Struct(">4sBBH8s")  # magic | version | suite | reserved | key_id
LENGTH = struct.Struct(">I")
INNER = struct.Struct(">BBHI")  # type | flags | reserved | channel
INNER_LEN = INNER.size
MAX_PAYLOAD = 256 * 1024
MAX_TRANSPORT_BODY = INNER_LEN + MAX_PAYLOAD + TAGLEN
MIN_TRANSPORT_BODY = INNER_LEN + TAGLEN
MSG1_LEN = DHLEN + TAGLEN  # e + tag of the empty payload
MAX_SERVER_INFO = 4096
MAX_MSG2_LEN = DHLEN + MAX_SERVER_INFO + TAGLEN
MAX_CHANNEL = 2**32 - 1


class FrameType(IntEnum):
    """The inner header's type byte (docs/PROTOCOL.md, "Frame types")."""

    AUTH = 1
    EXEC = 2
    STDIN = 3
    STDIN_EOF = 4
    STDOUT = 5
    STDERR = 6
    EXIT = 7
    SIGNAL = 8
    WINDOW = 9
    ERROR = 10
    PING = 11
    PONG = 12
    CLOSE = 13


class Hello(FrozenRecord):
    """The cleartext HELLO header; it is also the Noise prologue, so it is authenticated."""

    __match_args__ = ("suite", "key_id", "version")
    __slots__ = __match_args__
    suite: Suite
    key_id: bytes
    version: int

    def __init__(self, suite: Suite, key_id: bytes, version: int = VERSION) -> None:
        setfield(self, "suite", suite)
        setfield(self, "key_id", key_id)
        setfield(self, "version", version)

    def pack(self) -> bytes:
        return HELLO.pack(MAGIC, self.version, int(self.suite), 0, self.key_id)

    @classmethod
    def unpack(cls, data: bytes) -> Hello:
        magic, version, suite, reserved, key_id = HELLO.unpack(data)
        if magic != MAGIC:
            raise RemoteProtocolError("not a rexec client: bad magic in HELLO")
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version} (this is rexec/1)")
        if reserved != 0:
            raise RemoteProtocolError("HELLO reserved field must be zero")
        try:
            s = Suite(suite)
        except ValueError:
            raise RemoteProtocolError(f"unknown cipher suite {suite} in HELLO") from None
        return cls(s, key_id, version)


def encode_frame(body: bytes) -> bytes:
    """A frame: the body's length as u32 big-endian, then the body."""
    return LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Collects bytes and yields whole frame bodies, validating each length at once."""

    __slots__ = ("_buf", "max_body", "min_body", "what")

    def __init__(self, max_body: int, min_body: int = 0, what: str = "frame") -> None:
        self._buf = bytearray()
        self.max_body = max_body
        self.min_body = min_body
        self.what = what

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_raw(self, n: int) -> bytes | None:
        """The next n unframed bytes (the HELLO), or None until they are all here."""
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _check(self, n: int) -> None:
        if n > self.max_body:
            raise RemoteProtocolError(
                f"{self.what} length {n} exceeds the maximum of {self.max_body} bytes"
            )
        if n < self.min_body:
            raise RemoteProtocolError(
                f"{self.what} length {n} is below the minimum of {self.min_body} bytes"
            )

    def next_body(self) -> bytes | None:
        """The next complete body, or None; raises as soon as a bad length is visible."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (n,) = LENGTH.unpack_from(buf)
        self._check(n)
        end = 4 + n
        if len(buf) < end:
            return None
        body = bytes(buf[4:end])
        del buf[:end]
        return body

    def bodies(self) -> list[bytes]:
        """Every complete body now buffered, consumed in one pass."""
        buf = self._buf
        out: list[bytes] = []
        off = 0
        size = len(buf)
        while size - off >= 4:
            (n,) = LENGTH.unpack_from(buf, off)
            self._check(n)
            end = off + 4 + n
            if end > size:
                break
            out.append(bytes(buf[off + 4 : end]))
            off = end
        if off:
            del buf[:off]
        return out
