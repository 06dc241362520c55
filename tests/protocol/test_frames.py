"""Framing and payload layouts: HELLO, FrameBuffer, EXIT, SIGNAL, WINDOW, ERROR, server info."""

from __future__ import annotations

import json
import struct

import pytest

from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol import messages as m
from rexec.protocol.frames import (
    HELLO_LEN,
    INNER_LEN,
    LENGTH,
    MAX_MSG2_LEN,
    MAX_PAYLOAD,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    MSG1_LEN,
    FrameBuffer,
    Hello,
    encode_frame,
)
from rexec.protocol.models import parse_exec_request
from rexec.protocol.noise import TAGLEN, Suite

KEY_ID = b"ABCDEFGH"

# ---- constants ---------------------------------------------------------------------------


def test_limits_match_the_design() -> None:
    assert MAX_PAYLOAD == 256 * 1024
    assert INNER_LEN == 8 and TAGLEN == 16
    assert MAX_TRANSPORT_BODY == 8 + 256 * 1024 + 16
    assert MIN_TRANSPORT_BODY == 8 + 16
    assert MSG1_LEN == 32 + 16
    assert MAX_MSG2_LEN == 32 + 4096 + 16
    assert HELLO_LEN == 16


# ---- HELLO -------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(Suite))
def test_hello_round_trip(suite: Suite) -> None:
    raw = Hello(suite, KEY_ID).pack()
    assert raw == b"RXEC\x02" + bytes([int(suite)]) + b"\x00\x00" + KEY_ID
    assert len(raw) == HELLO_LEN
    assert Hello.unpack(raw) == Hello(suite, KEY_ID, 2)


@pytest.mark.parametrize(
    ("index", "value", "words"),
    [
        (0, ord("X"), "bad magic"),
        (3, ord("c"), "bad magic"),
        (4, 0, "unsupported protocol version 0"),
        (4, 1, "unsupported protocol version 1 \\(this is rexec/2\\)"),
        (4, 3, "unsupported protocol version 3"),
        (4, 255, "unsupported protocol version 255"),
        (5, 0, "unknown cipher suite 0"),
        (5, 3, "unknown cipher suite 3"),
        (5, 255, "unknown cipher suite 255"),
        (6, 1, "reserved field must be zero"),
        (7, 0x80, "reserved field must be zero"),
    ],
)
def test_hello_rejects_bad_fields(index: int, value: int, words: str) -> None:
    raw = bytearray(Hello(Suite.AESGCM, KEY_ID).pack())
    raw[index] = value
    with pytest.raises(RemoteProtocolError, match=words):
        Hello.unpack(bytes(raw))


# ---- FrameBuffer -------------------------------------------------------------------------


def test_encode_frame() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(bytes(70000))[:4] == struct.pack(">I", 70000)


def test_framebuffer_waits_for_whole_bodies() -> None:
    fb = FrameBuffer(100)
    stream = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"x" * 100)
    out: list[bytes] = []
    for i in range(len(stream)):
        fb.feed(stream[i : i + 1])
        out += fb.bodies()
    assert out == [b"hello", b"", b"x" * 100]
    assert len(fb) == 0


def test_framebuffer_next_body_one_at_a_time() -> None:
    fb = FrameBuffer(10)
    fb.feed(encode_frame(b"one") + encode_frame(b"two") + b"\x00\x00")
    assert fb.next_body() == b"one"
    assert fb.next_body() == b"two"
    assert fb.next_body() is None
    fb.feed(b"\x00\x01")
    assert fb.next_body() is None
    fb.feed(b"Z")
    assert fb.next_body() == b"Z"


def test_framebuffer_take_raw() -> None:
    fb = FrameBuffer(10)
    fb.feed(b"0123456789abcde")
    assert fb.take_raw(16) is None
    fb.feed(b"f" + encode_frame(b"x"))
    assert fb.take_raw(16) == b"0123456789abcdef"
    assert fb.bodies() == [b"x"]


