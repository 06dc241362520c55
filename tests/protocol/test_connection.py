"""ClientConnection and ServerConnection against each other, and against a hostile peer.

Every rule of docs/PROTOCOL.md that the state machines enforce has a test here that breaks
it and checks the exact error type, its key words, that nothing was sent in reply where
the protocol says so, and that the connection stays poisoned afterwards.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from rexec.errors import (
    AuthFailed,
    DecryptError,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from rexec.protocol.client import ClientConnection
from rexec.protocol.connection import Channel, Connection
from rexec.protocol.events import (
    Authenticated,
    CloseReceived,
    ErrorReceived,
    Event,
    ExecReceived,
    ExecRejected,
    ExitReceived,
    HandshakeComplete,
    OutputReceived,
    PongReceived,
    SignalReceived,
    StdinClosed,
    StdinReceived,
    WindowChanged,
)
from rexec.protocol.frames import (
    HELLO_LEN,
    INNER,
    LENGTH,
    MAX_CHANNEL,
    MAX_PAYLOAD,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    FrameType,
)
from rexec.protocol.messages import OUTPUT_WINDOW as W
from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.models import parse_exec_request
from rexec.protocol.noise import MAX_NONCE, CipherState, Suite
from rexec.protocol.notice import HelloRefused
from rexec.protocol.server import ServerConnection
from rexec.protocol.states import ChannelState
from rexec.protocol.token import Token, generate_token

INFO = ServerInfo(
    server="rexec test", user="tester", host="testhost", max_payload=262144, max_channels=64
)
SUITES = list(Suite)

# ---- helpers -----------------------------------------------------------------------------


class Pair:
    """A client and a server wired in memory (like conftest's, plus suite choice)."""

    def __init__(self, suite: Suite = Suite.AESGCM, token: Token | None = None) -> None:
        self.token = token or generate_token()
        self.client = ClientConnection(self.token, suite)
        self.server = ServerConnection({self.token.key_id: self.token.secret}.get, INFO)

    def c2s(self) -> list[Event]:
        return self.server.receive_data(self.client.data_to_send())

    def s2c(self) -> list[Event]:
        return self.client.receive_data(self.server.data_to_send())

    def handshake(self) -> None:
        self.client.initiate()
        assert self.c2s() == []
        events = self.s2c()
        assert len(events) == 1 and isinstance(events[0], HandshakeComplete)
        assert self.c2s() == [Authenticated(self.token.key_id)]

    def exec_(self, command: str | list[str] = "true", *, stdin: bool = False) -> int:
        ch = self.client.send_exec(command, stdin=stdin)
        events = self.c2s()
        assert len(events) == 1 and isinstance(events[0], ExecReceived)
        assert events[0].channel == ch
        return ch


def ready(suite: Suite = Suite.AESGCM) -> Pair:
    p = Pair(suite)
    p.handshake()
    return p


def seal(
    sender: Connection, ftype: int, channel: int = 0, payload: bytes = b"", **kw: int
) -> bytes:
    """A correctly encrypted frame with any inner header, from `sender`'s next nonce."""
    assert sender._send is not None
    assert not sender._out, "drain the sender first: wire order must match nonce order"
    inner = INNER.pack(ftype, kw.get("flags", 0), kw.get("reserved", 0), channel)
    ct = sender._send.encrypt(b"", inner + payload)
    return LENGTH.pack(len(ct)) + ct


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def expect(conn: Connection, data: bytes, exc_type: type[Exception], *words: str) -> ProtocolError:
    """receive_data(data) raises exactly exc_type naming `words`, and poisons `conn`."""
    with pytest.raises(exc_type) as info:
        conn.receive_data(data)
    exc = info.value
    assert type(exc) is exc_type, f"{type(exc).__name__}: {exc}"
    for word in words:
        assert word in str(exc), f"{word!r} not in {exc}"
    assert isinstance(exc, ProtocolError)
    for more in (b"", b"\x00" * 64):
        with pytest.raises(exc_type) as again:
            conn.receive_data(more)
        assert again.value is exc
    return exc


def frames_of(stream: bytes) -> list[bytes]:
    """Split a stream of frames (no HELLO) into whole frames, header included."""
    out, off = [], 0
    while off < len(stream):
        (n,) = LENGTH.unpack_from(stream, off)
        out.append(stream[off : off + 4 + n])
        off += 4 + n
    assert off == len(stream)
    return out


# ---- handshake: wrong token, tampered HELLO and handshake messages -----------------------


@pytest.mark.parametrize("suite", SUITES)
def test_wrong_secret_same_key_id_fails_silently(suite: Suite) -> None:
    good = generate_token()
    bad = Token(good.key_id, generate_token().secret)
    client = ClientConnection(bad, suite)
    server = ServerConnection({good.key_id: good.secret}.get, INFO)
    client.initiate()
    expect(server, client.data_to_send(), AuthFailed, "authentication failed", "token")
    assert server.data_to_send() == b""
    assert not server.handshake_done and not server.authenticated


@pytest.mark.parametrize("suite", SUITES)
def test_unknown_key_id_fails_exactly_like_a_wrong_secret(suite: Suite) -> None:
    good = generate_token()
    stranger = generate_token()
    looked_up: list[bytes] = []

    def lookup(key_id: bytes) -> bytes | None:
        looked_up.append(key_id)
        return {good.key_id: good.secret}.get(key_id)

    client = ClientConnection(stranger, suite)
    server = ServerConnection(lookup, INFO)
    client.initiate()
    exc = expect(server, client.data_to_send(), AuthFailed, "wrong or unknown token")
    assert looked_up == [stranger.key_id]
    assert server.data_to_send() == b""
    # same message as the wrong-secret case: nothing tells which ids exist
    client2 = ClientConnection(Token(good.key_id, stranger.secret), suite)
    server2 = ServerConnection(lookup, INFO)
    client2.initiate()
    exc2 = expect(server2, client2.data_to_send(), AuthFailed)
    assert str(exc) == str(exc2)


def test_suite_not_allowed_by_the_server() -> None:
    tok = generate_token()
    client = ClientConnection(tok, Suite.AESGCM)
    server = ServerConnection({tok.key_id: tok.secret}.get, INFO, suites=(Suite.CHACHAPOLY,))
    client.initiate()
    exc = expect(server, client.data_to_send(), HelloRefused, "AESGCM is not allowed")
    assert isinstance(exc, RemoteProtocolError)
    assert server.data_to_send() == b"RXNO\x02\x03\x00\x00"  # a notice: suite not allowed


def _hello_flip_expectation(index: int, mask: int) -> tuple[type[Exception], str, bytes]:
    """What a HELLO with byte `index` flipped raises, and what the server sends back: a
    refusal notice for a version or suite it does not take, else nothing at all."""
    if index < 4:
        return RemoteProtocolError, "bad magic", b""
    if index == 4:
        return HelloRefused, "unsupported protocol version", b"RXNO\x02\x05\x00\x00"
    if index == 5:
        if (1 ^ mask) == 2:  # AESGCM -> ChaChaPoly: valid byte, but the prologue differs
            return AuthFailed, "authentication failed", b""
        return HelloRefused, "unknown cipher suite", b"RXNO\x02\x03\x00\x00"
    if index in (6, 7):
        return RemoteProtocolError, "reserved field must be zero", b""
    return AuthFailed, "authentication failed", b""  # key id


@pytest.mark.parametrize("any_key", [False, True], ids=["lookup-by-id", "lookup-any-id"])
def test_tampered_hello_every_byte(any_key: bool) -> None:
    """Each HELLO byte is checked or authenticated as the Noise prologue.

    With `lookup-any-id` the server finds the right secret whatever the key id says, so a
    flipped key id fails only because the prologue differs from what the client hashed.
    """
    for index in range(HELLO_LEN):
        for mask in (0x01, 0x03, 0x80, 0xFF):
            tok = generate_token()
            client = ClientConnection(tok, Suite.AESGCM)
            keys = {tok.key_id: tok.secret}
            lookup = (lambda _k, t=tok: t.secret) if any_key else keys.get
            server = ServerConnection(lookup, INFO)
            client.initiate()
            wire = client.data_to_send()
            exc_type, words, reply = _hello_flip_expectation(index, mask)
            expect(server, flip(wire, index, mask), exc_type, words)
            assert server.data_to_send() == reply, (index, mask)


@pytest.mark.parametrize("suite", SUITES)
def test_tampered_message_1_every_byte(suite: Suite) -> None:
    tok = generate_token()
    for index in range(HELLO_LEN, HELLO_LEN + 4 + 48):
        client = ClientConnection(tok, suite)
        server = ServerConnection({tok.key_id: tok.secret}.get, INFO)
        client.initiate()
        wire = client.data_to_send()
        assert len(wire) == HELLO_LEN + 4 + 48
        if index < HELLO_LEN + 4:  # the length header: 48 is the only acceptable length
            expect(server, flip(wire, index), RemoteProtocolError, "handshake message 1 length")
        else:
            expect(server, flip(wire, index), AuthFailed, "wrong or unknown token")
        assert server.data_to_send() == b""


def test_message_1_cut_short_is_truncation_not_success() -> None:
    p = Pair()
    p.client.initiate()
    wire = p.client.data_to_send()
    for cut in (0, 1, HELLO_LEN - 1, HELLO_LEN, HELLO_LEN + 3, len(wire) - 1):
        server = ServerConnection({p.token.key_id: p.token.secret}.get, INFO)
        assert server.receive_data(wire[:cut]) == []
        assert server.data_to_send() == b""
        with pytest.raises(TruncatedError, match="before the handshake finished"):
            server.receive_eof()


C_EPH = bytes(range(1, 33))
S_EPH = bytes(range(101, 133))


def _msg1(tok: Token, suite: Suite) -> bytes:
    client = ClientConnection(tok, suite, ephemeral=C_EPH)
    client.initiate()
    return client.data_to_send()


@pytest.mark.parametrize("suite", SUITES)
def test_tampered_message_2_every_byte(suite: Suite) -> None:
    tok = generate_token()

    def fresh_client() -> ClientConnection:
        client = ClientConnection(tok, suite, ephemeral=C_EPH)
        client.initiate()
        client.data_to_send()
        return client

    server = ServerConnection({tok.key_id: tok.secret}.get, INFO, ephemeral=S_EPH)
    server.receive_data(_msg1(tok, suite))
    msg2 = server.data_to_send()
    (n,) = LENGTH.unpack_from(msg2)
    assert len(msg2) == 4 + n
    assert fresh_client().receive_data(msg2) == [HandshakeComplete(INFO)]  # untampered: fine
    for index in range(len(msg2)):
        for mask in (0x01, 0x80):
            client = fresh_client()
            bad = flip(msg2, index, mask)
            (n2,) = LENGTH.unpack_from(bad)
            if index >= 4:
                expect(client, bad, AuthFailed, "server failed to prove it holds the token")
            elif n2 > 32 + 4096 + 16:
                expect(client, bad, RemoteProtocolError, "handshake message length", "exceeds")
            elif n2 < 48:
                expect(client, bad, RemoteProtocolError, "handshake message length", "below")
            elif n2 < n:
                expect(client, bad, AuthFailed, "server failed to prove it holds the token")
            else:
                assert client.receive_data(bad) == []  # waits for a longer message
                with pytest.raises(TruncatedError, match="before the handshake finished"):
                    client.receive_eof()
            assert client.data_to_send() == b""  # no AUTH, nothing
            assert not client.handshake_done and client.server_info is None


def test_message_2_with_a_low_order_point_is_rejected() -> None:
    p = Pair()
    p.client.initiate()
    p.c2s()
    msg2 = bytearray(p.server.data_to_send())
    msg2[4 : 4 + 32] = bytes(32)  # the all-zero point: DH output would be all zeros
    expect(p.client, bytes(msg2), RemoteProtocolError, "invalid ephemeral key")
    assert p.client.data_to_send() == b""


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d.update(admin=True), "unknown fields: admin"),
        (lambda d: d.pop("max_channels"), "lacks fields: max_channels"),
        (lambda d: d.update(max_payload="big"), "'max_payload' has the wrong type"),
        (lambda d: d.update(protocol="rexec/9"), "not rexec/2"),
    ],
)
def test_bad_server_info_is_a_protocol_error_at_the_client(
    mutate: Callable[[dict[str, Any]], object], words: str
) -> None:
    import json

    p = Pair()
    data = json.loads(INFO.to_json())
    mutate(data)
    p.server._info = json.dumps(data).encode()
    p.client.initiate()
    p.c2s()
    expect(p.client, p.server.data_to_send(), RemoteProtocolError, words)
    assert p.client.data_to_send() == b""  # no AUTH for a server we cannot understand
    assert p.client.server_info is None


