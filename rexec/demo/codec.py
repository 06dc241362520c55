"""The demo's framing codec: a big-endian u32 length, then exactly that many body bytes.

It mirrors rexec/2's outer frame without the encryption, so a class can read every byte.
The decoder is sans-I/O (bytes in, frames out), like rexec's own protocol layer, and it
checks the length the moment the 4 header bytes are known: an oversize length is refused
before a single body byte is buffered, so a peer cannot make us wait for, or allocate,
4 GiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from rexec.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size  # 4

# rexec/2's largest body: 8-byte inner header + 256 KiB payload + 16-byte AEAD tag.
MAX_BODY = 8 + 256 * 1024 + 16


class FrameTooLarge(RemoteProtocolError):
    """A header announced a body longer than the cap; refused before reading the body."""

    def __init__(self, header: bytes, length: int, limit: int) -> None:
        super().__init__(
            f"frame header {hex_bytes(header)} announces {length} body bytes, over the "
            f"{limit}-byte cap: refused before reading the body"
        )
        self.header = header
        self.length = length
        self.limit = limit


@dataclass(frozen=True)
class Frame:
    """One decoded frame, with its header exactly as it came off the wire."""

    header: bytes
    body: bytes

    @property
    def length(self) -> int:
        """The length field the header carried (always equal to len(body))."""
        return int(HEADER.unpack(self.header)[0])


def hex_bytes(data: bytes) -> str:
    """Bytes as spaced hex ("00 00 22 bd"), the way a class reads a header."""
    return data.hex(" ")


def encode_header(length: int, max_body: int = MAX_BODY) -> bytes:
    """The 4 header bytes for a body of `length` bytes."""
    if not 0 <= length <= max_body:
        raise LocalProtocolError(f"body of {length} bytes is over the {max_body}-byte cap")
    return HEADER.pack(length)


def encode(body: bytes, max_body: int = MAX_BODY) -> bytes:
    """Header plus body in one bytes object, so it goes out in a single write."""
    return encode_header(len(body), max_body) + body


def parse_header(header: bytes, max_body: int = MAX_BODY) -> int:
    """Validate 4 header bytes and return the body length they announce."""
    if len(header) != HEADER_SIZE:
        raise LocalProtocolError(f"a header is {HEADER_SIZE} bytes, got {len(header)}")
    length = int(HEADER.unpack(header)[0])
    if length > max_body:
        raise FrameTooLarge(bytes(header), length, max_body)
    return length


class FrameDecoder:
    """Turns an arbitrary split of the byte stream back into the frames that were sent.

    Feed it whatever recv() returned (one byte, half a header, three frames glued together);
    it returns every frame completed so far and keeps the partial rest.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._header = bytearray()
        self._body = bytearray()
        self._need: int | None = None  # body length once the header is known

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held so far (0 at a frame boundary)."""
        return len(self._header) + len(self._body)

    @property
    def body_buffered(self) -> int:
        """Body bytes held for the unfinished frame (0 after an oversize refusal)."""
        return len(self._body)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume `data`; return the frames it completed, in order."""
        frames: list[Frame] = []
        view = memoryview(data)
        pos = 0
        # Every pass consumes at least one byte or completes a frame of >= 4 bytes.
        for _ in range(len(data) + 2):
            if self._need is None:
                take = min(HEADER_SIZE - len(self._header), len(view) - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_SIZE:
                    break
                # Validated here, before any body byte is copied.
                self._need = parse_header(bytes(self._header), self.max_body)
            take = min(self._need - len(self._body), len(view) - pos)
            self._body += view[pos : pos + take]
            pos += take
            if len(self._body) < self._need:
                break
            frames.append(Frame(bytes(self._header), bytes(self._body)))
            self._header.clear()
            self._body.clear()
            self._need = None
        return frames
