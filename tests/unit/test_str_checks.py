"""The str checks that replaced regular expressions on the `rexec run` path (DESIGN.md 2a)
accept exactly what the old patterns accepted (as full matches: a trailing newline, which
`re.match` with `$` let through, is refused now)."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from rexec.address import is_alias, is_hostname, is_ipv6
from rexec.errors import TokenError
from rexec.protocol.token import parse_token

HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
IPV6 = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?")
ALIAS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HEX = re.compile(r"[0-9a-f]{16}")
B64URL = re.compile(r"[A-Za-z0-9_-]{43}=?")

# mostly characters near the allowed sets, so that both answers come up often
NEARBY = st.text(
    st.sampled_from("aZ09_.-:%fFgG=/@ \n²é") | st.characters(codec="utf-8"), max_size=70
)


@given(NEARBY)
@example("")
@example("a")
@example("-a")
@example("a-")
@example(".a")
@example("a.")
@example("host\n")
def test_hostname(text: str) -> None:
    assert is_hostname(text) == bool(HOSTNAME.fullmatch(text))


@given(NEARBY)
@example("::1")
@example("fe80::1%eth0")
@example("fe80::1%")
@example("::ffff:10.0.0.1")
@example("1.2.3.4")
@example("::1%a%b")
def test_ipv6(text: str) -> None:
    assert is_ipv6(text) == bool(IPV6.fullmatch(text))


@given(NEARBY)
@example("a" * 64)
@example("a" * 65)
def test_alias(text: str) -> None:
    assert is_alias(text) == bool(ALIAS.fullmatch(text))


@given(
    st.text(st.sampled_from("0123456789abcdefABg"), min_size=14, max_size=18),
    st.text(st.sampled_from("AZaz09_-=+/"), min_size=41, max_size=46),
)
def test_token_fields(key_hex: str, secret: str) -> None:
    """parse_token refuses what the patterns refused, with the same message."""
    try:
        parse_token(f"rexec1:{key_hex}:{secret}")
        accepted = ""
    except TokenError as exc:
        accepted = str(exc)
    if not HEX.fullmatch(key_hex):
        assert accepted == "malformed token: key id must be 16 lowercase hex digits"
    elif not B64URL.fullmatch(secret):
        assert accepted == "malformed token: secret must be 43 base64url characters (32 bytes)"
    else:
        assert "must be" not in accepted  # at most "not canonical"