# ---- AUTH --------------------------------------------------------------------------------


def _after_message_2(suite: Suite = Suite.AESGCM) -> Pair:
    """Handshake done at both ends, the client's AUTH dropped and its nonce rewound."""
    p = Pair(suite)
    p.client.initiate()
    p.c2s()
    p.s2c()
    assert p.client.data_to_send()  # the AUTH frame
    assert p.client._send is not None
    p.client._send.n = 0
    return p


@pytest.mark.parametrize(
    "ftype",
    [t for t in FrameType if t is not FrameType.AUTH],
    ids=lambda t: t.name,
)
def test_nothing_but_auth_before_auth(ftype: FrameType) -> None:
    p = _after_message_2()
    expect(
        p.server, seal(p.client, ftype, 0), RemoteProtocolError, f"{ftype.name} frame before AUTH"
    )
    assert p.server.data_to_send() == b""
    assert not p.server.authenticated


def test_exec_pipelined_instead_of_auth_is_refused() -> None:
    p = _after_message_2()
    p.client.send_exec(["id"])  # a well-formed EXEC under the right key, but no AUTH first
    expect(p.server, p.client.data_to_send(), RemoteProtocolError, "EXEC frame before AUTH")


@pytest.mark.parametrize("suite", SUITES)
def test_bad_auth_proof(suite: Suite) -> None:
    p = _after_message_2(suite)
    assert p.client.handshake_hash is not None
    expect(p.server, seal(p.client, FrameType.AUTH, 0, bytes(32)), AuthFailed, "bad AUTH proof")
    assert not p.server.authenticated


