"""Noise NNpsk0 (X25519, SHA256) on `cryptography` primitives, two cipher suites.

Only what rexec/2 needs: the NNpsk0 pattern (`-> psk, e` / `<- e, ee`), the two AEADs, and
the transport CipherStates after Split(). Written from the Noise spec (revision 34) and
checked byte for byte against the cacophony vectors and against the `noiseprotocol` package.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from rexec.errors import DecryptError, LocalProtocolError, RemoteProtocolError
from rexec.protocol._crypto import (
    AESGCM,
    ChaCha20Poly1305,
    sha256_new,
    x25519_from_private_bytes,
    x25519_generate,
    x25519_public_from_bytes,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DHLEN = 32
HASHLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the spec: using it is nonce exhaustion


class Suite(IntEnum):
    """The HELLO suite byte."""

    AESGCM = 1
    CHACHAPOLY = 2

    @property
    def protocol_name(self) -> bytes:
        cipher = "AESGCM" if self is Suite.AESGCM else "ChaChaPoly"
        return f"Noise_NNpsk0_25519_{cipher}_SHA256".encode("ascii")

    @property
    def label(self) -> str:
        return "AESGCM" if self is Suite.AESGCM else "ChaChaPoly"


_Aead = AESGCM | ChaCha20Poly1305
_AES_NONCE = struct.Struct(">4xQ")  # Noise AESGCM: 32 zero bits, then big-endian counter
_CHACHA_NONCE = struct.Struct("<4xQ")  # Noise ChaChaPoly: 32 zero bits, little-endian counter


# SHA-256 from rexec.protocol._crypto (not hashlib, nor cryptography's Python layer: both
# cost `rexec run` milliseconds of start-up, DESIGN.md 2a), HMAC on top of it (RFC 2104).
_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def sha256(data: bytes) -> bytes:
    return sha256_new(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    if len(key) > _BLOCK:
        key = sha256(key)
    key = key.ljust(_BLOCK, b"\0")
    inner = sha256_new(key.translate(_IPAD))
    inner.update(data)
    return sha256_new(key.translate(_OPAD) + inner.digest()).digest()


def _invalid_tag(exc: Exception) -> bool:
    """Is exc cryptography's InvalidTag? Imported only when a decrypt fails: the module
    loads typing (and re), which `rexec run` otherwise does without."""
    from cryptography.exceptions import InvalidTag

    return isinstance(exc, InvalidTag)


def _hkdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    temp = hmac_sha256(ck, ikm)
    out1 = hmac_sha256(temp, b"\x01")
    out2 = hmac_sha256(temp, out1 + b"\x02")
    if n == 2:
        return [out1, out2]
    return [out1, out2, hmac_sha256(temp, out2 + b"\x03")]


class CipherState:
    """One direction's AEAD key and counter nonce.

    A failed decrypt raises DecryptError and leaves the counter where it was, so a tampered
    frame can never shift the expected nonce of later frames.
    """

    __slots__ = ("_aead", "_pack", "n")

    def __init__(self, suite: Suite, key: bytes | None = None) -> None:
        self._pack = (_AES_NONCE if suite is Suite.AESGCM else _CHACHA_NONCE).pack
        self._aead: _Aead | None = None
        self.n = 0
        if key is not None:
            self._aead = AESGCM(key) if suite is Suite.AESGCM else ChaCha20Poly1305(key)

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _next(self) -> int:
        n = self.n
        if n >= MAX_NONCE:
            raise LocalProtocolError("nonce counter exhausted: the connection must be closed")
        return n

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        n = self._next()
        ct = self._aead.encrypt(self._pack(n), plaintext, ad)
        self.n = n + 1
        return ct

    def encrypt_into(self, ad: bytes, plaintext: bytes | bytearray, out: memoryview) -> None:
        """Encrypt into `out` (exactly len(plaintext) + TAGLEN bytes): no extra copy."""
        if self._aead is None:
            raise LocalProtocolError("encrypt_into needs a keyed CipherState")
        n = self._next()
        self._aead.encrypt_into(self._pack(n), plaintext, ad, out)
        self.n = n + 1

    def decrypt(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        n = self.n
        if n >= MAX_NONCE:
            raise RemoteProtocolError("peer exhausted the nonce counter")
        if len(ciphertext) < TAGLEN:
            raise DecryptError("encrypted frame shorter than its authentication tag")
        try:
            pt = self._aead.decrypt(self._pack(n), ciphertext, ad)
        except Exception as exc:
            if not _invalid_tag(exc):
                raise
            raise DecryptError(
                "frame failed authentication (tampered, replayed, reordered or wrong key)"
            ) from None
        self.n = n + 1
        return pt

    def decrypt_into(self, ad: bytes, ciphertext: bytes | memoryview, out: bytearray) -> None:
        """Decrypt into `out` (exactly len(ciphertext) - TAGLEN bytes): no extra copy.

        Same rules as decrypt; on failure `out` holds nothing usable and the counter stays.
        """
        if self._aead is None:
            raise LocalProtocolError("decrypt_into needs a keyed CipherState")
        n = self.n
        if n >= MAX_NONCE:
            raise RemoteProtocolError("peer exhausted the nonce counter")
        if len(ciphertext) < TAGLEN:
            raise DecryptError("encrypted frame shorter than its authentication tag")
        try:
            self._aead.decrypt_into(self._pack(n), ciphertext, ad, out)
        except Exception as exc:
            if not _invalid_tag(exc):
                raise
            raise DecryptError(
                "frame failed authentication (tampered, replayed, reordered or wrong key)"
            ) from None
        self.n = n + 1


class SymmetricState:
    """Chaining key, handshake hash and the handshake CipherState."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        name = suite.protocol_name
        self.h = name.ljust(HASHLEN, b"\0") if len(name) <= HASHLEN else sha256(name)
        self.ck = self.h
        self.cipher = CipherState(suite)

    def mix_hash(self, data: bytes) -> None:
        self.h = sha256(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(self.suite, temp_k)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(self.suite, temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return CipherState(self.suite, k1), CipherState(self.suite, k2)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    # public_bytes_raw(), not public_bytes(Encoding.Raw, PublicFormat.Raw): importing
    # cryptography's serialization module costs `rexec run` ~6-9 ms (DESIGN.md 2a)
    return key.public_key().public_bytes_raw()


class NNpsk0Handshake:
    """The two-message NNpsk0 handshake for one role.

    Usage (initiator): write_message_1 -> read_message_2 -> split().
    Usage (responder): read_message_1 -> write_message_2 -> split().
    `ephemeral` is for test vectors only; normally a fresh key is generated.
    """

    def __init__(
        self,
        suite: Suite,
        *,
        initiator: bool,
        prologue: bytes,
        psk: bytes,
        ephemeral: bytes | None = None,
    ) -> None:
        if len(psk) != 32:
            raise LocalProtocolError("the Noise PSK must be 32 bytes")
        self.initiator = initiator
        self._ss = SymmetricState(suite)
        self._ss.mix_hash(prologue)
        self._psk = psk
        self._e = (
            x25519_from_private_bytes(ephemeral) if ephemeral is not None else x25519_generate()
        )
        self._step = 0
        self._re: bytes | None = None

    @property
    def handshake_hash(self) -> bytes:
        if self._step < 2:
            raise LocalProtocolError("handshake hash is only final after both messages")
        return self._ss.h

    def _expect(self, step: int, initiator: bool, what: str) -> None:
        if self._step != step or self.initiator is not initiator:
            raise LocalProtocolError(f"cannot {what} in this handshake state")

    def _send_e(self) -> bytes:
        pub = _public_bytes(self._e)
        self._ss.mix_hash(pub)
        self._ss.mix_key(pub)  # psk handshakes mix e into the key too
        return pub

    def _recv_e(self, message: bytes) -> bytes:
        if len(message) < DHLEN + TAGLEN:
            raise RemoteProtocolError(
                f"handshake message too short ({len(message)} bytes, need {DHLEN + TAGLEN})"
            )
        re = message[:DHLEN]
        self._ss.mix_hash(re)
        self._ss.mix_key(re)
        self._re = re
        return message[DHLEN:]

    def _dh(self) -> bytes:
        assert self._re is not None
        try:
            return self._e.exchange(x25519_public_from_bytes(self._re))
        except ValueError:  # all-zero shared secret: a low-order point
            raise RemoteProtocolError("peer sent an invalid ephemeral key") from None

    def write_message_1(self, payload: bytes = b"") -> bytes:
        self._expect(0, True, "write message 1")
        self._ss.mix_key_and_hash(self._psk)
        msg = self._send_e() + self._ss.encrypt_and_hash(payload)
        self._step = 1
        return msg

    def read_message_1(self, message: bytes) -> bytes:
        self._expect(0, False, "read message 1")
        self._ss.mix_key_and_hash(self._psk)
        rest = self._recv_e(message)
        payload = self._ss.decrypt_and_hash(rest)
        self._step = 1
        return payload

    def write_message_2(self, payload: bytes = b"") -> bytes:
        self._expect(1, False, "write message 2")
        msg = self._send_e()
        self._ss.mix_key(self._dh())
        msg += self._ss.encrypt_and_hash(payload)
        self._step = 2
        return msg

    def read_message_2(self, message: bytes) -> bytes:
        self._expect(1, True, "read message 2")
        rest = self._recv_e(message)
        self._ss.mix_key(self._dh())
        payload = self._ss.decrypt_and_hash(rest)
        self._step = 2
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Return (send, receive) CipherStates for this role."""
        if self._step != 2:
            raise LocalProtocolError("cannot split before the handshake is complete")
        c1, c2 = self._ss.split()
        return (c1, c2) if self.initiator else (c2, c1)
