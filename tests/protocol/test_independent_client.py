"""An independent rexec/2 client written from docs/PROTOCOL.md alone.

It proves the document is sufficient: nothing here imports rexec's client, noise, frames or
connection modules. The Noise part uses the `noiseprotocol` package (and, to check the
document's step-by-step Appendix A, a hand-rolled NNpsk0 on `cryptography` primitives);
everything else is `struct`, `json` and `hmac` following the document's byte layouts. The
peer is the real sans-I/O `ServerConnection`, driven in memory.

Section numbers in comments refer to docs/PROTOCOL.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rexec.protocol.messages import ExitStatus, ServerInfo
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import parse_token

noise_conn = pytest.importorskip("noise.connection", reason="noiseprotocol (dev extra) missing")
NoiseConnection = noise_conn.NoiseConnection
Keypair = noise_conn.Keypair

pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# ---- constants, as the document states them ------------------------------------------------

MAGIC = b"RXEC"  # section 4
VERSION = 2
SUITE_BYTE = {"AESGCM": 1, "ChaChaPoly": 2}
NOISE_NAME = {
    "AESGCM": b"Noise_NNpsk0_25519_AESGCM_SHA256",
    "ChaChaPoly": b"Noise_NNpsk0_25519_ChaChaPoly_SHA256",
}
MSG1_LEN = 48  # section 6.3
MAX_PAYLOAD = 256 * 1024  # section 8
MAX_BODY = 8 + MAX_PAYLOAD + 16  # section 5
AUTH_LABEL = b"rexec/2 client-auth"  # section 9

# section 10: frame type numbers
AUTH, EXEC, STDIN, STDIN_EOF, STDOUT, STDERR, EXIT = 1, 2, 3, 4, 5, 6, 7
SIGNAL, WINDOW, ERROR, PING, PONG, CLOSE, CREDIT = 8, 9, 10, 11, 12, 13, 14
BAD_REQUEST = 3  # section 11
MAX_WINDOW = 2**32 - 1  # section 12.3

U32 = struct.Struct(">I")
INNER = struct.Struct(">BBHI")  # type | flags | reserved | channel
EXIT_STRUCT = struct.Struct(">iBBHQ")  # exit_code | signal | flags | reserved | duration_us

# the worked example of section 15
EX_TOKEN = "rexec1:a1b2c3d4e5f60718:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
EX_CLIENT_E = bytes(range(0x20, 0x40))
EX_SERVER_E = bytes(range(0x40, 0x60))
EX_INFO = ServerInfo(
    server="rexec 0.1.0",
    user="alice",
    host="build01",
    max_payload=MAX_PAYLOAD,
    max_channels=64,
    default_timeout=None,
    max_timeout=3600.0,
    window=2 * 1024 * 1024,
)
OUT_WINDOW = 8 * 1024 * 1024  # the output window our EXECs announce (section 10.2)


def _names(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def _is(exc: BaseException, name: str) -> bool:
    return name in {c.__name__ for c in type(exc).__mro__}


# ---- section 3: the token ----------------------------------------------------------------


def doc_parse_token(text: str) -> tuple[bytes, bytes]:
    prefix, key_hex, secret_b64 = text.strip().split(":")
    assert prefix == "rexec1"
    assert len(key_hex) == 16 and len(secret_b64) == 43
    key_id = bytes.fromhex(key_hex)
    secret = base64.urlsafe_b64decode(secret_b64 + "=")
    assert len(key_id) == 8 and len(secret) == 32
    return key_id, secret


# ---- two Noise backends: noiseprotocol, and Appendix A by hand ---------------------------


class LibNoise:
    """NNpsk0 initiator on the `noiseprotocol` package (sections 6 and 7)."""

    def __init__(self, suite: str, prologue: bytes, psk: bytes, ephemeral: bytes | None) -> None:
        conn = NoiseConnection.from_name(NOISE_NAME[suite])
        conn.set_psks(psk=psk)
        conn.set_prologue(prologue)
        if ephemeral is not None:
            conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        conn.set_as_initiator()
        conn.start_handshake()
        self._c = conn

    def message1(self) -> bytes:
        return bytes(self._c.write_message(b""))

    def read_message2(self, msg: bytes) -> bytes:
        payload = bytes(self._c.read_message(msg))
        assert self._c.handshake_finished
        return payload

    @property
    def handshake_hash(self) -> bytes:
        return bytes(self._c.get_handshake_hash())

    def seal(self, plaintext: bytes) -> bytes:
        return bytes(self._c.encrypt(plaintext))  # empty associated data

    def open(self, ciphertext: bytes) -> bytes:
        return bytes(self._c.decrypt(ciphertext))


def _hkdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    temp = hmac.digest(ck, ikm, "sha256")
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac.digest(temp, prev + bytes([i]), "sha256")
        out.append(prev)
    return out


class HandNoise:
    """NNpsk0 initiator exactly as Appendix A spells it, with explicit nonces (section 7)."""

    def __init__(self, suite: str, prologue: bytes, psk: bytes, ephemeral: bytes | None) -> None:
        assert ephemeral is not None
        self._suite = suite
        self._psk = psk
        self._e = X25519PrivateKey.from_private_bytes(ephemeral)
        name = NOISE_NAME[suite]
        self.h = name.ljust(32, b"\0") if len(name) <= 32 else hashlib.sha256(name).digest()
        self.ck = self.h
        self.k = b""
        self._mix_hash(prologue)
        self._send_k = self._recv_k = b""
        self.send_n = self.recv_n = 0

    def _mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def _mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)

    def nonce(self, n: int) -> bytes:
        if self._suite == "AESGCM":
            return b"\0\0\0\0" + n.to_bytes(8, "big")
        return b"\0\0\0\0" + n.to_bytes(8, "little")

    def _aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return AESGCM(key) if self._suite == "AESGCM" else ChaCha20Poly1305(key)

    def message1(self) -> bytes:
        self.ck, temp_h, self.k = _hkdf(self.ck, self._psk, 3)  # psk
        self._mix_hash(temp_h)
        e_pub = self._e.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)  # e
        self._mix_hash(e_pub)
        self._mix_key(e_pub)
        ct = self._aead(self.k).encrypt(self.nonce(0), b"", self.h)  # empty payload
        self._mix_hash(ct)
        return e_pub + ct

    def read_message2(self, msg: bytes) -> bytes:
        re = msg[:32]  # e
        self._mix_hash(re)
        self._mix_key(re)
        self._mix_key(self._e.exchange(X25519PublicKey.from_public_bytes(re)))  # ee
        ct = msg[32:]
        payload = self._aead(self.k).decrypt(self.nonce(0), ct, self.h)
        self._mix_hash(ct)
        self._send_k, self._recv_k = _hkdf(self.ck, b"", 2)  # Split(): k1 c->s, k2 s->c
        return payload

    @property
    def handshake_hash(self) -> bytes:
        return self.h

    def seal(self, plaintext: bytes) -> bytes:
        ct = self._aead(self._send_k).encrypt(self.nonce(self.send_n), plaintext, b"")
        self.send_n += 1
        return ct

    def open(self, ciphertext: bytes) -> bytes:
        pt = self._aead(self._recv_k).decrypt(self.nonce(self.recv_n), ciphertext, b"")
        self.recv_n += 1
        return pt


# ---- the client ----------------------------------------------------------------------------


class DocClient:
    """A minimal rexec/2 client: HELLO, handshake, AUTH, frames (sections 4 to 12)."""

    def __init__(
        self,
        token: str,
        suite: str,
        backend: type[LibNoise] | type[HandNoise] = LibNoise,
        ephemeral: bytes | None = None,
    ) -> None:
        self.key_id, self.secret = doc_parse_token(token)
        self.hello = MAGIC + bytes([VERSION, SUITE_BYTE[suite]]) + b"\0\0" + self.key_id
        assert len(self.hello) == 16
        self.noise = backend(suite, self.hello, self.secret, ephemeral)
        self._buf = bytearray()
        self.info: dict[str, Any] | None = None

    def first_flight(self) -> bytes:
        msg1 = self.noise.message1()
        assert len(msg1) == MSG1_LEN
        return self.hello + U32.pack(len(msg1)) + msg1

    def frame(self, ftype: int, channel: int, payload: bytes = b"") -> bytes:
        assert len(payload) <= MAX_PAYLOAD
        body = self.noise.seal(INNER.pack(ftype, 0, 0, channel) + payload)
        return U32.pack(len(body)) + body

    def auth_frame(self) -> bytes:
        proof = hmac.digest(self.secret, AUTH_LABEL + self.noise.handshake_hash, "sha256")
        assert len(proof) == 32
        return self.frame(AUTH, 0, proof)

    def _bodies(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            (n,) = U32.unpack_from(self._buf)
            if self.info is None:
                assert 48 <= n <= 32 + 4096 + 16
            else:
                assert 24 <= n <= MAX_BODY
            if len(self._buf) < 4 + n:
                break
            out.append(bytes(self._buf[4 : 4 + n]))
            del self._buf[: 4 + n]
        return out

    def receive(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Feed server bytes; returns decrypted frames as (type, channel, payload)."""
        frames: list[tuple[int, int, bytes]] = []
        for body in self._bodies(data):
            if self.info is None:
                self.info = json.loads(self.noise.read_message2(body))
                continue
            plain = self.noise.open(body)
            ftype, flags, reserved, channel = INNER.unpack_from(plain)
            assert flags == 0 and reserved == 0
            frames.append((ftype, channel, plain[8:]))
        return frames


