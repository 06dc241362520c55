"""What may come back in place of message 2: the refusal notice, an SSH banner, an HTTP
reply; and the small, fixed receive buffer a server keeps until AUTH."""

from __future__ import annotations

from typing import Any

import pytest

from rexec.errors import LocalProtocolError, NotRexecServer, RemoteProtocolError, ServerRefused
from rexec.protocol.frames import LENGTH, PREAUTH_RECV, VERSION
from rexec.protocol.messages import ServerInfo
from rexec.protocol.notice import (
    BUSY_RETRIES,
    NOTICE_LEN,
    RefusalCode,
    busy_retry_delay,
    encode_notice,
    inspect_reply,
    stalled_handshake,
)
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import generate_token

INFO = ServerInfo(server="rexec test", user="u", host="h", max_payload=262144, max_channels=64)
NOTICES = [
    (RefusalCode.BUSY, 1, b"RXNO\x02\x01\x00\x01"),
    (RefusalCode.RATE_LIMITED, 60, b"RXNO\x02\x02\x00\x3c"),
    (RefusalCode.SUITE_NOT_ALLOWED, 0, b"RXNO\x02\x03\x00\x00"),
    (RefusalCode.SHUTTING_DOWN, 0, b"RXNO\x02\x04\x00\x00"),
    (RefusalCode.VERSION_NOT_SUPPORTED, 0, b"RXNO\x02\x05\x00\x00"),
]


@pytest.mark.parametrize(("code", "retry", "wire"), NOTICES)
def test_notice_bytes(code: RefusalCode, retry: int, wire: bytes) -> None:
    assert encode_notice(code, retry, version=VERSION) == wire
    assert len(wire) == NOTICE_LEN


def test_retry_hint_is_clamped_to_u16() -> None:
    assert encode_notice(RefusalCode.BUSY, 10**9, version=VERSION)[6:] == b"\xff\xff"
    assert encode_notice(RefusalCode.BUSY, -5, version=VERSION)[6:] == b"\x00\x00"
    assert encode_notice(RefusalCode.BUSY, 1.6, version=VERSION)[6:] == b"\x00\x02"


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            b"RXNO\x02\x01\x00\x01",
            "the server refused the connection: busy, too many connections (try again in 1s)",
        ),
        (
            b"RXNO\x02\x02\x00\x3c",
            "the server refused the connection: rate limited, too many failed authentications "
            "from this address or user (try again in 60s)",
        ),
        (
            b"RXNO\x02\x03\x00\x00",
            "the server refused the connection: cipher suite ChaChaPoly is not allowed",
        ),
        (b"RXNO\x02\x04\x00\x00", "the server refused the connection: the server is shutting down"),
        (
            b"RXNO\x03\x05\x00\x00",
            "the server refused the connection: protocol version rexec/2 is not supported "
            "(the server speaks rexec/3)",
        ),
        (
            b"RXNO\x02\x63\x00\x07",
            "the server refused the connection: reason code 99 (try again in 7s)",
        ),
    ],
)
def test_notice_message(wire: bytes, message: str) -> None:
    with pytest.raises(ServerRefused) as info:
        inspect_reply(wire, suite="ChaChaPoly", version=VERSION)
    assert str(info.value) == message
    assert info.value.code == wire[5]
    assert info.value.retry_after == int.from_bytes(wire[6:], "big")


@pytest.mark.parametrize(
    ("head", "need"),
    [
        (b"", 1),
        (b"\x00", 0),  # message 2's length: a frame
        (b"\x00\x00\x00\xd0", 0),
        (b"R", 3),
        (b"RXN", 1),
        (b"RXNO\x02", 3),
        (b"S", 3),
        (b"SSH", 1),
        (b"H", 4),
        (b"HTTP", 1),
        (b"RXEC", 0),  # nothing we know: a frame, whose length check then fails
        (b"\xff", 0),
        (b"SSx", 0),
    ],
)
def test_inspect_reply_needs(head: bytes, need: int) -> None:
    assert inspect_reply(head, version=VERSION) == need


@pytest.mark.parametrize(
    ("head", "speaks"),
    [(b"SSH-2.0-OpenSSH_9.2\r\n", "SSH"), (b"SSH-", "SSH"), (b"HTTP/1.1 400 Bad", "HTTP")],
)
def test_foreign_protocols_are_named(head: bytes, speaks: str) -> None:
    with pytest.raises(NotRexecServer, match=rf"^not a rexec server \(it speaks {speaks}\)$"):
        inspect_reply(head, version=VERSION)


def test_stalled_handshake_message() -> None:
    assert stalled_handshake("h:1", 10.0, 0) == (
        "handshake with h:1 timed out after 10s: the server sent nothing back "
        "(it may not be a rexec server)"
    )
    assert stalled_handshake("h:1", 0.5, 7) == (
        "handshake with h:1 timed out after 0.5s: the server's reply stopped after 7 bytes"
    )


