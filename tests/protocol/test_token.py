"""Token format `rexec1:<key_id hex>:<base64url secret>`: strict parsing, hidden secret."""

from __future__ import annotations

import base64

import pytest

from rexec.errors import ConfigError, TokenError
from rexec.protocol.token import (
    KEY_ID_LEN,
    SECRET_LEN,
    Token,
    format_token,
    generate_token,
    parse_token,
)

KEY_ID = bytes.fromhex("0123456789abcdef")
SECRET = bytes(range(32))
SECRET_B64 = base64.urlsafe_b64encode(SECRET).decode().rstrip("=")
GOOD = f"rexec1:0123456789abcdef:{SECRET_B64}"


def _reject(text: str, *words: str) -> str:
    with pytest.raises(TokenError) as info:
        parse_token(text)
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


def test_known_token_formats_and_parses() -> None:
    tok = Token(KEY_ID, SECRET)
    assert format_token(tok) == GOOD
    assert tok.format() == GOOD
    assert tok.key_id_hex == "0123456789abcdef"
    back = parse_token(GOOD)
    assert back == tok
    assert back.key_id == KEY_ID and back.secret == SECRET


def test_generate_format_parse_round_trip() -> None:
    seen = set()
    for _ in range(50):
        tok = generate_token()
        assert len(tok.key_id) == KEY_ID_LEN and len(tok.secret) == SECRET_LEN
        text = tok.format()
        prefix, key_hex, secret = text.split(":")
        assert prefix == "rexec1"
        assert key_hex == tok.key_id.hex() and len(key_hex) == 16
        assert len(secret) == 43 and "=" not in secret
        assert parse_token(text) == tok
        seen.add(tok.secret)
    assert len(seen) == 50  # fresh randomness every time


def test_surrounding_whitespace_and_padding_are_accepted() -> None:
    tok = Token(KEY_ID, SECRET)
    assert parse_token(GOOD + "\n") == tok
    assert parse_token("  " + GOOD + " \r\n") == tok
    assert parse_token(GOOD + "=") == tok  # the one padding char base64 would add


@pytest.mark.parametrize(
    "text",
    [
        f"rexec2:0123456789abcdef:{SECRET_B64}",
        f"REXEC1:0123456789abcdef:{SECRET_B64}",
        f"ssh:0123456789abcdef:{SECRET_B64}",
        f":0123456789abcdef:{SECRET_B64}",
    ],
)
def test_rejects_wrong_prefix(text: str) -> None:
    _reject(text, "prefix", "rexec1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rexec1",
        "rexec1:0123456789abcdef",
        f"0123456789abcdef:{SECRET_B64}",
        f"rexec1:0123456789abcdef:{SECRET_B64}:extra",
        f"rexec1::0123456789abcdef:{SECRET_B64}",
    ],
)
def test_rejects_wrong_part_count(text: str) -> None:
    _reject(text, "malformed token", "expected 'rexec1:<key id hex>:<secret>'")


@pytest.mark.parametrize(
    "key_hex",
    [
        "0123456789ABCDEF",  # uppercase
        "0123456789abcdeF",
        "0123456789abcde",  # short
        "0123456789abcdef0",  # long
        "",
        "0123456789abcdeg",  # not hex
        "0123456789abcde ",
        "0123456789abcdef\n",  # `$` must not match before a newline
        "01 23456789abcdef",
    ],
)
def test_rejects_bad_key_id(key_hex: str) -> None:
    _reject(f"rexec1:{key_hex}:{SECRET_B64}", "key id", "16 lowercase hex")


@pytest.mark.parametrize(
    "secret",
    [
        SECRET_B64[:-1] + "+",  # standard, not url-safe, alphabet
        SECRET_B64[:-1] + "/",
        SECRET_B64[:-1] + "!",
        SECRET_B64[:-1],  # 42 chars: too short
        SECRET_B64 + "A",  # 44 chars: too long
        SECRET_B64 + "==",
        SECRET_B64[:-2] + "==",
        "",
        SECRET_B64 + "\n=",
        base64.urlsafe_b64encode(bytes(31)).decode(),  # 31-byte secret
        base64.urlsafe_b64encode(bytes(33)).decode().rstrip("="),  # 33-byte secret
    ],
)
def test_rejects_bad_secret(secret: str) -> None:
    _reject(f"rexec1:0123456789abcdef:{secret}", "secret", "43 base64url characters", "32 bytes")


def test_rejects_non_canonical_secret() -> None:
    # 43 characters carry 258 bits: the last character's two spare bits must be zero
    last = SECRET_B64[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]
    assert base64.urlsafe_b64decode(SECRET_B64[:-1] + twin + "=") == SECRET
    _reject(f"rexec1:0123456789abcdef:{SECRET_B64[:-1]}{twin}", "secret", "canonical")


def test_error_messages_never_echo_the_secret() -> None:
    for text in (
        f"rexec9:0123456789abcdef:{SECRET_B64}",
        f"rexec1:0123456789ABCDEF:{SECRET_B64}",
        f"rexec1:0123456789abcdef:{SECRET_B64}x",
        f"rexec1:0123456789abcdef:{SECRET_B64}:x",
    ):
        msg = _reject(text)
        assert SECRET_B64[:8] not in msg


@pytest.mark.parametrize(
    ("key_id", "secret", "word"),
    [
        (bytes(7), bytes(32), "key id must be 8 bytes, got 7"),
        (bytes(9), bytes(32), "key id must be 8 bytes, got 9"),
        (bytes(8), bytes(31), "secret must be 32 bytes, got 31"),
        (bytes(8), b"", "secret must be 32 bytes, got 0"),
    ],
)
def test_token_constructor_checks_lengths(key_id: bytes, secret: bytes, word: str) -> None:
    with pytest.raises(TokenError, match=word):
        Token(key_id, secret)


def test_token_error_is_a_config_error() -> None:
    assert issubclass(TokenError, ConfigError)


def test_repr_never_contains_the_secret() -> None:
    for tok in [Token(KEY_ID, SECRET), *(generate_token() for _ in range(20))]:
        forms = {
            tok.secret.hex(),
            repr(tok.secret),
            base64.urlsafe_b64encode(tok.secret).decode().rstrip("="),
            base64.b64encode(tok.secret).decode().rstrip("="),
        }
        for text in (repr(tok), str(tok), f"{tok}", f"{tok!r}", repr([tok]), repr({"t": tok})):
            assert "<hidden>" in text
            assert tok.key_id.hex() in text
            for form in forms:
                assert form not in text
            assert tok.secret.hex()[:16] not in text