def exec_body(**fields: Any) -> bytes:
    fields.setdefault("window", OUT_WINDOW)
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_exit(payload: bytes) -> dict[str, Any]:
    assert len(payload) == 16
    code, sig, flags, reserved, micros = EXIT_STRUCT.unpack(payload)
    assert reserved == 0 and flags & ~1 == 0
    return {
        "exit_code": None if code == -1 else code,
        "signal": sig or None,
        "timed_out": bool(flags & 1),
        "duration_us": micros,
    }


def decode_error(payload: bytes) -> tuple[int, str]:
    assert 2 <= len(payload) <= 2 + 1024
    (code,) = struct.unpack_from(">H", payload)
    return code, payload[2:].decode("utf-8", "replace")


def make_server(
    token: str = EX_TOKEN, ephemeral: bytes | None = None
) -> tuple[ServerConnection, bytes]:
    tok = parse_token(token)
    keys = {tok.key_id: tok.secret}
    return ServerConnection(keys.get, EX_INFO, ephemeral=ephemeral), tok.secret


def handshake(suite: str, backend: type[LibNoise] | type[HandNoise] = LibNoise) -> Any:
    server, _ = make_server(ephemeral=EX_SERVER_E)
    client = DocClient(EX_TOKEN, suite, backend, EX_CLIENT_E)
    assert server.receive_data(client.first_flight()) == []
    msg2 = server.data_to_send()
    assert client.receive(msg2) == []
    return server, client, msg2