@pytest.mark.parametrize("method", ["next_body", "bodies"])
def test_framebuffer_rejects_too_long_at_the_header(method: str) -> None:
    fb = FrameBuffer(MAX_TRANSPORT_BODY, MIN_TRANSPORT_BODY, "frame")
    fb.feed(LENGTH.pack(MAX_TRANSPORT_BODY))
    assert getattr(fb, method)() in (None, [])  # the maximum itself is fine: wait for it
    fb = FrameBuffer(MAX_TRANSPORT_BODY, MIN_TRANSPORT_BODY, "frame")
    fb.feed(LENGTH.pack(MAX_TRANSPORT_BODY + 1))  # no body byte at all
    with pytest.raises(RemoteProtocolError, match=r"frame length 262169 exceeds the maximum"):
        getattr(fb, method)()
    fb = FrameBuffer(MAX_TRANSPORT_BODY, MIN_TRANSPORT_BODY, "frame")
    fb.feed(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        getattr(fb, method)()


@pytest.mark.parametrize("method", ["next_body", "bodies"])
def test_framebuffer_rejects_too_short_at_the_header(method: str) -> None:
    fb = FrameBuffer(MAX_TRANSPORT_BODY, MIN_TRANSPORT_BODY, "frame")
    fb.feed(LENGTH.pack(MIN_TRANSPORT_BODY - 1))
    with pytest.raises(RemoteProtocolError, match="length 23 is below the minimum of 24"):
        getattr(fb, method)()
    fb = FrameBuffer(MSG1_LEN, MSG1_LEN, "handshake message 1")
    fb.feed(LENGTH.pack(0))
    with pytest.raises(RemoteProtocolError, match="handshake message 1 length 0 is below"):
        getattr(fb, method)()


def test_framebuffer_checks_a_later_header_in_the_same_feed() -> None:
    fb = FrameBuffer(10)
    fb.feed(encode_frame(b"ok") + LENGTH.pack(11))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        fb.bodies()


# ---- EXIT --------------------------------------------------------------------------------


def test_exit_status_round_trip_every_code() -> None:
    for code in range(256):
        status = m.ExitStatus(code, duration=code / 1000)
        raw = status.pack()
        assert len(raw) == m.EXIT.size == 16
        assert m.ExitStatus.unpack(raw) == status


@pytest.mark.parametrize("sig", [1, 2, 9, 15, 31, 64, 255])
@pytest.mark.parametrize("timed_out", [False, True])
def test_exit_status_round_trip_signals(sig: int, timed_out: bool) -> None:
    status = m.ExitStatus(None, sig, timed_out, 12.345678)
    back = m.ExitStatus.unpack(status.pack())
    assert back == status
    assert back.exit_code is None and back.signal == sig and back.timed_out is timed_out


def test_exit_status_layout() -> None:
    raw = m.ExitStatus(3, None, True, 1.5).pack()
    assert raw == struct.pack(">iBBHQ", 3, 0, 1, 0, 1_500_000)
    assert m.ExitStatus(None, 9).pack() == struct.pack(">iBBHQ", -1, 9, 0, 0, 0)
    assert m.ExitStatus(0, duration=-5.0).pack()[-8:] == bytes(8)  # clamped at zero


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "must be 16 bytes, got 0"),
        (bytes(15), "must be 16 bytes, got 15"),
        (bytes(17), "must be 16 bytes, got 17"),
        (struct.pack(">iBBHQ", 0, 0, 2, 0, 0), "reserved bits must be zero"),
        (struct.pack(">iBBHQ", 0, 0, 0x81, 0, 0), "reserved bits must be zero"),
        (struct.pack(">iBBHQ", 0, 0, 0, 1, 0), "reserved bits must be zero"),
        (struct.pack(">iBBHQ", 256, 0, 0, 0, 0), "EXIT code 256 out of range"),
        (struct.pack(">iBBHQ", -2, 9, 0, 0, 0), "EXIT code -2 out of range"),
        (struct.pack(">iBBHQ", -(2**31), 0, 0, 0, 0), "out of range"),
        (struct.pack(">iBBHQ", -1, 0, 0, 0, 0), "exactly one of an exit code or a signal"),
        (struct.pack(">iBBHQ", 0, 9, 0, 0, 0), "exactly one of an exit code or a signal"),
    ],
)
def test_exit_status_rejects_bad_layouts(raw: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        m.ExitStatus.unpack(raw)


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (m.ExitStatus(256), "exit code 256 out of range"),
        (m.ExitStatus(-1, 9), "exit code -1 out of range"),  # -1 is the wire's "no code"
        (m.ExitStatus(-1), "exit code -1 out of range"),
        (m.ExitStatus(-7), "exit code -7 out of range"),
        (m.ExitStatus(0, 256), "signal 256 out of range"),
        (m.ExitStatus(0, -1), "signal -1 out of range"),
        (m.ExitStatus(None), "exactly one of an exit code or a signal"),
        (m.ExitStatus(0, 9), "exactly one of an exit code or a signal"),
    ],
)
def test_exit_status_pack_refuses_what_the_peer_would_reject(
    status: m.ExitStatus, words: str
) -> None:
    with pytest.raises(LocalProtocolError, match=words):
        status.pack()