def test_auth_proof_from_another_session_is_refused() -> None:
    old = ready()
    from rexec.protocol.messages import auth_proof

    assert old.client.handshake_hash is not None
    stale = auth_proof(old.token.secret, old.client.handshake_hash)
    new = Pair(Suite.AESGCM, old.token)
    new.client.initiate()
    new.c2s()
    new.s2c()
    new.client.data_to_send()
    assert new.client._send is not None
    new.client._send.n = 0
    expect(new.server, seal(new.client, FrameType.AUTH, 0, stale), AuthFailed, "bad AUTH proof")


@pytest.mark.parametrize(
    ("channel", "payload"), [(0, bytes(31)), (0, bytes(33)), (0, b""), (1, bytes(32))]
)
def test_malformed_auth(channel: int, payload: bytes) -> None:
    p = _after_message_2()
    expect(
        p.server,
        seal(p.client, FrameType.AUTH, channel, payload),
        RemoteProtocolError,
        "AUTH must be on channel 0 with a 32-byte proof",
    )


def test_auth_twice() -> None:
    p = ready()
    expect(
        p.server,
        seal(p.client, FrameType.AUTH, 0, bytes(32)),
        RemoteProtocolError,
        "AUTH sent twice",
    )


# ---- transport: tampering, replay, reordering, reflection ---------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_bit_flips_in_ciphertext(suite: Suite, direction: str) -> None:
    n_frame = None
    for index in range(4, 4 + 8 + 5 + 16):
        for mask in (0x01, 0x80):
            p = ready(suite)
            ch = p.exec_(stdin=True)
            if direction == "c2s":
                p.client.send_stdin(ch, b"hello")
                frame, recv = p.client.data_to_send(), p.server
            else:
                p.server.send_output(ch, 1, b"hello")
                frame, recv = p.server.data_to_send(), p.client
            n_frame = len(frame)
            assert recv._recv is not None
            before = recv._recv.n
            expect(recv, flip(frame, index, mask), DecryptError, "failed authentication")
            assert recv._recv.n == before
    assert n_frame == 4 + 8 + 5 + 16