# ---- the tests -----------------------------------------------------------------------------


def test_doc_token_parse_agrees_with_rexec() -> None:
    key_id, secret = doc_parse_token(EX_TOKEN)
    tok = parse_token(EX_TOKEN)
    assert (key_id, secret) == (tok.key_id, tok.secret)
    assert key_id == bytes.fromhex("a1b2c3d4e5f60718") and secret == bytes(range(32))


@pytest.mark.parametrize("suite", ["AESGCM", "ChaChaPoly"])
def test_full_session(suite: str) -> None:
    server, client, _ = handshake(suite)
    assert client.info == {
        "protocol": "rexec/2",
        "server": "rexec 0.1.0",
        "user": "alice",
        "host": "build01",
        "max_payload": 262144,
        "max_channels": 64,
        "default_timeout": None,
        "max_timeout": 3600.0,
        "window": 2097152,
    }

    # AUTH with the first EXEC pipelined behind it, in one write
    flight = client.auth_frame() + client.frame(EXEC, 1, exec_body(argv=["echo", "hi there"]))
    events = server.receive_data(flight)
    assert _names(events) == ["Authenticated", "ExecReceived"]
    assert events[0].key_id == bytes.fromhex("a1b2c3d4e5f60718")
    assert events[1].channel == 1 and events[1].request.argv == ("echo", "hi there")
    assert server.data_to_send() == b""

    # the server application answers: output, then EXIT
    server.send_output(1, 1, b"hi there\n")
    server.send_output(1, 2, b"\x00\xffwarn\n")
    server.send_exit(1, ExitStatus(exit_code=3, duration=1.5))
    frames = client.receive(server.data_to_send())
    assert frames == [
        (STDOUT, 1, b"hi there\n"),
        (STDERR, 1, b"\x00\xffwarn\n"),
        (EXIT, 1, struct.pack(">iBBHQ", 3, 0, 0, 0, 1_500_000)),
    ]
    assert decode_exit(frames[2][2]) == {
        "exit_code": 3,
        "signal": None,
        "timed_out": False,
        "duration_us": 1_500_000,
    }

    # a second command with every EXEC field, streamed stdin, killed at its deadline
    req = exec_body(command="cat; sleep 100", env={"LANG": "C"}, cwd="/tmp", timeout=2, stdin=True)
    flight = (
        client.frame(EXEC, 2, req)
        + client.frame(STDIN, 2, b"input\n")
        + client.frame(STDIN_EOF, 2)
        + client.frame(WINDOW, 2, struct.pack(">HH", 24, 80))
    )
    events = server.receive_data(flight)
    assert _names(events) == ["ExecReceived", "StdinReceived", "StdinClosed", "WindowChanged"]
    request = events[0].request
    assert request.command == "cat; sleep 100" and request.argv is None
    assert request.env == {"LANG": "C"} and request.cwd == "/tmp"
    assert request.timeout == 2.0 and request.stdin is True
    assert events[1].data == b"input\n"
    server.send_output(2, 1, b"input\n")
    server.send_exit(2, ExitStatus(exit_code=None, signal=9, timed_out=True, duration=2.0))
    frames = client.receive(server.data_to_send())
    assert frames[0] == (STDOUT, 2, b"input\n")
    assert frames[1] == (EXIT, 2, struct.pack(">iBBHQ", -1, 9, 1, 0, 2_000_000))
    assert frames[1][2] == bytes.fromhex("ffffffff 09 01 0000 00000000001e8480")
    assert decode_exit(frames[1][2])["timed_out"] is True

    # late STDIN / SIGNAL for a channel that has ended: silently dropped
    late = client.frame(SIGNAL, 2, struct.pack(">I", 2)) + client.frame(STDIN, 2, b"x")
    assert server.receive_data(late) == []
    assert server.data_to_send() == b""

    # an invalid EXEC: ERROR BAD_REQUEST + EXIT on that channel, the connection continues
    events = server.receive_data(client.frame(EXEC, 3, exec_body(argv=["ls"], shell=True)))
    assert _names(events) == ["ExecRejected"] and events[0].channel == 3
    server.send_channel_error(3, BAD_REQUEST, events[0].reason)
    server.send_exit(3, ExitStatus(exit_code=255))
    frames = client.receive(server.data_to_send())
    assert [(t, ch) for t, ch, _ in frames] == [(ERROR, 3), (EXIT, 3)]
    code, text = decode_error(frames[0][2])
    assert code == BAD_REQUEST and "shell" in text
    assert decode_exit(frames[1][2])["exit_code"] == 255

    # channel numbers strictly increase: the next EXEC still works
    events = server.receive_data(client.frame(EXEC, 4, exec_body(argv=["true"])))
    assert _names(events) == ["ExecReceived"]
    server.send_exit(4, ExitStatus(exit_code=0))
    assert client.receive(server.data_to_send()) == [(EXIT, 4, bytes(16))]

    # PING is answered by PONG with the same payload
    assert server.receive_data(client.frame(PING, 0, b"t=1")) == []
    assert client.receive(server.data_to_send()) == [(PONG, 0, b"t=1")]

    # CLOSE each way; then EOF is a clean end
    assert _names(server.receive_data(client.frame(CLOSE, 0))) == ["CloseReceived"]
    server.send_close()
    assert client.receive(server.data_to_send()) == [(CLOSE, 0, b"")]
    server.receive_eof()  # no TruncatedError: CLOSE came first


