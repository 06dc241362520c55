"""Fleet tokens (PROTOCOL.md 3.1): the derivation vectors, name normalisation, the format.

The vectors are checked three ways: against the table in docs/PROTOCOL.md, against an
HKDF written here from RFC 5869 with the standard library (not `cryptography`), and against
rexec's own derivation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from rexec.errors import TokenError
from rexec.protocol.fleetkey import (
    FleetToken,
    derive_server_token,
    generate_fleet_token,
    is_fleet_token,
    normalize_server_name,
    parse_fleet_token,
)
from rexec.protocol.token import parse_token

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
MASTER = bytes(range(32))
FLEET_LINE = "rexec1fleet:lab:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
# (name given, normalised, key id hex, secret hex): PROTOCOL.md 3.1
VECTORS = [
    (
        "lab01",
        "lab01",
        "bf4f2d04daa7b368",
        "b64142a39ead0e29450632891ce04da71488f3466fb92eaab0a140cbc1932a1b",
    ),
    (
        "lab02",
        "lab02",
        "4a6161fe5a46f332",
        "3063f1d11c79a18ef9edd29ed64b9b2cf4e4145801445d261188bd0ad6aff2f5",
    ),
    (
        "LAB01.Example.ORG.:8222",
        "lab01.example.org",
        "15ab9b0331892768",
        "e0a89270d2c11aa039029004414abbc2e4eabff2e488d7dd2461d021a3a6ca28",
    ),
    (
        "[::1]:8222",
        "::1",
        "15939c3de753783f",
        "15ab281b3572438ef10435ee63da0018eb61eda9cf825103a24c001c3d989730",
    ),
]


def rfc5869_hkdf_sha256(ikm: bytes, info: bytes, length: int, salt: bytes = b"") -> bytes:
    """RFC 5869, from the text: extract with a zero salt, then expand."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def doc_derive(master: bytes, name: str) -> tuple[bytes, bytes]:
    """The derivation exactly as PROTOCOL.md 3.1 states it (name already normalised)."""
    raw = name.encode("ascii")
    key_id = rfc5869_hkdf_sha256(master, b"rexec fleet key id v1" + b"\0" + raw, 8)
    secret = rfc5869_hkdf_sha256(master, b"rexec fleet key v1" + b"\0" + raw, 32)
    return key_id, secret


def test_rfc5869_helper_matches_the_rfc_test_case_3() -> None:
    """The independent HKDF is right: RFC 5869 A.3 (zero-length salt and info)."""
    okm = rfc5869_hkdf_sha256(bytes([0x0B]) * 22, b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


@pytest.mark.parametrize(("given", "name", "key_id", "secret"), VECTORS)
def test_vectors(given: str, name: str, key_id: str, secret: str) -> None:
    assert normalize_server_name(given) == name
    assert doc_derive(MASTER, name) == (bytes.fromhex(key_id), bytes.fromhex(secret))
    token = derive_server_token(MASTER, given)
    assert (token.key_id.hex(), token.secret.hex()) == (key_id, secret)
    assert parse_fleet_token(FLEET_LINE).derive(given) == token


def test_vectors_are_in_the_document() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^(\S+)\s+(\S+)\s+([0-9a-f]{16})\s+([0-9a-f]{64})$", text, re.M)
    assert [tuple(r) for r in rows] == VECTORS
    assert FLEET_LINE in text
    for given in ("lab01", "lab02"):
        assert derive_server_token(MASTER, given).format() in text


def test_servers_get_unrelated_keys() -> None:
    a, b = derive_server_token(MASTER, "a"), derive_server_token(MASTER, "b")
    assert a.key_id != b.key_id and a.secret != b.secret
    assert a != b and a == derive_server_token(MASTER, "a")  # Token compares its fields
    other = derive_server_token(bytes(32), "a")
    assert other.key_id != a.key_id and other.secret != a.secret
    # the same server under the spellings normalisation merges
    assert derive_server_token(MASTER, " A.:99 ") == a


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("lab01", "lab01"),
        ("Lab01", "lab01"),
        ("lab01.", "lab01"),
        ("lab01:8222", "lab01"),
        ("  lab01\n", "lab01"),
        ("10.0.0.5:22", "10.0.0.5"),
        ("[fe80::1%eth0]", "fe80::1%eth0"),
        ("fe80::1", "fe80::1"),
        ("my_host-2", "my_host-2"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_normalisation(given: str, name: str) -> None:
    assert normalize_server_name(given) == name


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "1-253"),
        ("   ", "1-253"),
        (".", "1-253"),
        ("bücher.example", "ASCII only"),
        ("lab01:port", "port must be digits"),
        ("[::1", "expected [v6addr]"),
        ("[::1]x", "expected [v6addr]"),
        ("a b", "1-253"),
        ("a/b", "1-253"),
        ("a" * 254, "1-253"),
    ],
)
def test_normalisation_refuses(given: str, why: str) -> None:
    with pytest.raises(TokenError, match=re.escape(why)):
        normalize_server_name(given)


def test_fleet_token_format_round_trip_and_hidden_master() -> None:
    fleet = parse_fleet_token(FLEET_LINE + "\n")
    assert fleet == FleetToken("lab", MASTER)
    assert fleet.format() == FLEET_LINE
    assert "AAEC" not in repr(fleet) and "hidden" in repr(fleet)
    fresh = generate_fleet_token("lab-2")
    assert parse_fleet_token(fresh.format()) == fresh
    assert fresh.master != MASTER


@pytest.mark.parametrize(
    "text",
    [
        "rexec1:lab:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "rexec1fleet:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "rexec1fleet:la b:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "rexec1fleet::AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "rexec1fleet:lab:short",
    ],
)
def test_malformed_fleet_tokens(text: str) -> None:
    with pytest.raises(TokenError):
        parse_fleet_token(text)


def test_the_prefix_tells_the_kinds_apart() -> None:
    assert is_fleet_token(FLEET_LINE) and is_fleet_token("  " + FLEET_LINE)
    plain = derive_server_token(MASTER, "lab01").format()
    assert not is_fleet_token(plain)
    with pytest.raises(TokenError, match="unknown prefix 'rexec1fleet'"):
        parse_token(FLEET_LINE)
