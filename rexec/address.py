"""Addresses: `host[:port]`, `[v6]:port` and `unix:/path`, for clients and servers alike.

Standard library only, no regular expressions: it sits on the `rexec run` start-up path.
"""

from __future__ import annotations

from rexec._record import FrozenRecord, setfield
from rexec.errors import ConfigError

DEFAULT_PORT = 8222

_NAME_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
)  # host names, aliases and IPv6 zone ids
_IPV6_CHARS = frozenset("0123456789ABCDEFabcdef:.")


def is_hostname(host: str) -> bool:
    """[A-Za-z0-9_] then [A-Za-z0-9_.-]*, not ending in '-'."""
    return bool(host) and _NAME_CHARS.issuperset(host) and host[0] not in ".-" and host[-1] != "-"


def is_ipv6(host: str) -> bool:
    """Hex digits, ':' and '.' with at least one ':', then an optional %zone."""
    addr, pct, zone = host.partition("%")
    if ":" not in addr or not _IPV6_CHARS.issuperset(addr):
        return False
    return not pct or (bool(zone) and _NAME_CHARS.issuperset(zone))


def is_alias(name: str) -> bool:
    return 1 <= len(name) <= 64 and _NAME_CHARS.issuperset(name)


class Endpoint(FrozenRecord):
    """Where to connect or listen: a TCP (host, port) or a unix socket path, never both."""

    __match_args__ = ("host", "port", "path")
    __slots__ = __match_args__
    host: str | None
    port: int | None
    path: str | None

    def __init__(
        self, host: str | None = None, port: int | None = None, path: str | None = None
    ) -> None:
        tcp = host is not None and port is not None
        unix = path is not None
        if tcp == unix or (not tcp and (host is not None or port is not None)):
            raise ValueError("Endpoint needs exactly one of (host, port) or path")
        setfield(self, "host", host)
        setfield(self, "port", port)
        setfield(self, "path", path)

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_port(text: str, port_text: str, allow_zero: bool) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"invalid address {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_zero):
        low = 0 if allow_zero else 1
        raise ConfigError(f"invalid address {text!r}: port must be {low}..65535, got {port}")
    return port


def parse_address(
    text: str, default_port: int = DEFAULT_PORT, *, allow_zero_port: bool = False
) -> Endpoint:
    """Parse `host`, `host:port`, `[v6]`, `[v6]:port` or `unix:/path`.

    Bare IPv6 (`::1`) is refused: `::1:8222` would be ambiguous, so brackets are required.
    `allow_zero_port` is for listen addresses, where port 0 means "pick a free port".
    """
    if not isinstance(text, str) or not text:
        raise ConfigError("invalid address '': expected host[:port], [v6addr][:port] or unix:/path")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\0" in path:
            raise ConfigError(f"invalid address {text!r}: unix socket path is empty or invalid")
        return Endpoint(path=path)
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"invalid address {text!r}: missing ']' after IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not host or not is_ipv6(host):
            raise ConfigError(f"invalid address {text!r}: {host!r} is not an IPv6 address")
        if not rest:
            return Endpoint(host=host, port=default_port)
        if not rest.startswith(":"):
            raise ConfigError(f"invalid address {text!r}: expected ':port' after ']'")
        return Endpoint(host=host, port=_parse_port(text, rest[1:], allow_zero_port))
    if text.count(":") > 1:
        raise ConfigError(
            f"invalid address {text!r}: write IPv6 addresses in brackets, "
            f"e.g. '[::1]:{default_port}'"
        )
    host, sep, port_text = text.partition(":")
    if not is_hostname(host):
        raise ConfigError(
            f"invalid address {text!r}: expected host[:port], [v6addr][:port] or unix:/path"
        )
    port = _parse_port(text, port_text, allow_zero_port) if sep else default_port
    return Endpoint(host=host, port=port)