@pytest.mark.parametrize("suite", ["AESGCM", "ChaChaPoly"])
def test_appendix_a_by_hand_matches_noiseprotocol_and_server(suite: str) -> None:
    """Appendix A and section 7 (split, nonce byte order) are exact: check them by hand."""
    _, lib, msg2_lib = handshake(suite, LibNoise)
    server, hand, msg2 = handshake(suite, HandNoise)
    assert msg2 == msg2_lib  # same ephemerals: same server bytes
    assert hand.noise.handshake_hash == lib.noise.handshake_hash
    assert hand.info == lib.info
    # frames 0..2 each way: nonces 1 and 2 differ between big- and little-endian counters
    flight = (
        hand.auth_frame()
        + hand.frame(EXEC, 1, exec_body(argv=["a"]))
        + hand.frame(EXEC, 2, exec_body(argv=["b"]))
    )
    flight_lib = (
        lib.auth_frame()
        + lib.frame(EXEC, 1, exec_body(argv=["a"]))
        + lib.frame(EXEC, 2, exec_body(argv=["b"]))
    )
    assert flight == flight_lib
    assert _names(server.receive_data(flight)) == ["Authenticated", "ExecReceived", "ExecReceived"]
    server.send_output(1, 1, b"one")
    server.send_output(2, 1, b"two")
    server.send_exit(1, ExitStatus(exit_code=0))
    assert hand.receive(server.data_to_send()) == [
        (STDOUT, 1, b"one"),
        (STDOUT, 2, b"two"),
        (EXIT, 1, bytes(16)),
    ]
    assert hand.noise.nonce(1) == (
        bytes.fromhex("000000000000000000000001")
        if suite == "AESGCM"
        else bytes.fromhex("000000000100000000000000")
    )


