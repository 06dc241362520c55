"""Hypothesis: hostile bytes only ever raise ProtocolError, and never buffer beyond one frame.

Each test feeds arbitrary (and arbitrarily chunked) bytes into a connection in one phase of
the protocol and checks, after every feed, that the only exceptions are ProtocolError
subclasses (AuthFailed and DecryptError are two), that an error poisons the connection,
and that the receive buffer holds less than one maximal frame of that phase.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexec.errors import ProtocolError, RemoteProtocolError, TokenError, TruncatedError
from rexec.protocol import messages as m
from rexec.protocol.client import ClientConnection
from rexec.protocol.connection import Connection
from rexec.protocol.frames import (
    HELLO_LEN,
    INNER,
    LENGTH,
    MAX_CHANNEL,
    MAX_MSG2_LEN,
    MAX_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY,
    MSG1_LEN,
    FrameType,
    Hello,
)
from rexec.protocol.models import parse_exec_request
from rexec.protocol.noise import Suite
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import Token, parse_token

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOKEN = Token(b"fuzz-key", bytes(range(32)))
INFO = m.ServerInfo(server="fuzz", user="u", host="h", max_payload=262144, max_channels=64)
LENGTHS = [
    0,
    1,
    MIN_TRANSPORT_BODY - 1,
    MIN_TRANSPORT_BODY,
    MIN_TRANSPORT_BODY + 1,
    MSG1_LEN - 1,
    MSG1_LEN,
    MSG1_LEN + 1,
    200,
    MAX_MSG2_LEN,
    MAX_MSG2_LEN + 1,
    MAX_TRANSPORT_BODY,
    MAX_TRANSPORT_BODY + 1,
    2**31,
    2**32 - 1,
]

# ---- strategies --------------------------------------------------------------------------

framed_junk = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(LENGTHS), st.integers(0, 2**32 - 1)),
        st.binary(max_size=300),
    ),
    max_size=5,
).map(lambda items: b"".join(LENGTH.pack(n) + body for n, body in items))

# a header, then up to a maximal frame's worth of filler: a missing length check shows up
# as a buffer that grows past one frame
big_junk = st.tuples(
    st.one_of(st.sampled_from(LENGTHS), st.integers(0, 2**32 - 1)),
    st.integers(0, MAX_TRANSPORT_BODY + 64),
    st.binary(max_size=8),
).map(lambda t: LENGTH.pack(t[0]) + t[2] * (t[1] // max(1, len(t[2]))))

hostile = st.one_of(st.binary(max_size=600), framed_junk, big_junk)


@st.composite
def chunked(draw: Any, data: Any) -> list[bytes]:
    """`data` cut into pieces at arbitrary points (empty pieces included)."""
    raw: bytes = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    return [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]


# ---- harness -----------------------------------------------------------------------------


def _bound(conn: Connection) -> int:
    """Strictly more than the receive buffer may ever hold after a successful feed."""
    if isinstance(conn, ServerConnection) and conn.hello is None:
        return HELLO_LEN
    if not conn.handshake_done:
        body = MSG1_LEN if isinstance(conn, ServerConnection) else MAX_MSG2_LEN
    else:
        body = MAX_TRANSPORT_BODY
    assert conn._buf.max_body == body
    return 4 + body


def feed(conn: Connection, pieces: list[bytes]) -> ProtocolError | None:
    """Feed every piece; any non-ProtocolError escapes and fails the test."""
    for piece in pieces:
        try:
            conn.receive_data(piece)
        except ProtocolError as exc:
            with pytest.raises(ProtocolError) as again:
                conn.receive_data(b"\x00")
            assert again.value is exc  # poisoned
            conn.receive_eof()  # an already-failed connection: EOF adds nothing
            return exc
        assert len(conn._buf) < _bound(conn)
    with contextlib.suppress(TruncatedError):
        conn.receive_eof()
    return None


def new_server(**kw: Any) -> ServerConnection:
    return ServerConnection({TOKEN.key_id: TOKEN.secret}.get, INFO, **kw)


def handshaken(suite: Suite = Suite.AESGCM) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection(TOKEN, suite)
    server = new_server()
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert server.authenticated
    return client, server


# ---- raw bytes in every phase ------------------------------------------------------------


@FUZZ
@given(chunked(hostile))
def test_fresh_server(pieces: list[bytes]) -> None:
    server = new_server()
    feed(server, pieces)
    assert not server.handshake_done
    assert server.data_to_send() == b""  # nothing is ever said to a stranger


HELLOS = st.sampled_from(
    [
        Hello(Suite.AESGCM, TOKEN.key_id).pack(),
        Hello(Suite.CHACHAPOLY, TOKEN.key_id).pack(),
        Hello(Suite.AESGCM, b"unknown!").pack(),
    ]
)


@FUZZ
@given(
    HELLOS,
    chunked(
        st.one_of(
            hostile, st.binary(min_size=48, max_size=48).map(lambda b: LENGTH.pack(MSG1_LEN) + b)
        )
    ),
)
def test_server_after_a_valid_hello(hello: bytes, pieces: list[bytes]) -> None:
    server = new_server()
    assert server.receive_data(hello) == []
    assert server.hello is not None
    exc = feed(server, pieces)
    assert not server.handshake_done
    assert server.data_to_send() == b""
    if exc is not None:
        assert isinstance(exc, RemoteProtocolError)


@FUZZ
@given(st.sampled_from(list(Suite)), chunked(hostile))
def test_client_awaiting_message_2(suite: Suite, pieces: list[bytes]) -> None:
    client = ClientConnection(TOKEN, suite)
    client.initiate()
    client.data_to_send()
    feed(client, pieces)
    assert not client.handshake_done
    assert client.data_to_send() == b""  # no AUTH for an unverified server


@FUZZ
@given(st.sampled_from(["server", "client"]), chunked(hostile))
def test_after_the_handshake(side: str, pieces: list[bytes]) -> None:
    client, server = handshaken()
    conn: Connection = server if side == "server" else client
    exc = feed(conn, pieces)
    if exc is not None:
        assert isinstance(exc, RemoteProtocolError)


# ---- well-encrypted but arbitrary frames: the dispatch rules -------------------------------

json_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
exec_body = st.dictionaries(
    st.sampled_from(["argv", "command", "env", "cwd", "timeout", "stdin", "extra"]),
    json_value,
    max_size=4,
).map(lambda d: json.dumps(d).encode())

frame_spec = st.tuples(
    st.one_of(st.sampled_from(list(FrameType)).map(int), st.integers(0, 255)),
    st.sampled_from([(0, 0)] * 7 + [(1, 0), (0, 1), (0xFF, 0xFFFF)]),  # mostly valid
    st.one_of(st.sampled_from([0, 1, 2, 3, MAX_CHANNEL]), st.integers(0, MAX_CHANNEL)),
    st.one_of(
        st.binary(max_size=80),
        exec_body,
        st.builds(lambda c, s: m.ExitStatus(c, s).pack(), st.integers(0, 255), st.none()),
        st.just(m.pack_error(3, "bad")),
    ),
)


def _seal(sender: Connection, spec: tuple[int, tuple[int, int], int, bytes]) -> bytes:
    ftype, (flags, reserved), channel, payload = spec
    assert sender._send is not None
    ct = sender._send.encrypt(b"", INNER.pack(ftype, flags, reserved, channel) + payload)
    return LENGTH.pack(len(ct)) + ct


@FUZZ
@given(st.lists(frame_spec, min_size=1, max_size=8), st.integers(1, 3))
def test_arbitrary_frames_into_the_server(specs: list[Any], split: int) -> None:
    client, server = handshaken()
    client.send_exec(["cat"], stdin=True)
    server.receive_data(client.data_to_send())
    wire = b"".join(_seal(client, spec) for spec in specs)
    step = max(1, len(wire) // split)
    feed(server, [wire[i : i + step] for i in range(0, len(wire), step)])
    out = server.data_to_send()  # PONGs at most; never a crash
    assert len(out) <= 8 * (4 + 24 + m.MAX_PING)


@FUZZ
@given(st.lists(frame_spec, min_size=1, max_size=8))
def test_arbitrary_frames_into_the_client(specs: list[Any]) -> None:
    client, server = handshaken()
    client.send_exec(["cat"], stdin=True)
    client.send_exec("true")
    server.receive_data(client.data_to_send())
    feed(client, [b"".join(_seal(server, spec) for spec in specs)])


# ---- decoders on their own ---------------------------------------------------------------


@FUZZ
@given(st.one_of(exec_body, st.binary(max_size=200)))
def test_exec_request_parser(body: bytes) -> None:
    try:
        req = parse_exec_request(body)
    except RemoteProtocolError as exc:
        assert str(exc).startswith("invalid EXEC request: ")
    else:
        assert (req.argv is None) != (req.command is None)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.sampled_from(sorted(json.loads(INFO.to_json()))), json_value).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_server_info_parser(raw: bytes) -> None:
    try:
        info = m.ServerInfo.from_json(raw)
    except RemoteProtocolError:
        return
    assert m.ServerInfo.from_json(info.to_json()) == info


@FUZZ
@given(st.binary(min_size=0, max_size=20))
def test_fixed_layout_decoders(raw: bytes) -> None:
    for decode in (m.ExitStatus.unpack, m.unpack_signal, m.unpack_window, m.unpack_error):
        with contextlib.suppress(RemoteProtocolError):
            decode(raw)
    try:
        status = m.ExitStatus.unpack(raw)
    except RemoteProtocolError:
        return
    assert m.ExitStatus.unpack(status.pack()) == status


@FUZZ
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda a, b, c: f"{a}:{b}:{c}",
            st.sampled_from(["rexec1", "rexec2", ""]),
            st.text("0123456789abcdefABCDEF \n", max_size=18),
            st.text(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/\n", max_size=46
            ),
        ),
    )
)
def test_token_parser(text: str) -> None:
    try:
        tok = parse_token(text)
    except TokenError as exc:
        assert str(exc).startswith("malformed token")
        return
    assert parse_token(tok.format()) == tok
    assert text.strip().split(":")[1] == tok.key_id.hex()
