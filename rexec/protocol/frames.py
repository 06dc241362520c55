"""rexec/2 framing: the 16-byte cleartext HELLO, then `u32 length` + body frames.

Lengths are checked the moment the 4 header bytes are in, before any body byte is
buffered, so a peer can never make us allocate more than one maximal frame.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from rexec._record import FrozenRecord, setfield
from rexec.errors import RemoteProtocolError
from rexec.protocol.noise import DHLEN, TAGLEN, Suite
from rexec.protocol.notice import HelloRefused, RefusalCode

MAGIC = b"RXEC"
VERSION = 2  # rexec/2: per-channel flow control (CREDIT) changed the wire
HELLO_LEN = 16
HELLO = struct.Struct(">4sBBH8s")  # magic | version | suite | reserved | key_id
LENGTH = struct.Struct(">I")
INNER = struct.Struct(">BBHI")  # type | flags | reserved | channel
INNER_LEN = INNER.size
HEADROOM = INNER_LEN  # a data payload built with this much room in front is framed in place
MAX_PAYLOAD = 256 * 1024
MAX_TRANSPORT_BODY = INNER_LEN + MAX_PAYLOAD + TAGLEN
MIN_TRANSPORT_BODY = INNER_LEN + TAGLEN
MSG1_LEN = DHLEN + TAGLEN  # e + tag of the empty payload
MAX_SERVER_INFO = 4096
MAX_MSG2_LEN = DHLEN + MAX_SERVER_INFO + TAGLEN
MAX_CHANNEL = 2**32 - 1
RECV_INITIAL = 64 * 1024  # most connections carry small frames: start small (and cheap)
RECV_CAPACITY = 4 * (4 + MAX_TRANSPORT_BODY)  # bulk streams grow to a few frames per recv
MIN_RECV = 64 * 1024
PREAUTH_RECV = 4096  # a server's whole receive buffer until AUTH: unearned bytes buy no memory


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
    CREDIT = 14
    XFER = 15


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
            raise HelloRefused(
                RefusalCode.VERSION_NOT_SUPPORTED,
                f"unsupported protocol version {version} (this is rexec/{VERSION})",
            )
        if reserved != 0:
            raise RemoteProtocolError("HELLO reserved field must be zero")
        try:
            s = Suite(suite)
        except ValueError:
            raise HelloRefused(
                RefusalCode.SUITE_NOT_ALLOWED, f"unknown cipher suite {suite} in HELLO"
            ) from None
        return cls(s, key_id, version)


def payload_buffer(payload: bytes | bytearray | memoryview) -> bytearray:
    """`payload` copied behind HEADROOM free bytes: the form data frames are queued in.

    Producers that can read straight into such a buffer (the server's pipe reader) skip
    this copy; for everyone else it is the one copy a payload makes before encryption.
    """
    buf = bytearray(HEADROOM)
    buf += payload
    return buf


def encode_frame(body: bytes) -> bytes:
    """A frame: the body's length as u32 big-endian, then the body."""
    return LENGTH.pack(len(body)) + body


class FrameBuffer:
    """A receive buffer that yields whole frame bodies, validating each length at once.

    Fixed capacity, filled either by `feed(data)` (a copy) or in place: `get_buffer()` hands
    out its free tail for `recv_into`, `buffer_updated(n)` commits it. Bodies come out as
    memoryviews of the buffer, so the only copy of a frame between the socket and the AEAD
    is the kernel's. A view must be released before the next fill (the caller's job).

    While `limit` is set the buffer stays that size and never grows: a server keeps it so
    until the peer authenticates, so that pre-authentication bytes (`RXEC` read as a length,
    say) cannot make it allocate. Its max_body must then leave the frame room in `limit`.
    """

    __slots__ = ("_buf", "_end", "_start", "limit", "max_body", "min_body", "what")

    def __init__(
        self, max_body: int, min_body: int = 0, what: str = "frame", *, limit: int | None = None
    ) -> None:
        self._buf = bytearray(limit or RECV_INITIAL)
        self._start = 0
        self._end = 0
        self.max_body = max_body
        self.min_body = min_body
        self.what = what
        self.limit = limit

    def __len__(self) -> int:
        return self._end - self._start

    def _room(self, need: int, grow_to: int = 0) -> None:
        """Make `need` bytes free after the data: move the unread tail home, or grow
        (at least doubling, and to `grow_to` when the stream has shown it needs that)."""
        buf = self._buf
        if len(buf) - self._end >= need:
            return
        size = self._end - self._start
        if size + need <= len(buf) and grow_to <= len(buf):
            buf[:size] = buf[self._start : self._end]  # same length: no resize
        else:
            grown = bytearray(max(2 * len(buf), size + need, grow_to))
            grown[:size] = buf[self._start : self._end]
            self._buf = grown
        self._start, self._end = 0, size

    def release(self) -> None:
        """Drop the buffer (the stream is over): its memory goes at once, not at the next
        garbage collection of whatever still refers to us."""
        self._buf = bytearray()
        self._start = self._end = 0

    def feed(self, data: bytes) -> None:
        n = len(data)
        self._room(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def get_buffer(self) -> memoryview:
        """The free tail of the buffer, to receive into (at least MIN_RECV bytes).

        A frame too big for the buffer grows it, up to RECV_CAPACITY: then one recv can
        take in several whole frames of a bulk stream.
        """
        if self._start == self._end:
            self._start = self._end = 0
        size = self._end - self._start
        if self.limit is not None:
            self._room(max(1, self.limit - size))
            return memoryview(self._buf)[self._end :]
        grow_to = 0
        if size >= 4 and len(self._buf) < RECV_CAPACITY:
            (n,) = LENGTH.unpack_from(self._buf, self._start)
            if 4 + n > len(self._buf) - self._start:  # the current frame does not fit
                grow_to = min(RECV_CAPACITY, 4 * (4 + n))
        self._room(MIN_RECV, grow_to)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, n: int) -> None:
        """`n` bytes were written at the start of the last get_buffer() view."""
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({n}) beyond the buffer handed out")
        self._end += n

    def peek(self, n: int) -> bytes:
        """Up to the next n buffered bytes, left in the buffer."""
        return bytes(self._buf[self._start : min(self._end, self._start + n)])

    def take_raw(self, n: int) -> bytes | None:
        """The next n unframed bytes (the HELLO), or None until they are all here."""
        if self._end - self._start < n:
            return None
        out = bytes(self._buf[self._start : self._start + n])
        self._start += n
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

    def next_view(self) -> memoryview | None:
        """A view of the next complete body, or None; raises once a bad length is visible."""
        start = self._start
        if self._end - start < 4:
            return None
        (n,) = LENGTH.unpack_from(self._buf, start)
        self._check(n)
        end = start + 4 + n
        if end > self._end:
            return None
        self._start = end
        return memoryview(self._buf)[start + 4 : end]

    def next_body(self) -> bytes | None:
        """As next_view, as bytes (for the small handshake messages)."""
        view = self.next_view()
        if view is None:
            return None
        with view:
            return bytes(view)

    def bodies(self) -> list[bytes]:
        """Every complete body now buffered, as bytes."""
        out: list[bytes] = []
        while (body := self.next_body()) is not None:
            out.append(body)
        return out