def test_worked_example_bytes_are_in_the_document() -> None:
    """Section 15 quotes a whole session; every byte must be what a client really exchanges."""
    doc = "".join(DOC.read_text(encoding="utf-8").split())  # hex dumps, whitespace removed
    fresh = DocClient(EX_TOKEN, "AESGCM", HandNoise, EX_CLIENT_E)
    assert isinstance(fresh.noise, HandNoise)
    assert fresh.noise.h.hex() in doc  # Appendix A check value: h after MixHash(HELLO)
    assert fresh.hello.hex() == "5258454302010000a1b2c3d4e5f60718"
    flight1 = fresh.first_flight()
    assert len(flight1) == 16 + 4 + 48
    assert flight1.hex() in doc

    server, client, msg2 = handshake("AESGCM", HandNoise)
    assert len(msg2) == 229 and msg2[:4] == U32.pack(225)
    assert msg2.hex() in doc
    noise = client.noise
    assert isinstance(noise, HandNoise)
    for value in (noise.handshake_hash, noise._send_k, noise._recv_k):
        assert value.hex() in doc
    proof = hmac.digest(client.secret, AUTH_LABEL + noise.handshake_hash, "sha256")
    assert proof.hex() in doc

    auth = client.auth_frame()
    exec_ = client.frame(EXEC, 1, exec_body(argv=["echo", "hi"]))
    assert (len(auth), len(exec_)) == (60, 67)
    assert auth.hex() in doc and exec_.hex() in doc
    assert _names(server.receive_data(auth + exec_)) == ["Authenticated", "ExecReceived"]

    server.send_output(1, 1, b"hi\n")
    server.send_exit(1, ExitStatus(exit_code=0, duration=0.0042))
    flight4 = server.data_to_send()
    assert len(flight4) == 75 and flight4.hex() in doc
    exit_payload = bytes.fromhex("00000000 00 00 0000 0000000000001068")
    assert client.receive(flight4) == [(STDOUT, 1, b"hi\n"), (EXIT, 1, exit_payload)]

    close = client.frame(CLOSE, 0)
    assert _names(server.receive_data(close)) == ["CloseReceived"]
    server.send_close()
    server_close = server.data_to_send()
    assert client.receive(server_close) == [(CLOSE, 0, b"")]
    assert close.hex() in doc and server_close.hex() in doc
    server.receive_eof()