@pytest.mark.parametrize("bit", range(32))
def test_bit_flips_in_the_length_header(bit: int) -> None:
    p = ready()
    ch = p.exec_(stdin=True)
    p.client.send_stdin(ch, b"x" * 9)
    frame = p.client.data_to_send()
    (n,) = LENGTH.unpack_from(frame)
    bad = flip(frame, bit // 8, 1 << (bit % 8))
    (n2,) = LENGTH.unpack_from(bad)
    if n2 > MAX_TRANSPORT_BODY:
        # the error comes from the 4 header bytes alone
        expect(p.server, bad[:4], RemoteProtocolError, f"frame length {n2} exceeds")
    elif n2 < MIN_TRANSPORT_BODY:
        expect(p.server, bad[:4], RemoteProtocolError, f"frame length {n2} is below")
    elif n2 < n:
        expect(p.server, bad, DecryptError, "failed authentication")
    else:
        assert p.server.receive_data(bad) == []  # waits for the rest of a longer frame
        with pytest.raises(TruncatedError, match="without CLOSE"):
            p.server.receive_eof()


def _three_stdin_frames(p: Pair) -> tuple[int, list[bytes]]:
    ch = p.exec_(stdin=True)
    frames = []
    for data in (b"one", b"two", b"three"):
        p.client.send_stdin(ch, data)
        frames.append(p.client.data_to_send())
    return ch, frames


def test_replayed_frame() -> None:
    p = ready()
    ch, (f1, _f2, _f3) = _three_stdin_frames(p)
    assert p.server.receive_data(f1) == [StdinReceived(ch, b"one")]
    expect(p.server, f1, DecryptError, "replayed")


def test_duplicated_frame_in_one_feed() -> None:
    p = ready()
    _ch, (f1, _f2, _f3) = _three_stdin_frames(p)
    expect(p.server, f1 + f1, DecryptError)


def test_reordered_frames() -> None:
    p = ready()
    _ch, (f1, f2, _f3) = _three_stdin_frames(p)
    expect(p.server, f2 + f1, DecryptError, "reordered")


def test_dropped_frame() -> None:
    p = ready()
    ch, (f1, _f2, f3) = _three_stdin_frames(p)
    assert p.server.receive_data(f1) == [StdinReceived(ch, b"one")]
    expect(p.server, f3, DecryptError)


def test_replayed_auth_frame() -> None:
    p = Pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    auth = p.client.data_to_send()
    assert p.server.receive_data(auth) == [Authenticated(p.token.key_id)]
    expect(p.server, auth, DecryptError)


def test_frames_from_another_session() -> None:
    tok = generate_token()
    a, b = Pair(token=tok), Pair(token=tok)
    a.handshake()
    b.handshake()
    a.client.send_exec("true")
    expect(b.server, a.client.data_to_send(), DecryptError)
    a.server.send_ping()
    expect(b.client, a.server.data_to_send(), DecryptError)


def test_reflected_frames() -> None:
    p = ready()
    p.server.send_ping(b"echo?")
    expect(p.server, p.server.data_to_send(), DecryptError)
    p = ready()
    p.client.send_exec("true")
    expect(p.client, p.client.data_to_send(), DecryptError)


def test_decrypt_failure_leaves_the_cipherstate_counter() -> None:
    key = bytes(range(32))
    for suite in SUITES:
        send, recv = CipherState(suite, key), CipherState(suite, key)
        good = [send.encrypt(b"", bytes([i]) * 10) for i in range(3)]
        with pytest.raises(DecryptError, match="failed authentication"):
            recv.decrypt(b"", flip(good[0], 3))
        assert recv.n == 0
        with pytest.raises(DecryptError, match="shorter than its authentication tag"):
            recv.decrypt(b"", good[0][:15])
        assert recv.n == 0
        with pytest.raises(DecryptError):
            recv.decrypt(b"", good[1])  # the next nonce's frame does not fit nonce 0
        assert recv.n == 0
        assert recv.decrypt(b"", good[0]) == b"\x00" * 10
        assert recv.n == 1
        assert recv.decrypt(b"", good[1]) == b"\x01" * 10
        with pytest.raises(DecryptError):
            recv.decrypt(b"", good[1])  # replay
        assert recv.decrypt(b"", good[2]) == b"\x02" * 10


def test_connection_poisoned_after_a_tampered_frame() -> None:
    p = ready()
    ch, (f1, f2, _f3) = _three_stdin_frames(p)
    assert p.server._recv is not None
    n = p.server._recv.n
    exc = expect(p.server, flip(f1, 10), DecryptError)
    assert p.server._recv.n == n
    with pytest.raises(DecryptError) as again:
        p.server.receive_data(f1)  # even the genuine frame: the connection is dead
    assert again.value is exc
    with pytest.raises(DecryptError) as on_send:
        p.server.send_output(ch, 1, b"x")
    assert on_send.value is exc
    p.server.send_close()  # a no-op on a dead connection
    assert p.server.data_to_send() == b""
    p.server.receive_eof()  # the error was already raised; EOF adds nothing
    with pytest.raises(DecryptError):
        p.server.receive_data(f2)


@pytest.mark.parametrize("suite", SUITES)
def test_nonce_counter_exhaustion(suite: Suite) -> None:
    key = bytes(32)
    send, recv = CipherState(suite, key), CipherState(suite, key)
    send.n = recv.n = MAX_NONCE - 1  # the last usable nonce
    ct = send.encrypt(b"ad", b"last")
    assert recv.decrypt(b"ad", ct) == b"last"
    assert send.n == recv.n == MAX_NONCE == 2**64 - 1
    with pytest.raises(LocalProtocolError, match="nonce counter exhausted"):
        send.encrypt(b"", b"one more")
    assert send.n == MAX_NONCE
    with pytest.raises(RemoteProtocolError, match="exhausted the nonce counter") as info:
        recv.decrypt(b"", ct)
    assert type(info.value) is RemoteProtocolError


def test_nonce_exhaustion_in_a_connection() -> None:
    p = ready()
    assert p.client._send is not None and p.server._recv is not None
    p.client._send.n = MAX_NONCE
    with pytest.raises(LocalProtocolError, match="exhausted"):
        p.client.send_ping()
    assert p.client.data_to_send() == b""
    p.client._send.n = 5
    p.client.send_ping()
    p.server._recv.n = MAX_NONCE
    expect(p.server, p.client.data_to_send(), RemoteProtocolError, "exhausted the nonce counter")


# ---- transport: sizes --------------------------------------------------------------------


def test_max_payload_accepted_one_more_refused_at_the_header() -> None:
    p = ready()
    ch = p.exec_("cat", stdin=True)
    data = bytes(range(256)) * 1024
    assert len(data) == MAX_PAYLOAD == 256 * 1024
    p.client.send_stdin(ch, data)
    wire = p.client.data_to_send()
    assert len(wire) == 4 + MAX_TRANSPORT_BODY  # one frame, exactly the maximum
    assert p.server.receive_data(wire) == [StdinReceived(ch, data)]

    too_big = seal(p.client, FrameType.STDIN, ch, data + b"!")
    assert LENGTH.unpack_from(too_big) == (MAX_TRANSPORT_BODY + 1,)
    expect(p.server, too_big[:4], RemoteProtocolError, "exceeds the maximum of 262168 bytes")
    assert len(p.server._buf) <= 4  # no body byte was ever asked for


def test_max_payload_server_to_client() -> None:
    p = ready()
    ch = p.exec_("cat")
    data = b"\xab" * MAX_PAYLOAD
    p.server.send_output(ch, 2, data)
    assert p.s2c() == [OutputReceived(ch, 2, data)]
    too_big = seal(p.server, FrameType.STDOUT, ch, data + b"!")
    expect(p.client, too_big[:4], RemoteProtocolError, "exceeds the maximum")


def test_oversized_payloads_are_refused_or_split_at_the_sender() -> None:
    p = ready()
    ch = p.exec_("cat", stdin=True)
    with pytest.raises(LocalProtocolError, match="STDIN payload of 262145 bytes is too big"):
        p.client._queue_frame(FrameType.STDIN, ch, bytes(MAX_PAYLOAD + 1))
    big = bytes(600 * 1024)
    p.client.send_stdin(ch, big)
    wire = p.client.data_to_send()
    assert [len(f) - 4 - 24 for f in frames_of(wire)] == [MAX_PAYLOAD, MAX_PAYLOAD, 88 * 1024]
    events = p.server.receive_data(wire)
    assert b"".join(e.data for e in events if isinstance(e, StdinReceived)) == big
    p.server.send_output(ch, 1, big)
    assert len(frames_of(p.server.data_to_send())) == 3


def test_frame_shorter_than_inner_header_and_tag() -> None:
    p = ready()
    expect(p.server, LENGTH.pack(23) + bytes(23), RemoteProtocolError, "below the minimum of 24")


# ---- transport: inner header rules -------------------------------------------------------


@pytest.mark.parametrize("ftype", [0, 16, 17, 128, 255])
@pytest.mark.parametrize("side", ["server", "client"])
def test_unknown_frame_type(ftype: int, side: str) -> None:
    p = ready()
    sender, recv = (p.client, p.server) if side == "server" else (p.server, p.client)
    expect(recv, seal(sender, ftype, 0), RemoteProtocolError, f"unknown frame type {ftype}")


@pytest.mark.parametrize(
    ("flags", "reserved"), [(1, 0), (0x80, 0), (0, 1), (0, 0x8000), (0xFF, 0xFFFF)]
)
@pytest.mark.parametrize("side", ["server", "client"])
def test_nonzero_flags_or_reserved(flags: int, reserved: int, side: str) -> None:
    p = ready()
    sender, recv = (p.client, p.server) if side == "server" else (p.server, p.client)
    frame = seal(sender, FrameType.PING, 0, b"", flags=flags, reserved=reserved)
    expect(recv, frame, RemoteProtocolError, "flags and reserved bits must be zero")


@pytest.mark.parametrize(
    "ftype", [FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT], ids=lambda t: t.name
)
def test_client_may_not_send_server_frames(ftype: FrameType) -> None:
    p = ready()
    ch = p.exec_()
    payload = ExitStatus(0).pack() if ftype is FrameType.EXIT else b"x"
    expect(
        p.server,
        seal(p.client, ftype, ch, payload),
        RemoteProtocolError,
        f"a client may not send {ftype.name}",
    )


@pytest.mark.parametrize(
    "ftype",
    [
        FrameType.AUTH,
        FrameType.EXEC,
        FrameType.STDIN,
        FrameType.STDIN_EOF,
        FrameType.SIGNAL,
        FrameType.WINDOW,
    ],
    ids=lambda t: t.name,
)
def test_server_may_not_send_client_frames(ftype: FrameType) -> None:
    p = ready()
    ch = p.exec_()
    expect(
        p.client,
        seal(p.server, ftype, ch, b""),
        RemoteProtocolError,
        f"a server may not send {ftype.name}",
    )


# ---- channels ----------------------------------------------------------------------------


def test_exec_channel_numbers_must_increase() -> None:
    body = b'{"command":"true","window":0}'
    for ch, words in ((5, "EXEC reuses channel 5"), (3, "EXEC reuses channel 3")):
        q = ready()
        assert q.server.receive_data(seal(q.client, FrameType.EXEC, 5, body)) == [
            ExecReceived(5, _req("true"))
        ]
        expect(q.server, seal(q.client, FrameType.EXEC, ch, body), RemoteProtocolError, words)
    q = ready()
    expect(
        q.server,
        seal(q.client, FrameType.EXEC, 0, body),
        RemoteProtocolError,
        "channel 0 is not a command channel",
    )


def _req(command: str) -> Any:
    return parse_exec_request(f'{{"command":"{command}","window":0}}'.encode())


def test_exec_gaps_and_the_largest_channel_are_fine() -> None:
    p = ready()
    body = b'{"command":"true","window":0}'
    assert p.server.receive_data(seal(p.client, FrameType.EXEC, 7, body)) == [
        ExecReceived(7, _req("true"))
    ]
    assert p.server.receive_data(seal(p.client, FrameType.EXEC, MAX_CHANNEL, body)) == [
        ExecReceived(MAX_CHANNEL, _req("true"))
    ]
    assert p.server.last_channel == MAX_CHANNEL
    c = ready().client
    c.last_channel = MAX_CHANNEL
    with pytest.raises(LocalProtocolError, match="channel numbers exhausted"):
        c.send_exec("true")


def test_client_channels_count_up() -> None:
    p = ready()
    assert [p.exec_() for _ in range(3)] == [1, 2, 3]


def test_stdin_for_a_never_opened_channel() -> None:
    p = ready()
    p.exec_(stdin=True)
    expect(
        p.server,
        seal(p.client, FrameType.STDIN, 2, b"x"),
        RemoteProtocolError,
        "channel 2, which was never opened",
    )


@pytest.mark.parametrize(
    ("ftype", "payload"),
    [
        (FrameType.STDIN, b"late"),
        (FrameType.STDIN_EOF, b""),
        (FrameType.SIGNAL, b"\x00\x00\x00\x0f"),
        (FrameType.WINDOW, b"\x00\x18\x00\x50"),
    ],
    ids=lambda v: getattr(v, "name", "payload"),
)
def test_late_frames_for_a_closed_channel_are_dropped(ftype: FrameType, payload: bytes) -> None:
    p = ready()
    ch = p.exec_("cat", stdin=True)
    p.server.send_exit(ch, ExitStatus(0))
    assert p.s2c() == [ExitReceived(ch, ExitStatus(0))]
    # the client raced the EXIT: its frame was already on the wire
    assert p.server.receive_data(seal(p.client, ftype, ch, payload)) == []
    ch2 = p.exec_("true")  # and the connection goes on
    assert ch2 == ch + 1


def test_signal_and_window_for_never_opened_channel() -> None:
    for ftype, payload in ((FrameType.SIGNAL, b"\x00\x00\x00\x0f"), (FrameType.WINDOW, bytes(4))):
        p = ready()
        expect(p.server, seal(p.client, ftype, 1, payload), RemoteProtocolError, "never opened")


def test_signal_and_window_events() -> None:
    p = ready()
    ch = p.exec_("sleep 9")
    p.client.send_signal(ch, 15)
    p.client.send_window(ch, 24, 80)
    assert p.c2s() == [SignalReceived(ch, 15), WindowChanged(ch, 24, 80)]
    expect(
        p.server,
        seal(p.client, FrameType.SIGNAL, ch, b"\x00\x00\x00\x00"),
        RemoteProtocolError,
        "SIGNAL number 0",
    )


def test_stdin_after_stdin_eof() -> None:
    p = ready()
    ch = p.exec_("cat", stdin=True)
    p.client.send_stdin(ch, b"abc")
    p.client.send_stdin_eof(ch)
    assert p.c2s() == [StdinReceived(ch, b"abc"), StdinClosed(ch)]
    with pytest.raises(LocalProtocolError, match="stdin of channel 1 is closed"):
        p.client.send_stdin(ch, b"more")
    p.client.send_stdin_eof(ch)  # idempotent at the client
    assert p.client.data_to_send() == b""
    expect(
        p.server,
        seal(p.client, FrameType.STDIN, ch, b"more"),
        RemoteProtocolError,
        "STDIN on channel 1 whose stdin is closed",
    )
    q = ready()
    ch = q.exec_("cat", stdin=True)
    q.client.send_stdin_eof(ch)
    q.c2s()
    expect(
        q.server,
        seal(q.client, FrameType.STDIN_EOF, ch),
        RemoteProtocolError,
        "STDIN_EOF on channel 1 whose stdin is closed",
    )


def test_stdin_when_not_requested() -> None:
    p = ready()
    ch = p.exec_("true", stdin=False)
    with pytest.raises(LocalProtocolError, match="closed or was not requested"):
        p.client.send_stdin(ch, b"x")
    expect(
        p.server,
        seal(p.client, FrameType.STDIN, ch, b"x"),
        RemoteProtocolError,
        "whose stdin is closed",
    )


def test_stdin_eof_must_be_empty() -> None:
    p = ready()
    ch = p.exec_("cat", stdin=True)
    expect(
        p.server,
        seal(p.client, FrameType.STDIN_EOF, ch, b"x"),
        RemoteProtocolError,
        "STDIN_EOF must be empty",
    )


def test_exit_is_the_last_frame_of_a_channel() -> None:
    p = ready()
    ch = p.exec_()
    p.server.send_output(ch, 1, b"out")
    p.server.send_exit(ch, ExitStatus(3, duration=0.25))
    assert p.s2c() == [
        OutputReceived(ch, 1, b"out"),
        ExitReceived(ch, ExitStatus(3, duration=0.25)),
    ]
    assert ch not in p.client.channels and ch not in p.server.channels
    with pytest.raises(LocalProtocolError, match="cannot send output: channel 1 is not open"):
        p.server.send_output(ch, 1, b"late")
    with pytest.raises(LocalProtocolError, match="cannot send EXIT: channel 1 is not open"):
        p.server.send_exit(ch, ExitStatus(0))
    with pytest.raises(LocalProtocolError, match="cannot send ERROR: channel 1 is not open"):
        p.server.send_channel_error(ch, ErrorCode.INTERNAL, "x")
    assert p.server.data_to_send() == b""
    with pytest.raises(LocalProtocolError, match="cannot send STDIN: channel 1 is not open"):
        p.client.send_stdin(ch, b"x")


@pytest.mark.parametrize(
    ("ftype", "payload", "words"),
    [
        (FrameType.STDOUT, b"late", "STDOUT for channel 1, which is not open"),
        (FrameType.STDERR, b"late", "STDERR for channel 1, which is not open"),
        (FrameType.EXIT, ExitStatus(0).pack(), "EXIT for channel 1, which is not open"),
        (FrameType.ERROR, b"\x00\x01late", "ERROR for channel 1, which is not open"),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_client_refuses_frames_after_exit(ftype: FrameType, payload: bytes, words: str) -> None:
    p = ready()
    ch = p.exec_()
    p.server.send_exit(ch, ExitStatus(0))
    p.s2c()
    expect(p.client, seal(p.server, ftype, ch, payload), RemoteProtocolError, words)


def test_client_refuses_output_for_a_never_opened_channel() -> None:
    p = ready()
    expect(
        p.client,
        seal(p.server, FrameType.STDOUT, 9, b"x"),
        RemoteProtocolError,
        "channel 9, which is not open",
    )


def test_client_refuses_a_bad_exit_payload() -> None:
    p = ready()
    ch = p.exec_()
    expect(
        p.client,
        seal(p.server, FrameType.EXIT, ch, bytes(15)),
        RemoteProtocolError,
        "EXIT payload must be 16 bytes",
    )


# ---- EXEC validation ---------------------------------------------------------------------


def _send_raw_exec(p: Pair, body: bytes) -> int:
    ch = p.client.last_channel + 1
    p.client._queue_frame(FrameType.EXEC, ch, body)
    p.client.last_channel = ch
    p.client._channels[ch] = Channel(ch, ChannelState.STDIN_CLOSED, 0, 1 << 20)
    return ch


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"window":1,"command":"x","shell":true}', "shell: Extra inputs are not permitted"),
        (b'{"window":1,"command":"x","argv":["x"]}', "exactly one of 'argv' or 'command'"),
        (b'{"window":1}', "exactly one of 'argv' or 'command'"),
        (b'{"window":1,"argv":[]}', "'argv' must not be empty"),
        (b'{"window":1,"command":"a\\u0000b"}', "NUL bytes are not allowed"),
        (b'{"window":1,"argv":["ls","\\u0000"]}', "NUL bytes are not allowed"),
        (b'{"window":1,"command":"x","cwd":"/tmp\\u0000"}', "NUL bytes are not allowed"),
        (b'{"window":1,"command":"x","timeout":-1}', "'timeout' must be a positive number"),
        (b'{"window":1,"command":"x","timeout":0}', "'timeout' must be a positive number"),
        (b'{"window":1,"command":"x","timeout":"5"}', "timeout: Input should be a valid number"),
        (b'{"window":1,"command":"x","timeout":true}', "timeout: Input should be a valid number"),
        (b'{"window":1,"argv":"ls"}', "argv: Input should be a valid array"),
        (b'{"window":1,"command":["ls"]}', "command: Input should be a valid string"),
        (b'{"window":1,"command":"x","stdin":1}', "stdin: Input should be a valid boolean"),
        (b'{"window":1,"command":"x","env":["A=1"]}', "env: Input should be an object"),
        (b'{"window":1,"command":"x","env":{"A":1}}', "env.A: Input should be a valid string"),
        (b'{"window":1,"command":"x","env":{"A=B":"1"}}', "invalid environment variable"),
        (b"[]", "Input should be an object"),
        (b"not json", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b"\xff\xfe", "Invalid JSON"),
    ],
)
def test_invalid_exec_is_rejected_and_the_connection_lives_on(body: bytes, words: str) -> None:
    p = ready()
    ch = _send_raw_exec(p, body)
    events = p.c2s()
    assert len(events) == 1 and isinstance(events[0], ExecRejected), events
    assert events[0].channel == ch
    assert "invalid EXEC request" in events[0].reason and words in events[0].reason
    # the server answers ERROR + EXIT on that channel, and the connection keeps working
    p.server.send_channel_error(ch, ErrorCode.BAD_REQUEST, events[0].reason)
    p.server.send_exit(ch, ExitStatus(127))
    assert p.s2c() == [
        ErrorReceived(ch, ErrorCode.BAD_REQUEST, events[0].reason),
        ExitReceived(ch, ExitStatus(127)),
    ]
    ch2 = p.exec_(["echo", "ok"])
    assert ch2 == ch + 1
    p.server.send_output(ch2, 1, b"ok\n")
    p.server.send_exit(ch2, ExitStatus(0))
    assert p.s2c() == [OutputReceived(ch2, 1, b"ok\n"), ExitReceived(ch2, ExitStatus(0))]


