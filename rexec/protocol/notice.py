"""What may come back in place of message 2 (docs/PROTOCOL.md 6.6): a refusal notice, or a
peer that is no rexec server at all.

A server that turns a client away for a reason that is no secret (busy, rate limited, a
suite or version it does not take, shutting down) says so in 8 cleartext bytes before it
closes, as OpenSSH says "Not allowed at this time". A failed authentication is never
announced: it stays a silent close, so a prober learns nothing. The notice's magic cannot
begin a message-2 frame (whose first byte is always 0x00), and neither can an SSH banner
or an HTTP status line, so the client tells all of them apart from the first bytes.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum

from rexec.errors import NotRexecServer, RemoteProtocolError, ServerRefused

NOTICE_MAGIC = b"RXNO"
NOTICE = struct.Struct(">4sBBH")  # magic | server's protocol version | reason | retry_after s
NOTICE_LEN = NOTICE.size
MAX_RETRY_AFTER = 0xFFFF
_FOREIGN = ((b"SSH-", "SSH"), (b"HTTP/", "HTTP"))  # what a wrong port usually speaks first


class RefusalCode(IntEnum):
    """The notice's reason byte."""

    BUSY = 1  # too many connections (in total, in the handshake, or from this source)
    RATE_LIMITED = 2  # too many failed authentications from this address or user
    SUITE_NOT_ALLOWED = 3  # the HELLO's cipher suite is unknown or disabled here
    SHUTTING_DOWN = 4
    VERSION_NOT_SUPPORTED = 5  # the HELLO's version is not one the server speaks


_REASONS = {
    RefusalCode.BUSY: "busy, too many connections",
    RefusalCode.RATE_LIMITED: (
        "rate limited, too many failed authentications from this address or user"
    ),
    RefusalCode.SUITE_NOT_ALLOWED: "cipher suite {suite} is not allowed",
    RefusalCode.SHUTTING_DOWN: "the server is shutting down",
    RefusalCode.VERSION_NOT_SUPPORTED: "protocol version {version} is not supported "
    "(the server speaks rexec/{server_version})",
}


class HelloRefused(RemoteProtocolError):
    """A HELLO the server turns down for a reason it may tell (version, suite)."""

    def __init__(self, refusal: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


def encode_notice(code: RefusalCode, retry_after: float = 0, *, version: int) -> bytes:
    """The 8 bytes a server sends instead of message 2; retry_after in seconds, 0 = no hint;
    `version`: the protocol version the server speaks (frames.VERSION)."""
    hint = min(MAX_RETRY_AFTER, max(0, round(retry_after)))
    return NOTICE.pack(NOTICE_MAGIC, version, int(code), hint)


def refusal_error(notice: bytes, *, suite: str = "?", version: int) -> ServerRefused:
    """The client's error for a received notice (`suite`/`version`: what the client sent)."""
    _, server_version, code, retry_after = NOTICE.unpack(notice)
    try:
        template = _REASONS[RefusalCode(code)]
    except ValueError:
        template = "reason code {code}"
    reason = template.format(
        suite=suite, version=f"rexec/{version}", server_version=server_version, code=code
    )
    message = f"the server refused the connection: {reason}"
    if retry_after:
        message += f" (try again in {retry_after}s)"
    return ServerRefused(code, retry_after, message)


def inspect_reply(head: bytes, *, suite: str = "?", version: int) -> int:
    """Look at the first bytes the server sent, before message 2 is complete.

    Returns how many more bytes are needed to tell what they are, or 0 when they are the
    start of a frame (message 2: its length check then applies). Raises ServerRefused for
    a refusal notice and NotRexecServer for an SSH banner or an HTTP reply.
    """
    if not head:
        return 1
    if head[0] == 0:  # a frame length below 16 MiB: message 2's always is
        return 0
    if head.startswith(NOTICE_MAGIC):
        if len(head) < NOTICE_LEN:
            return NOTICE_LEN - len(head)
        raise refusal_error(head[:NOTICE_LEN], suite=suite, version=version)
    for magic, name in _FOREIGN:
        if head.startswith(magic):
            raise NotRexecServer(f"not a rexec server (it speaks {name})")
    for magic in (NOTICE_MAGIC, *(m for m, _ in _FOREIGN)):
        if len(head) < len(magic) and magic.startswith(head):
            return len(magic) - len(head)
    return 0


def stalled_handshake(what: str, timeout: float, received: int) -> str:
    """The connect-timeout message: says whether the server sent anything back at all, since
    a server of another protocol that waits for a request (HTTP) sends nothing."""
    if received:
        detail = f"the server's reply stopped after {received} bytes"
    else:
        detail = "the server sent nothing back (it may not be a rexec server)"
    return f"handshake with {what} timed out after {timeout:g}s: {detail}"


BUSY_RETRIES = 3  # after the first try: at most 4 connections
BUSY_WAIT = (0.2, 2.0)  # the server's retry hint, kept within these bounds (seconds)
BUSY_ATTEMPT_MIN = 0.25  # seconds left for the next attempt itself: none starts with less


def busy_retry_delay(exc: ServerRefused, retries: int, remaining: float) -> float | None:
    """Seconds a client waits before trying again after `exc`, or None to give up.

    Only BUSY is retried, at most BUSY_RETRIES times, and never past the connect deadline
    (`remaining` seconds away): after the wait, BUSY_ATTEMPT_MIN must be left for the attempt
    (one started a millisecond before the deadline could only time out). The wait is the
    server's hint within BUSY_WAIT, times a random 0.5-1, so that clients refused together
    do not come back together.
    """
    if exc.code != RefusalCode.BUSY or retries >= BUSY_RETRIES:
        return None
    low, high = BUSY_WAIT
    jitter = 0.5 + int.from_bytes(os.urandom(2), "big") / 0x20000
    delay = min(max(float(exc.retry_after), low), high) * jitter
    return delay if delay + BUSY_ATTEMPT_MIN <= remaining else None