def test_unknown_key_id_closes_without_a_byte() -> None:
    server, _ = make_server()
    other = "rexec1:0000000000000000:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
    client = DocClient(other, "AESGCM")
    with pytest.raises(Exception) as info:
        server.receive_data(client.first_flight())
    assert _is(info.value, "AuthError")
    assert server.data_to_send() == b""


def test_wrong_secret_closes_without_a_byte() -> None:
    server, _ = make_server()
    wrong = "rexec1:a1b2c3d4e5f60718:" + "A" * 43
    with pytest.raises(Exception) as info:
        server.receive_data(DocClient(wrong, "ChaChaPoly").first_flight())
    assert _is(info.value, "AuthError")
    assert server.data_to_send() == b""


def test_message_1_length_is_checked_at_the_header() -> None:
    server, _ = make_server()
    hello = DocClient(EX_TOKEN, "AESGCM").hello
    with pytest.raises(Exception) as info:
        server.receive_data(hello + U32.pack(49))  # no body byte sent yet
    assert _is(info.value, "RemoteProtocolError")
    assert server.data_to_send() == b""


@pytest.mark.parametrize("length", [MAX_BODY + 1, 23])
def test_transport_length_is_checked_at_the_header(length: int) -> None:
    server, client, _ = handshake("AESGCM")
    assert _names(server.receive_data(client.auth_frame())) == ["Authenticated"]
    with pytest.raises(Exception) as info:
        server.receive_data(U32.pack(length))
    assert _is(info.value, "RemoteProtocolError")