def test_rejected_exec_channel_number_is_used_up() -> None:
    p = ready()
    ch = _send_raw_exec(p, b"{}")
    assert isinstance(p.c2s()[0], ExecRejected)
    expect(
        p.server,
        seal(p.client, FrameType.EXEC, ch, b'{"command":"x","window":0}'),
        RemoteProtocolError,
        "reuses channel",
    )


# ---- connection-level frames: ERROR, PING/PONG, CLOSE, EOF --------------------------------


def test_error_frames_round_trip() -> None:
    p = ready()
    ch = p.exec_()
    p.server.send_channel_error(ch, ErrorCode.EXEC_FAILED, "no such file: nope")
    p.server.send_error(0, ErrorCode.SHUTDOWN, "server is shutting down")
    assert p.s2c() == [
        ErrorReceived(ch, ErrorCode.EXEC_FAILED, "no such file: nope"),
        ErrorReceived(0, ErrorCode.SHUTDOWN, "server is shutting down"),
    ]
    p.client.send_error(0, ErrorCode.PROTOCOL, "bye ✓")
    assert p.c2s() == [ErrorReceived(0, ErrorCode.PROTOCOL, "bye ✓")]
    p.server.send_error(0, 999, "x" * 2000)  # unknown codes pass; text is capped
    (ev,) = p.s2c()
    assert isinstance(ev, ErrorReceived) and ev.code == 999 and ev.message == "x" * 1024
    with pytest.raises(LocalProtocolError, match="channel 7 is not open"):
        p.server.send_channel_error(7, ErrorCode.INTERNAL, "x")