def test_busy_retry_delay_is_bounded() -> None:
    busy = ServerRefused(RefusalCode.BUSY, 1, "busy")
    for retries in range(BUSY_RETRIES):
        for _ in range(50):
            delay = busy_retry_delay(busy, retries, 100.0)
            assert delay is not None and 0.5 <= delay <= 1.0
    assert busy_retry_delay(busy, BUSY_RETRIES, 100.0) is None  # a bounded number of tries
    assert busy_retry_delay(busy, 0, 0.4) is None  # never past the connect deadline
    huge = ServerRefused(RefusalCode.BUSY, 3600, "busy")
    assert (busy_retry_delay(huge, 0, 100.0) or 99) <= 2.0  # a capped wait
    for code in (RefusalCode.RATE_LIMITED, RefusalCode.SHUTTING_DOWN, 99):
        assert busy_retry_delay(ServerRefused(code, 1, "x"), 0, 100.0) is None


# ---- the client, fed byte by byte -----------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error", "words"),
    [
        (b"RXNO\x02\x01\x00\x01", ServerRefused, "busy"),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", NotRexecServer, "it speaks SSH"),
        (b"HTTP/1.0 200 OK\r\n\r\n", NotRexecServer, "it speaks HTTP"),
    ],
)
def test_client_recognises_the_reply_as_soon_as_it_can(
    make_pair: Any, reply: bytes, error: type[Exception], words: str
) -> None:
    p = make_pair()
    p.client.initiate()
    p.client.data_to_send()
    decisive = 8 if error is ServerRefused else (4 if reply.startswith(b"SSH") else 5)
    for i in range(decisive - 1):
        assert p.client.receive_data(reply[i : i + 1]) == []
        assert p.client.reply_received == i + 1
    with pytest.raises(error, match=words):
        p.client.receive_data(reply[decisive - 1 : decisive])
    assert p.client.data_to_send() == b""  # no AUTH, nothing


def test_client_refused_for_its_suite(make_pair: Any) -> None:
    from rexec.protocol.noise import Suite

    p = make_pair(Suite.AESGCM, suites=(Suite.CHACHAPOLY,))
    p.client.initiate()
    with pytest.raises(RemoteProtocolError):
        p.c2s()
    with pytest.raises(ServerRefused, match=r"cipher suite AESGCM is not allowed$"):
        p.s2c()


def test_refuse_only_before_message_2(make_pair: Any) -> None:
    p = make_pair()
    assert p.server.refuse(RefusalCode.BUSY, 1)
    assert not p.server.refuse(RefusalCode.BUSY, 1)  # one notice
    assert p.server.data_to_send() == b"RXNO\x02\x01\x00\x01"
    with pytest.raises(LocalProtocolError, match="refused"):  # nothing more is read
        p.server.receive_data(b"RXEC")
    q = make_pair()
    q.client.initiate()
    q.c2s()  # message 2 is queued: too late for a notice
    assert not q.server.refuse(RefusalCode.SHUTTING_DOWN)


# ---- the server's receive buffer before AUTH ---------------------------------------------


def _buffer_size(server: ServerConnection) -> int:
    return len(server._buf._buf)


def test_preauth_bytes_buy_no_buffer() -> None:
    """`RXEC` read as a frame length (1.38 GB) once grew the buffer to a MiB."""
    tok = generate_token()
    server = ServerConnection({tok.key_id: tok.secret}.get, INFO)
    for chunk in (b"RXEC\x02", b"\x01\x00\x00", bytes(8)):
        with server.get_buffer() as view:
            assert len(view) <= PREAUTH_RECV
            view[: len(chunk)] = chunk
        server.buffer_updated(len(chunk))
    assert _buffer_size(server) == PREAUTH_RECV <= 16 * 1024


def test_frames_before_auth_are_length_checked_against_the_small_buffer(make_pair: Any) -> None:
    p = make_pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    p.client.data_to_send()  # the real AUTH, dropped
    with pytest.raises(
        RemoteProtocolError,
        match=f"frame length 262168 exceeds the maximum of {PREAUTH_RECV - 4} bytes",
    ):
        p.server.receive_data(LENGTH.pack(262168))
    assert _buffer_size(p.server) == PREAUTH_RECV


def test_after_auth_the_buffer_grows_for_big_frames(make_pair: Any) -> None:
    p = make_pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    p.client.send_exec(["echo", "x" * 200_000])  # pipelined behind AUTH: 200 KB of argv
    wire = p.client.data_to_send()
    events: list[object] = []
    while wire:
        with p.server.get_buffer() as view:
            n = min(len(view), len(wire))
            view[:n] = wire[:n]
        wire = wire[n:]
        events += p.server.buffer_updated(n)
    assert p.server.authenticated
    assert [type(e).__name__ for e in events] == ["Authenticated", "ExecReceived"]
    assert _buffer_size(p.server) > PREAUTH_RECV


def test_protocol_doc_specifies_the_notice() -> None:
    """docs/PROTOCOL.md 6.6 gives the layout, every reason code and example bytes."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("### 6.6 The refusal notice") : doc.index("## 7. ")]
    assert "`struct` format: `>4sBBH`." in section
    for code in RefusalCode:
        assert f"| {code.value:<6} | {code.name:<21} |" in section, code
    for hex_, code, retry in (("52584e4f02010001", 1, 1), ("52584e4f0202003c", 2, 60)):
        spaced = " ".join(hex_[i : i + 2] for i in range(0, 16, 2))
        assert f"`{spaced}`" in section
        assert encode_notice(RefusalCode(code), retry, version=VERSION) == bytes.fromhex(hex_)
