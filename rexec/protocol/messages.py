"""Payload layouts of rexec/2 frames: fixed binary structs, and JSON where it is extensible.

Kept free of pydantic and dataclasses: the client's start-up path imports this module, and
pydantic costs ~100 ms of import time there (DESIGN.md 2a). EXEC is validated with pydantic
on the server (`rexec.protocol.models`); SERVER INFO is validated here by hand, just as
strictly (unknown keys refused, every type checked), because the client receives it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from rexec._record import FrozenRecord, setfield
from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol import jsonwire
from rexec.protocol.noise import hmac_sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from rexec.protocol.pty import PtyRequest

PROTOCOL_NAME = "rexec/2"
AUTH_LABEL = b"rexec/2 client-auth"
AUTH_LEN = 32
EXIT = struct.Struct(">iBBHQ")  # exit_code | signal | flags | reserved | duration_us
EXIT_TIMED_OUT = 0x01
SIGNAL = struct.Struct(">I")
WINDOW = struct.Struct(">HH")
ERROR_HEAD = struct.Struct(">H")
MAX_ERROR_TEXT = 1024
MAX_PING = 64
CREDIT = struct.Struct(">I")
MAX_WINDOW = 2**32 - 1  # a window (initial or grown by CREDIT) never exceeds a u32
# The reference windows, per channel: what the receiving end may have to hold for it. Credit
# returns once half a window is consumed, so half to all of it is in flight. Measured on
# loopback (2 cores, 512 MiB through the async API): a 4 MiB output window still made the
# server wait for credit ~20-30 times per 512 MiB, 8 MiB only a few times; stdin, which the
# server holds in memory, keeps SSH's 2 MiB.
STDIN_WINDOW = 2 * 1024 * 1024  # the server's, announced in the server info
OUTPUT_WINDOW = 8 * 1024 * 1024  # the client's, announced in each EXEC


def auth_proof(secret: bytes, handshake_hash: bytes) -> bytes:
    """The AUTH payload: proves the client holds the token secret for this very handshake."""
    return hmac_sha256(secret, AUTH_LABEL + handshake_hash)  # not hmac's: see noise


def verify_auth_proof(secret: bytes, handshake_hash: bytes, proof: bytes) -> bool:
    """Constant-time check of an AUTH payload (the server's: only it loads hmac)."""
    from hmac import compare_digest

    return compare_digest(auth_proof(secret, handshake_hash), proof)


class ExitStatus(FrozenRecord):
    """How a command ended. exit_code is None when a signal killed it."""

    __match_args__ = ("exit_code", "signal", "timed_out", "duration")
    __slots__ = __match_args__
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration: float

    def __init__(
        self,
        exit_code: int | None,
        signal: int | None = None,
        timed_out: bool = False,
        duration: float = 0.0,
    ) -> None:
        setfield(self, "exit_code", exit_code)
        setfield(self, "signal", signal)
        setfield(self, "timed_out", timed_out)
        setfield(self, "duration", duration)

    def pack(self) -> bytes:
        if self.exit_code is not None and not 0 <= self.exit_code <= 255:
            raise LocalProtocolError(f"exit code {self.exit_code} out of range 0..255")
        code = -1 if self.exit_code is None else self.exit_code
        sig = self.signal or 0
        if not 0 <= sig <= 255:
            raise LocalProtocolError(f"signal {sig} out of range")
        if (self.exit_code is None) != bool(sig):
            raise LocalProtocolError("an EXIT carries exactly one of an exit code or a signal")
        flags = EXIT_TIMED_OUT if self.timed_out else 0
        micros = max(0, round(self.duration * 1e6))
        return EXIT.pack(code, sig, flags, 0, micros)

    @classmethod
    def unpack(cls, payload: bytes) -> ExitStatus:
        if len(payload) != EXIT.size:
            raise RemoteProtocolError(f"EXIT payload must be {EXIT.size} bytes, got {len(payload)}")
        code, sig, flags, reserved, micros = EXIT.unpack(payload)
        if reserved or flags & ~EXIT_TIMED_OUT:
            raise RemoteProtocolError("EXIT reserved bits must be zero")
        if not -1 <= code <= 255:
            raise RemoteProtocolError(f"EXIT code {code} out of range")
        if (code == -1) != bool(sig):
            raise RemoteProtocolError("EXIT must carry exactly one of an exit code or a signal")
        return cls(
            exit_code=None if code == -1 else code,
            signal=sig or None,
            timed_out=bool(flags & EXIT_TIMED_OUT),
            duration=micros / 1e6,
        )


def pack_signal(signum: int) -> bytes:
    if not 1 <= signum <= 64:
        raise LocalProtocolError(f"signal number {signum} out of range 1..64")
    return SIGNAL.pack(signum)


def unpack_signal(payload: bytes) -> int:
    if len(payload) != SIGNAL.size:
        raise RemoteProtocolError(f"SIGNAL payload must be 4 bytes, got {len(payload)}")
    (signum,) = SIGNAL.unpack(payload)
    if not 1 <= signum <= 64:
        raise RemoteProtocolError(f"SIGNAL number {signum} out of range 1..64")
    return int(signum)


def pack_error(code: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return ERROR_HEAD.pack(code) + text


def unpack_error(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2 or len(payload) > 2 + MAX_ERROR_TEXT:
        raise RemoteProtocolError(f"ERROR payload of {len(payload)} bytes is malformed")
    (code,) = ERROR_HEAD.unpack_from(payload)
    return int(code), payload[2:].decode("utf-8", "replace")


def pack_credit(increment: int) -> bytes:
    if not 1 <= increment <= MAX_WINDOW:
        raise LocalProtocolError(f"credit increment {increment} out of range 1..{MAX_WINDOW}")
    return CREDIT.pack(increment)


def unpack_credit(payload: bytes) -> int:
    if len(payload) != CREDIT.size:
        raise RemoteProtocolError(f"CREDIT payload must be 4 bytes, got {len(payload)}")
    (increment,) = CREDIT.unpack(payload)
    if increment < 1:
        raise RemoteProtocolError("CREDIT increment must be at least 1")
    return int(increment)


def pack_window(rows: int, cols: int) -> bytes:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise LocalProtocolError("window size out of range")
    return WINDOW.pack(rows, cols)


def unpack_window(payload: bytes) -> tuple[int, int]:
    if len(payload) != WINDOW.size:
        raise RemoteProtocolError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    rows, cols = WINDOW.unpack(payload)
    return int(rows), int(cols)


def exec_request_json(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    stdin: bool = False,
    window: int = OUTPUT_WINDOW,
    pty: PtyRequest | None = None,
) -> bytes:
    """The EXEC body the client sends: a str runs under /bin/sh -c, a sequence is argv.

    `window` is the channel's initial output window: how many STDOUT + STDERR bytes the
    server may send before our first CREDIT.
    """
    body: dict[str, Any] = {}
    if isinstance(command, str):
        body["command"] = command
    else:
        argv = list(command)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise LocalProtocolError("argv must be a non-empty sequence of str")
        body["argv"] = argv
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if cwd is not None:
        body["cwd"] = cwd
    if timeout is not None:
        if not timeout > 0:
            raise LocalProtocolError("timeout must be positive")
        body["timeout"] = float(timeout)
    if stdin:
        body["stdin"] = True
    if not 0 <= window <= MAX_WINDOW:
        raise LocalProtocolError(f"window {window} out of range 0..{MAX_WINDOW}")
    body["window"] = window
    if pty is not None:
        body["pty"] = pty.to_json()
    return jsonwire.dumps(body).encode("utf-8")


_INFO_FIELDS: dict[str, tuple[type, ...]] = {
    "protocol": (str,),
    "server": (str,),
    "user": (str,),
    "host": (str,),
    "max_payload": (int,),
    "max_channels": (int,),
    "default_timeout": (int, float, type(None)),
    "max_timeout": (int, float, type(None)),
    "window": (int,),
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class ServerInfo(FrozenRecord):
    """The payload of Noise message 2: who the server is and the limits it enforces."""

    __match_args__ = (
        "server",
        "user",
        "host",
        "max_payload",
        "max_channels",
        "default_timeout",
        "max_timeout",
        "window",
        "protocol",
    )
    __slots__ = __match_args__
    server: str
    user: str
    host: str
    max_payload: int
    max_channels: int
    default_timeout: float | None
    max_timeout: float | None
    window: int
    protocol: str

    def __init__(
        self,
        server: str,
        user: str,
        host: str,
        max_payload: int,
        max_channels: int,
        default_timeout: float | None = None,
        max_timeout: float | None = None,
        window: int = STDIN_WINDOW,
        protocol: str = PROTOCOL_NAME,
    ) -> None:
        setfield(self, "server", server)
        setfield(self, "user", user)
        setfield(self, "host", host)
        setfield(self, "max_payload", max_payload)
        setfield(self, "max_channels", max_channels)
        setfield(self, "default_timeout", default_timeout)
        setfield(self, "max_timeout", max_timeout)
        setfield(self, "window", window)
        setfield(self, "protocol", protocol)

    def to_json(self) -> bytes:
        data = {name: getattr(self, name) for name in _INFO_FIELDS}
        return jsonwire.dumps(data).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        try:
            data = jsonwire.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # deep nesting fits in 4 KiB
            raise RemoteProtocolError(f"server info is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RemoteProtocolError("server info must be a JSON object")
        extra = sorted(set(data) - set(_INFO_FIELDS))
        if extra:
            raise RemoteProtocolError(f"server info has unknown fields: {', '.join(extra)}")
        missing = sorted(set(_INFO_FIELDS) - set(data))
        if missing:
            raise RemoteProtocolError(f"server info lacks fields: {', '.join(missing)}")
        for name, types in _INFO_FIELDS.items():
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise RemoteProtocolError(f"server info field {name!r} has the wrong type")
        if data["protocol"] != PROTOCOL_NAME:
            raise RemoteProtocolError(f"server speaks {data['protocol']!r}, not {PROTOCOL_NAME}")
        if data["max_payload"] < 1 or data["max_channels"] < 1:
            raise RemoteProtocolError("server info limits must be positive")
        if not 0 <= data["window"] <= MAX_WINDOW:
            raise RemoteProtocolError(f"server info window must be within 0..{MAX_WINDOW}")
        return cls(**data)
