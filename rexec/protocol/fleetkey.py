"""Fleet tokens: one master secret on the client, one derived key per server (sans-I/O, pure).

A fleet token `rexec1fleet:<fleet name>:<base64url 32-byte master>` never leaves the client.
Each server's store holds only the ordinary token derived for that server's name, so a server
(or whoever roots it) can neither authenticate to another server of the fleet nor pose as one
to a client that is connecting to another: the keys are independent HKDF outputs. The rules
below are specified in docs/PROTOCOL.md section 3.1, with test vectors.

On `rexec run`'s start-up path: str checks, no regular expressions; the HKDF import happens
only when a fleet token is actually used.
"""

from __future__ import annotations

import os

from rexec._record import FrozenRecord, setfield
from rexec.errors import TokenError
from rexec.protocol.token import KEY_ID_LEN, SECRET_LEN, Token, decode_secret, encode_secret

FLEET_PREFIX = "rexec1fleet"
KEY_LABEL = b"rexec fleet key v1"  # HKDF info prefix for the 32-byte secret
KEY_ID_LABEL = b"rexec fleet key id v1"  # HKDF info prefix for the 8-byte key id
MAX_SERVER_NAME = 253  # a DNS name's limit
_FLEET_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
# after lowercasing: DNS names, IPv4 and IPv6 literals (with a zone after '%'), aliases
_SERVER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-:%")

__all__ = [
    "FLEET_PREFIX",
    "KEY_ID_LABEL",
    "KEY_LABEL",
    "FleetToken",
    "derive_server_token",
    "generate_fleet_token",
    "is_fleet_token",
    "normalize_server_name",
    "parse_fleet_token",
]


def check_fleet_name(name: str) -> str:
    """A fleet's name: 1-64 characters from A-Z a-z 0-9 . _ - (a label, not key material)."""
    if not 1 <= len(name) <= 64 or not _FLEET_NAME_CHARS.issuperset(name):
        raise TokenError(
            f"invalid fleet name {name[:64]!r}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    return name


def normalize_server_name(name: str) -> str:
    """The server name keys are derived from (PROTOCOL.md 3.1).

    Surrounding whitespace is dropped; `[v6]` and `[v6]:port` give `v6`; `host:port` (one
    colon) gives `host`; ASCII only, lowercased; one trailing dot removed. The result is 1-253
    characters from a-z 0-9 . _ - : %. No other canonicalisation: `10.0.0.5` and a DNS name
    for it are different servers, as are two spellings of one IPv6 address.
    """
    text = name.strip()
    if not text.isascii():
        raise TokenError(f"invalid server name {name[:64]!r}: ASCII only (use the IDNA xn-- form)")
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "x"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            raise TokenError(
                f"invalid server name {name[:64]!r}: expected [v6addr] or [v6addr]:port"
            )
        text = text[1:end]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise TokenError(f"invalid server name {name[:64]!r}: port must be digits")
        text = host
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not 1 <= len(text) <= MAX_SERVER_NAME or not _SERVER_NAME_CHARS.issuperset(text):
        raise TokenError(
            f"invalid server name {name[:64]!r}: use 1-{MAX_SERVER_NAME} characters from "
            "a-z 0-9 . _ - (and : % in IPv6 literals)"
        )
    return text


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256 with no salt (= 32 zero bytes), from `cryptography`."""
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(SHA256(), length, None, info).derive(ikm)


def derive_server_token(master: bytes, server: str) -> Token:
    """The ordinary token that server `server` holds for fleet master `master`.

    key id = HKDF-SHA256(master, info = KEY_ID_LABEL || 0x00 || name, 8 bytes)
    secret = HKDF-SHA256(master, info = KEY_LABEL || 0x00 || name, 32 bytes)
    where name is normalize_server_name(server) in ASCII.
    """
    if len(master) != SECRET_LEN:
        raise TokenError(f"fleet master secret must be {SECRET_LEN} bytes, got {len(master)}")
    name = normalize_server_name(server).encode("ascii")
    key_id = _hkdf_sha256(master, KEY_ID_LABEL + b"\0" + name, KEY_ID_LEN)
    secret = _hkdf_sha256(master, KEY_LABEL + b"\0" + name, SECRET_LEN)
    return Token(key_id, secret)


class FleetToken(FrozenRecord):
    """A fleet's name (a label) and its 32-byte master secret: the client's copy only."""

    __match_args__ = ("name", "master")
    __slots__ = __match_args__
    name: str
    master: bytes

    def __init__(self, name: str, master: bytes) -> None:
        check_fleet_name(name)
        if len(master) != SECRET_LEN:
            raise TokenError(f"fleet master secret must be {SECRET_LEN} bytes, got {len(master)}")
        setfield(self, "name", name)
        setfield(self, "master", master)

    def __repr__(self) -> str:
        return f"FleetToken(name={self.name!r}, master=<hidden>)"

    def format(self) -> str:
        return f"{FLEET_PREFIX}:{self.name}:{encode_secret(self.master)}"

    def derive(self, server: str) -> Token:
        """This fleet's token for `server` (see derive_server_token)."""
        return derive_server_token(self.master, server)


def generate_fleet_token(name: str) -> FleetToken:
    """A fresh fleet master from the OS CSPRNG."""
    return FleetToken(check_fleet_name(name), os.urandom(SECRET_LEN))


def is_fleet_token(text: str) -> bool:
    """Whether a token line is a fleet token (by its prefix), valid or not."""
    return text.lstrip().startswith(FLEET_PREFIX + ":")


def parse_fleet_token(text: str) -> FleetToken:
    """Parse `rexec1fleet:<name>:<secret>`; surrounding whitespace is allowed."""
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0] != FLEET_PREFIX:
        raise TokenError("malformed fleet token: expected 'rexec1fleet:<fleet name>:<secret>'")
    return FleetToken(check_fleet_name(parts[1]), decode_secret(parts[2]))
