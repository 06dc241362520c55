"""One error tree for all of rexec, so callers can catch exactly what they mean.

Every error carries a human message that names the cause; front ends print it on one line.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by ERROR frames (see docs/PROTOCOL.md, section "ERROR")."""

    PROTOCOL = 1  # peer violated the protocol; connection closes
    AUTH = 2  # authentication failed
    BAD_REQUEST = 3  # EXEC body invalid (schema, env not allowed, bad timeout)
    EXEC_FAILED = 4  # the command could not be started (not found, bad cwd)
    LIMIT = 5  # a server limit was hit (channels, connections)
    SHUTDOWN = 6  # server is shutting down
    IDLE_TIMEOUT = 7  # connection idle for too long
    INTERNAL = 8  # unexpected server-side failure
    POLICY = 9  # the token's policy refused the command (the text names the rule)


class RexecError(Exception):
    """Base of every error rexec raises on purpose."""


class ProtocolError(RexecError):
    """The rexec/2 rules were broken; the connection cannot continue."""

    code: ErrorCode = ErrorCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol state does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol (malformed, oversized, out of order)."""


class DecryptError(RemoteProtocolError):
    """A frame failed AEAD authentication: tampered, replayed, reordered or wrong key."""


class AuthError(RexecError):
    """Authentication failed: wrong or unknown token, or a bad AUTH proof."""

    code = ErrorCode.AUTH


class AuthFailed(AuthError, RemoteProtocolError):
    """A handshake message failed authentication: the peer does not hold our token.

    It is both an auth failure and bad peer bytes, so code that handles either catches it.
    """


class NotRexecServer(RemoteProtocolError):
    """The peer answered in another protocol (an SSH banner, an HTTP reply)."""


class ServerRefused(RexecError):
    """The server turned the connection away for a reason it may tell: busy, rate limited,
    a cipher suite or protocol version it does not take, or shutting down.

    `code` is the refusal notice's reason (rexec.protocol.notice.RefusalCode) and
    `retry_after` its hint in seconds (0: none). Never raised for a wrong token.
    """

    def __init__(self, code: int, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class ConnectionLost(RexecError):
    """The connection failed or closed while we still needed it."""


class ConnectTimeout(ConnectionLost):
    """Connecting or the handshake did not finish within the client's deadline."""


class Disconnected(ConnectionLost):
    """The user ended an interactive session from the keyboard (`~.`), as ssh's escape."""


class TruncatedError(ConnectionLost):
    """The peer's byte stream ended before the protocol said it was complete.

    A TCP EOF before CLOSE, or before EXIT on an open channel, is never a success. Raised for
    a command, it carries the output received before the cut that the Result would have held
    (`stdout`, `stderr`: the collected streams, less what the caller took as chunks).
    """

    stdout: bytes = b""
    stderr: bytes = b""

    def with_output(self, stdout: bytes, stderr: bytes) -> TruncatedError:
        """A copy carrying one command's partial output (the original is shared by every
        command the cut ended)."""
        copy = type(self)(*self.args)
        copy.stdout, copy.stderr = stdout, stderr
        return copy


class RemoteError(RexecError):
    """The server reported an error in an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = ErrorCode(code).name.lower()
        except ValueError:
            name = f"code {code}"
        super().__init__(f"server error ({name}): {message}")
        self.code = code
        self.message = message


class PolicyError(RemoteError):
    """The token's policy refused the command (ERROR code POLICY); the message names the rule."""


class CommandError(RexecError):
    """A command finished unsuccessfully and the caller asked for that to raise.

    Its subclasses, `CommandFailed` and `CommandTimeout`, carry the command's Result, so they
    live next to it in rexec.result (this module sits below every other one: no imports).
    """


class ExecError(RexecError):
    """The server could not start the command (not found, not executable, bad cwd).

    exit_code is the status the server reported for it (127 not found, 126 otherwise),
    when the error came over the wire.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(RexecError):
    """A config, token or token-store file is invalid, unsafe or missing."""


class AuditLogError(RexecError):
    """An audit record could not be written (full disk, the file was replaced by an unsafe one)."""


class TokenError(ConfigError):
    """A token string is malformed."""


class HostSetError(ConfigError):
    """A host set (`lab[01-40]`, `@group`, `-x`) is malformed, too large or names no group."""