# ---- SIGNAL, WINDOW, ERROR ---------------------------------------------------------------


def test_signal_round_trip_and_range() -> None:
    for sig in range(1, 65):
        assert m.unpack_signal(m.pack_signal(sig)) == sig
    for bad in (0, 65, -1):
        with pytest.raises(LocalProtocolError, match=r"out of range 1\.\.64"):
            m.pack_signal(bad)
    for raw in (struct.pack(">I", 0), struct.pack(">I", 65), struct.pack(">I", 2**32 - 1)):
        with pytest.raises(RemoteProtocolError, match=r"out of range 1\.\.64"):
            m.unpack_signal(raw)
    for raw in (b"", b"\x00\x00\x09", b"\x00\x00\x00\x09\x00"):
        with pytest.raises(RemoteProtocolError, match="must be 4 bytes"):
            m.unpack_signal(raw)


def test_window_round_trip_and_range() -> None:
    assert m.unpack_window(m.pack_window(24, 80)) == (24, 80)
    assert m.unpack_window(m.pack_window(0xFFFF, 0)) == (0xFFFF, 0)
    with pytest.raises(LocalProtocolError, match="window size out of range"):
        m.pack_window(0x10000, 1)
    with pytest.raises(RemoteProtocolError, match="must be 4 bytes"):
        m.unpack_window(b"\x00\x18\x00")


def test_error_round_trip_and_limits() -> None:
    assert m.unpack_error(m.pack_error(3, "bad request: ünïcode")) == (3, "bad request: ünïcode")
    assert m.unpack_error(m.pack_error(0xFFFF, "")) == (0xFFFF, "")
    long = m.pack_error(1, "x" * 5000)
    assert len(long) == 2 + m.MAX_ERROR_TEXT
    assert m.unpack_error(long) == (1, "x" * 1024)
    # a cut inside a UTF-8 character decodes with a replacement, never raises
    code, text = m.unpack_error(m.pack_error(1, "é" * 600))
    assert code == 1 and text.startswith("é" * 512) and len(text) == 512
    code, text = m.unpack_error(b"\x00\x01" + "é".encode()[:1])
    assert text == "\ufffd"
    for raw in (b"", b"\x00", bytes(2 + m.MAX_ERROR_TEXT + 1)):
        with pytest.raises(RemoteProtocolError, match=r"ERROR payload of \d+ bytes is malformed"):
            m.unpack_error(raw)


def test_auth_proof_binds_secret_and_handshake() -> None:
    secret, h = bytes(range(32)), bytes(32)
    proof = m.auth_proof(secret, h)
    assert len(proof) == m.AUTH_LEN
    assert m.verify_auth_proof(secret, h, proof)
    assert not m.verify_auth_proof(secret, b"\x01" + h[1:], proof)
    assert not m.verify_auth_proof(bytes(32), h, proof)
    assert not m.verify_auth_proof(secret, h, proof[:-1] + bytes([proof[-1] ^ 1]))
    assert not m.verify_auth_proof(secret, h, proof[:31])


# ---- server info -------------------------------------------------------------------------

INFO = m.ServerInfo(
    server="rexec 0.1", user="u", host="h", max_payload=262144, max_channels=64, max_timeout=60
)


def _info_dict() -> dict[str, object]:
    data = json.loads(INFO.to_json())
    assert isinstance(data, dict)
    return data