def test_malformed_error_frames() -> None:
    p = ready()
    expect(
        p.client,
        seal(p.server, FrameType.ERROR, 0, b"\x01"),
        RemoteProtocolError,
        "ERROR payload of 1 bytes is malformed",
    )
    p = ready()
    expect(
        p.client,
        seal(p.server, FrameType.ERROR, 3, b"\x00\x01x"),
        RemoteProtocolError,
        "ERROR for channel 3, which is not open",
    )
    p = ready()
    expect(
        p.server,
        seal(p.client, FrameType.ERROR, 0, bytes(2 + 1025)),
        RemoteProtocolError,
        "malformed",
    )


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(64))])
def test_ping_gets_an_automatic_pong(payload: bytes) -> None:
    p = ready()
    p.client.send_ping(payload)
    assert p.c2s() == []  # PING is answered inside the protocol, not an event
    assert p.s2c() == [PongReceived(payload)]
    p.server.send_ping(payload)
    assert p.s2c() == []
    assert p.c2s() == [PongReceived(payload)]


def test_ping_limits() -> None:
    p = ready()
    with pytest.raises(LocalProtocolError, match="limited to 64 bytes"):
        p.client.send_ping(bytes(65))
    expect(
        p.server,
        seal(p.client, FrameType.PING, 0, bytes(65)),
        RemoteProtocolError,
        "PING must be on channel 0",
    )
    p = ready()
    expect(
        p.server,
        seal(p.client, FrameType.PING, 1, b""),
        RemoteProtocolError,
        "PING must be on channel 0",
    )
    p = ready()
    expect(
        p.client,
        seal(p.server, FrameType.PONG, 0, bytes(65)),
        RemoteProtocolError,
        "PONG must be on channel 0",
    )