def test_max_payload_frames_each_way() -> None:
    """Section 7: frames beyond Noise's 65535-byte message limit need the raw AEAD."""
    server, client, _ = handshake("ChaChaPoly", HandNoise)
    req = exec_body(argv=["cat"], stdin=True)
    data = bytes(range(256)) * (MAX_PAYLOAD // 256)
    flight = client.auth_frame() + client.frame(EXEC, 1, req)  # sealed in wire order
    big = client.frame(STDIN, 1, data)
    assert len(big) == 4 + MAX_BODY
    events = server.receive_data(flight + big)
    assert _names(events) == ["Authenticated", "ExecReceived", "StdinReceived"]
    assert events[2].data == data
    server.send_output(1, 1, data + b"tail")  # the server splits at 256 KiB
    out = server.data_to_send()
    assert U32.unpack_from(out)[0] == MAX_BODY
    assert client.receive(out) == [(STDOUT, 1, data), (STDOUT, 1, b"tail")]


def test_anything_before_auth_kills_the_connection() -> None:
    server, client, _ = handshake("AESGCM")
    with pytest.raises(Exception) as info:
        server.receive_data(client.frame(EXEC, 1, exec_body(argv=["true"])))
    assert _is(info.value, "RemoteProtocolError")


def test_failed_decrypt_kills_the_connection() -> None:
    server, client, _ = handshake("AESGCM")
    good = bytearray(client.auth_frame())
    good[-1] ^= 1
    with pytest.raises(Exception) as info:
        server.receive_data(bytes(good))
    assert _is(info.value, "DecryptError")
    good[-1] ^= 1  # even the untampered frame is refused now: the connection is dead
    with pytest.raises(Exception) as again:
        server.receive_data(bytes(good))
    assert _is(again.value, "ProtocolError")


def test_eof_before_close_is_a_truncation() -> None:
    server, client, _ = handshake("AESGCM")
    events = server.receive_data(client.auth_frame() + client.frame(EXEC, 1, exec_body(argv=["x"])))
    assert _names(events) == ["Authenticated", "ExecReceived"]
    with pytest.raises(Exception) as info:
        server.receive_eof()
    assert _is(info.value, "TruncatedError")


# ---- section 12.3: flow control --------------------------------------------------------


def _authed(stdin: bool, window: int = OUT_WINDOW) -> tuple[Any, DocClient]:
    server, client, _ = handshake("AESGCM", HandNoise)  # raw AEAD: 256 KiB frames (section 7)
    flight = client.auth_frame() + client.frame(
        EXEC, 1, exec_body(argv=["cat"], stdin=stdin, window=window)
    )
    assert _names(server.receive_data(flight)) == ["Authenticated", "ExecReceived"]
    return server, client


def test_stdin_window_is_the_server_infos_and_credit_reopens_it() -> None:
    server, client = _authed(stdin=True)
    assert client.info is not None
    window = client.info["window"]
    assert window == 2 * 1024 * 1024
    chunk = bytes(MAX_PAYLOAD)
    flight = b"".join(client.frame(STDIN, 1, chunk) for _ in range(window // MAX_PAYLOAD))
    events = server.receive_data(flight)  # exactly the window: fine
    assert _names(events) == ["StdinReceived"] * 8
    # the command takes 1 MiB (half the window): the server grants it back
    server.stdin_consumed(1, window // 2)
    frames = client.receive(server.data_to_send())
    assert frames == [(CREDIT, 1, U32.pack(window // 2))]
    plain = INNER.pack(CREDIT, 0, 0, 1) + frames[0][2]  # section 10.14's example, exactly
    quoted = f"{plain[:1].hex()} {plain[1:2].hex()} {plain[2:4].hex()} {plain[4:8].hex()}"
    assert f"`{quoted} || {plain[8:].hex()}`" in DOC.read_text(encoding="utf-8")
    flight = b"".join(client.frame(STDIN, 1, chunk) for _ in range(4))
    assert _names(server.receive_data(flight)) == ["StdinReceived"] * 4
    with pytest.raises(Exception) as info:  # one byte beyond the window
        server.receive_data(client.frame(STDIN, 1, b"x"))
    assert _is(info.value, "RemoteProtocolError") and "window" in str(info.value)


def test_output_window_is_the_execs_and_credit_grows_it() -> None:
    server, client = _authed(stdin=False, window=5)
    server.send_output(1, 1, b"abc")
    server.send_output(1, 2, b"de")  # STDOUT and STDERR share the window
    assert client.receive(server.data_to_send()) == [(STDOUT, 1, b"abc"), (STDERR, 1, b"de")]
    assert server.output_room(1) == 0
    with pytest.raises(Exception) as info:  # the server keeps within the window
        server.send_output(1, 1, b"f")
    assert _is(info.value, "LocalProtocolError")
    events = server.receive_data(client.frame(CREDIT, 1, U32.pack(7)))
    assert _names(events) == ["CreditReceived"] and server.output_room(1) == 7
    server.send_output(1, 1, b"fghijkl")
    assert client.receive(server.data_to_send()) == [(STDOUT, 1, b"fghijkl")]


def test_credit_rules() -> None:
    server, client = _authed(stdin=False, window=0)
    assert server.output_room(1) == 0
    events = server.receive_data(client.frame(CREDIT, 1, U32.pack(7)))
    assert _names(events) == ["CreditReceived"] and server.output_room(1) == 7
    # a late CREDIT, after the channel's EXIT, is dropped (section 10.14)
    server.send_exit(1, ExitStatus(exit_code=0))
    client.receive(server.data_to_send())
    assert server.receive_data(client.frame(CREDIT, 1, U32.pack(1))) == []
    for channel, payload, words in [
        (9, U32.pack(1), "never opened"),
        (0, U32.pack(1), "not a command channel"),
        (1, U32.pack(0), "at least 1"),
        (1, b"\x00\x01", "4 bytes"),
    ]:
        server, client = _authed(stdin=False)
        with pytest.raises(Exception) as info:
            server.receive_data(client.frame(CREDIT, channel, payload))
        assert _is(info.value, "RemoteProtocolError") and words in str(info.value)
    server, client = _authed(stdin=False, window=MAX_WINDOW)
    with pytest.raises(Exception) as info:  # beyond 2**32 - 1
        server.receive_data(client.frame(CREDIT, 1, U32.pack(1)))
    assert _is(info.value, "RemoteProtocolError") and "beyond" in str(info.value)
