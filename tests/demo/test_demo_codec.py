"""The demo's length-prefixed codec: exact boundaries at every split, oversize refused early."""

from __future__ import annotations

import socket

import pytest

from rexec.demo.codec import (
    MAX_BODY,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    encode,
    encode_header,
    parse_header,
)
from rexec.demo.framed import FramedConnection, FrameLog
from rexec.errors import LocalProtocolError, RemoteProtocolError, TruncatedError

BODIES = [b"seq 1 2000", b"", b"\x00\x00\x00\x04", b"x" * 1500]


def test_header_is_big_endian_u32() -> None:
    assert encode(b"seq 1 2000") == b"\x00\x00\x00\x0aseq 1 2000"
    assert encode_header(8893) == b"\x00\x00\x22\xbd"
    assert encode(b"") == b"\x00\x00\x00\x00"
    assert parse_header(b"\x00\x01\x00\x00") == 65536


def test_cap_mirrors_rexec1_largest_body() -> None:
    # 8-byte inner header + 256 KiB payload + 16-byte AEAD tag.
    assert MAX_BODY == 262_168
    frames = pytest.importorskip("rexec.protocol.frames")
    assert frames.MAX_TRANSPORT_BODY == MAX_BODY  # the lesson must not drift from rexec/2


def test_every_split_point_gives_back_the_exact_frames() -> None:
    stream = b"".join(encode(body) for body in BODIES)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [f.body for f in frames] == BODIES, cut
        assert decoder.buffered == 0


def test_one_byte_at_a_time() -> None:
    stream = b"".join(encode(body) for body in BODIES)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i : i + 1])
    assert [f.body for f in frames] == BODIES
    assert [f.header for f in frames] == [encode_header(len(b)) for b in BODIES]
    assert [f.length for f in frames] == [10, 0, 4, 1500]


def test_partial_frame_is_held_not_returned() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode(b"hello")[:7]) == []
    assert decoder.buffered == 7
    assert decoder.body_buffered == 3
    assert decoder.feed(b"lo") == [Frame(b"\x00\x00\x00\x05", b"hello")]


def test_oversize_refused_at_the_header_before_any_body_byte() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)
    assert info.value.length == 0xFFFF_FFFF
    assert info.value.header == b"\xff\xff\xff\xff"
    assert decoder.body_buffered == 0
    assert isinstance(info.value, RemoteProtocolError)


def test_oversize_refused_when_header_arrives_in_pieces() -> None:
    decoder = FrameDecoder()
    header = encode_header(MAX_BODY)[:3] + bytes([encode_header(MAX_BODY)[3] + 1])
    assert decoder.feed(header[:2]) == []
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header[2:])
    assert info.value.length == MAX_BODY + 1
    assert decoder.body_buffered == 0


def test_exactly_the_cap_is_accepted() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_header(MAX_BODY) + b"y" * 10) == []
    assert decoder.body_buffered == 10
    frames = decoder.feed(b"y" * (MAX_BODY - 10))
    assert len(frames) == 1 and len(frames[0].body) == MAX_BODY


def test_encoding_over_the_cap_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(b"z" * 11, max_body=10)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_framed_connection_round_trip_and_clean_eof() -> None:
    a, b = _pair()
    log = FrameLog()
    try:
        sender = FramedConnection(a, "a -> b")
        receiver = FramedConnection(b, "a -> b", log)
        for body in BODIES:
            sender.send(body)
        a.shutdown(socket.SHUT_WR)
        got = [receiver.recv() for _ in BODIES]
        assert got == BODIES
        assert receiver.recv() is None
        assert [r.frame.body for r in log.records()] == BODIES
    finally:
        a.close()
        b.close()


def test_eof_inside_a_frame_is_truncation_not_success() -> None:
    a, b = _pair()
    try:
        a.sendall(encode(b"hello world")[:9])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(TruncatedError, match="9 bytes into a frame"):
            FramedConnection(b, "a -> b").recv()
    finally:
        a.close()
        b.close()