def test_no_pong_after_close_sent() -> None:
    p = ready()
    p.server.send_close()
    p.s2c()
    p.client.send_ping(b"late")
    assert p.c2s() == []
    assert p.server.data_to_send() == b""


def test_close_then_eof_is_clean() -> None:
    p = ready()
    ch = p.exec_()
    p.server.send_exit(ch, ExitStatus(0))
    p.server.send_close()
    p.server.send_close()  # idempotent
    assert p.s2c() == [ExitReceived(ch, ExitStatus(0)), CloseReceived()]
    p.client.receive_eof()
    assert p.client.close_received and p.client.eof_received
    with pytest.raises(LocalProtocolError, match="receive_data after receive_eof"):
        p.client.receive_data(b"x")
    p.client.send_close()
    assert p.c2s() == [CloseReceived()]
    p.server.receive_eof()


def test_nothing_may_follow_close() -> None:
    p = ready()
    p.server.send_close()
    p.s2c()
    expect(
        p.client, seal(p.server, FrameType.PING, 0), RemoteProtocolError, "PING frame after CLOSE"
    )
    p = ready()
    ch = p.exec_("cat", stdin=True)
    p.client.send_close()
    p.c2s()
    with pytest.raises(LocalProtocolError, match="cannot send STDIN in state CLOSE_SENT"):
        p.client.send_stdin(ch, b"x")
    expect(
        p.server,
        seal(p.client, FrameType.STDIN, ch, b"x"),
        RemoteProtocolError,
        "STDIN frame after CLOSE",
    )
    p = ready()
    p.client.send_close()
    p.c2s()
    expect(
        p.server, seal(p.client, FrameType.CLOSE, 0), RemoteProtocolError, "CLOSE frame after CLOSE"
    )


def test_close_must_be_empty_on_channel_0() -> None:
    p = ready()
    expect(
        p.client,
        seal(p.server, FrameType.CLOSE, 0, b"x"),
        RemoteProtocolError,
        "CLOSE must be on channel 0 and empty",
    )
    p = ready()
    expect(
        p.server,
        seal(p.client, FrameType.CLOSE, 1),
        RemoteProtocolError,
        "CLOSE must be on channel 0 and empty",
    )


def test_eof_without_close_is_truncation() -> None:
    p = ready()
    p.exec_("sleep 5")
    with pytest.raises(TruncatedError, match=r"without CLOSE \(1 command\(s\) had not ended\)"):
        p.client.receive_eof()
    with pytest.raises(TruncatedError, match="without CLOSE"):
        p.server.receive_eof()
    p = ready()
    with pytest.raises(TruncatedError, match=r"connection closed by the peer without CLOSE$"):
        p.client.receive_eof()


def test_close_before_exit_on_an_open_channel_is_truncation() -> None:
    p = ready()
    done, running = p.exec_(), p.exec_("sleep 9")
    p.server.send_exit(done, ExitStatus(0))
    p.server.send_close()
    assert p.s2c() == [ExitReceived(done, ExitStatus(0)), CloseReceived()]
    with pytest.raises(TruncatedError, match=r"1 command\(s\) still lacking an exit status"):
        p.client.receive_eof()
    assert running in p.client.channels
    # the server side: a client CLOSE with commands still running is a normal hang-up
    p.client.send_close()
    p.c2s()
    p.server.receive_eof()


def test_eof_inside_a_frame_is_truncation() -> None:
    p = ready()
    p.server.send_ping(b"abc")
    ping = p.server.data_to_send()
    for cut in (1, 3, 4, 5, len(ping) - 1):
        q = ready()
        q.server.send_ping(b"abc")
        assert q.client.receive_data(q.server.data_to_send()[:cut]) == []
        with pytest.raises(TruncatedError):
            q.client.receive_eof()
    # even after CLOSE, trailing bytes of a frame are truncation
    p = ready()
    p.server.send_close()
    close = p.server.data_to_send()
    assert p.client.receive_data(close + b"\x00\x00\x00") == [CloseReceived()]
    with pytest.raises(TruncatedError, match=r"inside a frame \(3 bytes\)"):
        p.client.receive_eof()


def test_eof_during_the_handshake_is_truncation() -> None:
    p = Pair()
    p.client.initiate()
    p.c2s()
    with pytest.raises(TruncatedError, match="before the handshake finished"):
        p.client.receive_eof()


def test_api_misuse_is_a_local_error() -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError, match="receive_data before initiate"):
        p.client.receive_data(b"x")
    p = Pair()
    with pytest.raises(LocalProtocolError, match="cannot send EXEC before the handshake"):
        p.client.send_exec("true")
    p.client.initiate()
    with pytest.raises(LocalProtocolError, match="initiate\\(\\) called twice"):
        p.client.initiate()
    with pytest.raises(LocalProtocolError, match="cannot send PING before the handshake"):
        p.server.send_ping()
    p.client.send_close()  # before the handshake: nothing to say, nothing queued
    p.client.data_to_send()
    assert p.client.data_to_send() == b""


# ---- a whole conversation, split at every point -------------------------------------------

SPLIT_TOKEN = Token(b"splitkey", bytes(range(32)))


def _conversation(
    suite: Suite, stdin_sizes: list[int]
) -> tuple[bytes, bytes, int, list[Event], list[Event]]:
    """Run a conversation with fixed ephemerals; return both byte streams and the events.

    Returns (client->server bytes, server->client bytes, length of the server's first
    flight (message 2 and a PING), server events, client events).
    """
    client = ClientConnection(SPLIT_TOKEN, suite, ephemeral=C_EPH)
    server = ServerConnection({SPLIT_TOKEN.key_id: SPLIT_TOKEN.secret}.get, INFO, ephemeral=S_EPH)
    s_events: list[Event] = []
    c_events: list[Event] = []
    c2s, s2c = b"", b""

    def to_server() -> None:
        nonlocal c2s
        data = client.data_to_send()
        c2s += data
        s_events.extend(server.receive_data(data))

    def to_client() -> None:
        nonlocal s2c
        data = server.data_to_send()
        s2c += data
        c_events.extend(client.receive_data(data))

    client.initiate()
    to_server()
    server.send_ping(b"first flight")
    first = server.data_to_send()
    s2c += first
    c_events.extend(client.receive_data(first))
    _open_channels(client)
    rng = random.Random(7)
    for size in stdin_sizes:
        client.send_stdin(1, rng.randbytes(size))
    client.send_stdin_eof(1)
    client.send_ping(b"ping")
    to_server()
    server.send_output(1, 1, b"out" * 100)
    server.send_output(1, 2, b"err")
    server.send_output(2, 1, b"two\n")
    server.send_exit(1, ExitStatus(0, duration=0.5))
    server.send_channel_error(2, ErrorCode.EXEC_FAILED, "boom")
    server.send_exit(2, ExitStatus(None, 9, True, 1.25))
    server.send_close()
    to_client()
    client.send_close()
    to_server()
    server.receive_eof()
    client.receive_eof()
    return c2s, s2c, len(first), s_events, c_events