def _bad_info(data: object, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        m.ServerInfo.from_json(json.dumps(data).encode())


def test_server_info_round_trip() -> None:
    assert m.ServerInfo.from_json(INFO.to_json()) == INFO
    assert set(_info_dict()) == {
        "protocol",
        "server",
        "user",
        "host",
        "max_payload",
        "max_channels",
        "default_timeout",
        "max_timeout",
        "window",
    }
    other = m.ServerInfo("s", "u", "h", 1, 1, default_timeout=2.5, max_timeout=None)
    assert m.ServerInfo.from_json(other.to_json()) == other


def test_server_info_rejects_extra_field() -> None:
    data = _info_dict()
    data["admin"] = True
    _bad_info(data, "unknown fields: admin")


@pytest.mark.parametrize("name", sorted(_info_dict()))
def test_server_info_rejects_missing_field(name: str) -> None:
    data = _info_dict()
    del data[name]
    _bad_info(data, f"lacks fields: {name}")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("protocol", 1),
        ("server", None),
        ("user", ["u"]),
        ("host", {"h": 1}),
        ("max_payload", "262144"),
        ("max_payload", 262144.0),
        ("max_payload", True),
        ("max_channels", None),
        ("max_channels", False),
        ("default_timeout", "10"),
        ("default_timeout", True),
        ("max_timeout", [60]),
        ("window", 1.5),
        ("window", None),
        ("window", True),
    ],
)
def test_server_info_rejects_wrong_types(name: str, value: object) -> None:
    data = _info_dict()
    data[name] = value
    _bad_info(data, f"field '{name}' has the wrong type")


def test_server_info_rejects_bad_values() -> None:
    data = _info_dict()
    data["protocol"] = "rexec/1"
    _bad_info(data, "server speaks 'rexec/1', not rexec/2")
    for window in (-1, 2**32):
        data = _info_dict()
        data["window"] = window
        _bad_info(data, "window must be within 0..4294967295")
    for field in ("max_payload", "max_channels"):
        data = _info_dict()
        data[field] = 0
        _bad_info(data, "limits must be positive")
    _bad_info([1, 2], "must be a JSON object")
    _bad_info("info", "must be a JSON object")
    for raw in (b"", b"{", b"\xff\xfe{}", b'{"a":1}x', b"[" * 3000 + b"]" * 3000, b"[" * 4000):
        with pytest.raises(RemoteProtocolError, match="not valid JSON"):
            m.ServerInfo.from_json(raw)


# ---- EXEC body ---------------------------------------------------------------------------


def test_exec_request_json_round_trips_through_the_server_model() -> None:
    body = m.exec_request_json(["ls", "-l"], env={"A": "1"}, cwd="/tmp", timeout=5, stdin=True)
    req = parse_exec_request(body)
    assert req.argv == ("ls", "-l") and req.command is None
    assert req.env == {"A": "1"} and req.cwd == "/tmp"
    assert req.timeout == 5.0 and req.stdin is True
    req = parse_exec_request(m.exec_request_json("echo hi"))
    assert req.command == "echo hi" and req.argv is None and req.stdin is False
    assert req.timeout is None and req.env == {}
    assert req.window == m.OUTPUT_WINDOW
    assert parse_exec_request(m.exec_request_json("x", window=0)).window == 0


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: m.exec_request_json([]), "non-empty sequence of str"),
        (lambda: m.exec_request_json(["a", 1]), "non-empty sequence of str"),  # type: ignore[list-item]
        (lambda: m.exec_request_json("x", timeout=0), "timeout must be positive"),
        (lambda: m.exec_request_json("x", timeout=-1), "timeout must be positive"),
        (lambda: m.exec_request_json("x", timeout=float("nan")), "timeout must be positive"),
        (lambda: m.exec_request_json("x", window=-1), "window -1 out of range"),
        (lambda: m.exec_request_json("x", window=2**32), "out of range 0..4294967295"),
    ],
)
def test_exec_request_json_refuses_locally(call: object, words: str) -> None:
    with pytest.raises(LocalProtocolError, match=words):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"command":"x","window":0,"timeout":1' + b"0" * 400 + b"}", "timeout.*too large"),
        (b'{"command":"x","window":0,"timeout":1e999}', "positive number"),
        (b'{"command":"x"}', "window: Field required"),
        (b'{"command":"x","window":-1}', "window: Input should be greater than or equal to 0"),
        (b'{"command":"x","window":4294967296}', "window: Input should be less than or equal"),
        (b'{"command":"x","window":1.0}', "window: Input should be a valid integer"),
        (b'{"command":"x","window":true}', "window: Input should be a valid integer"),
        (b"[" * 5000, "Invalid JSON"),
        (b"\xff", "Invalid JSON"),
    ],
)
def test_parse_exec_request_extremes_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"invalid EXEC request: .*{words}"):
        parse_exec_request(body)