def _open_channels(client: ClientConnection) -> None:
    assert client.send_exec(["cat"], stdin=True) == 1
    assert client.send_exec("echo two") == 2


def _replay_server(suite: Suite, pieces: list[bytes]) -> tuple[list[Event], bytes]:
    server = ServerConnection({SPLIT_TOKEN.key_id: SPLIT_TOKEN.secret}.get, INFO, ephemeral=S_EPH)
    events: list[Event] = []
    for piece in pieces:
        events += server.receive_data(piece)
    server.receive_eof()
    return events, server.data_to_send()


def _replay_client(suite: Suite, pieces: list[bytes]) -> list[Event]:
    client = ClientConnection(SPLIT_TOKEN, suite, ephemeral=C_EPH)
    client.initiate()
    events: list[Event] = []
    for piece in pieces:
        new = client.receive_data(piece)
        if any(isinstance(e, HandshakeComplete) for e in new):
            _open_channels(client)
        events += new
    client.receive_eof()
    return events


def _client_pieces(s2c: bytes, first: int, k: int) -> list[bytes]:
    """Cut at k, and also where the client opens its channels (it must, to get output)."""
    cuts = sorted({0, k, first, len(s2c)})
    return [s2c[a:b] for a, b in itertools.pairwise(cuts)]


def _check_event_sets(s_events: list[Event], c_events: list[Event], stdin_total: int) -> None:
    """The conversation's events, independently of how its bytes were cut."""
    stdin = [e for e in s_events if isinstance(e, StdinReceived)]
    assert sum(len(e.data) for e in stdin) == stdin_total
    assert all(e.channel == 1 and 0 < len(e.data) <= MAX_PAYLOAD for e in stdin)
    assert s_events == [
        Authenticated(SPLIT_TOKEN.key_id),
        PongReceived(b"first flight"),  # the client's PONG rides right behind its AUTH
        ExecReceived(1, parse_exec_request(b'{"argv":["cat"],"stdin":true,"window":%d}' % W)),
        ExecReceived(2, parse_exec_request(b'{"command":"echo two","window":%d}' % W)),
        *stdin,
        StdinClosed(1),
        CloseReceived(),
    ]
    assert c_events == [
        HandshakeComplete(INFO),
        PongReceived(b"ping"),
        OutputReceived(1, 1, b"out" * 100),
        OutputReceived(1, 2, b"err"),
        OutputReceived(2, 1, b"two\n"),
        ExitReceived(1, ExitStatus(0, duration=0.5)),
        ErrorReceived(2, ErrorCode.EXEC_FAILED, "boom"),
        ExitReceived(2, ExitStatus(None, 9, True, 1.25)),
        CloseReceived(),
    ]


@pytest.mark.parametrize("suite", SUITES)
def test_every_split_point_gives_the_same_events(suite: Suite) -> None:
    sizes = [1, 500, 1500]
    c2s, s2c, first, s_events, c_events = _conversation(suite, sizes)
    assert 2000 < len(c2s) < 4096 and 600 < len(s2c) < 4096
    _check_event_sets(s_events, c_events, sum(sizes))
    # the streams are reproducible: same ephemerals, same bytes
    assert _conversation(suite, sizes)[:2] == (c2s, s2c)

    whole, out = _replay_server(suite, [c2s])
    assert whole == s_events
    assert _replay_server(suite, [bytes([b]) for b in c2s]) == (whole, out)
    for k in range(len(c2s) + 1):
        assert _replay_server(suite, [c2s[:k], c2s[k:]]) == (whole, out), k

    assert _replay_client(suite, _client_pieces(s2c, first, 0)) == c_events
    assert _replay_client(suite, [bytes([b]) for b in s2c]) == c_events
    for k in range(len(s2c) + 1):
        assert _replay_client(suite, _client_pieces(s2c, first, k)) == c_events, k


def test_large_stdin_split_points() -> None:
    suite = Suite.AESGCM
    sizes = [600 * 1024, 10, 70000]
    c2s, _s2c, _first, s_events, c_events = _conversation(suite, sizes)
    frames = frames_of(c2s[HELLO_LEN:])
    big = [f for f in frames if len(f) > MAX_PAYLOAD]
    assert len(big) == 2  # 600 KiB = 256 + 256 + 88 KiB
    _check_event_sets(s_events, c_events, sum(sizes))
    whole, out = _replay_server(suite, [c2s])
    assert whole == s_events
    boundaries, off = [0, HELLO_LEN], HELLO_LEN
    for f in frames:
        off += len(f)
        boundaries.append(off)
    points = {k for b in boundaries for k in range(b - 6, b + 7) if 0 <= k <= len(c2s)}
    rng = random.Random(1)
    points |= {rng.randrange(len(c2s) + 1) for _ in range(60)}
    for k in sorted(points):
        assert _replay_server(suite, [c2s[:k], c2s[k:]]) == (whole, out), k
    for size in (1000, 4093, 65537, 262172):
        pieces = [c2s[i : i + size] for i in range(0, len(c2s), size)]
        assert _replay_server(suite, pieces) == (whole, out), size


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_while_sealing_never_leaves_a_silent_hole(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C's KeyboardInterrupt can land on any line of data_to_send: before a queued frame
    is sealed, it stays queued (everything still arrives, in order, once); after, the peer
    sees a skipped nonce and refuses the stream. A frame taken off the queue and never sent
    while later ones were (a hole in a file being copied) must not happen."""
    p = ready()
    ch = p.exec_("cat", stdin=True)
    for data in (b"A" * 10, b"B" * 10, b"C" * 10):
        p.client.send_stdin(ch, data)
    real = p.client._seal
    calls = 0

    def interrupted(*args: Any) -> bytearray:
        nonlocal calls
        calls += 1
        if calls == 1 and when == "before":
            raise KeyboardInterrupt
        frame = real(*args)
        if calls == 1:
            raise KeyboardInterrupt
        return frame

    monkeypatch.setattr(p.client, "_seal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        p.client.data_to_send()
    wire = p.client.data_to_send()  # what a `finally: flush()` sends after the interrupt
    if when == "before":
        events = p.server.receive_data(wire)
        assert [e.data for e in events if isinstance(e, StdinReceived)] == [
            b"A" * 10,
            b"B" * 10,
            b"C" * 10,
        ]
    else:
        with pytest.raises(ProtocolError):
            p.server.receive_data(wire)
