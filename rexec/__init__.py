"""rexec: run commands on remote machines over an authenticated, encrypted, framed channel.

    async with rexec.connect("lab1", token=...) as conn:
        result = await conn.run(["uname", "-a"])

    with rexec.Client("lab1") as client:
        client.run("make test", check=True)

The public API is loaded lazily (PEP 562) so that `rexec run` pays only for what it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AuthError": "rexec.errors",
    "Client": "rexec.client.blocking",
    "CommandFailed": "rexec.errors",
    "CommandTimeout": "rexec.errors",
    "ConfigError": "rexec.errors",
    "ConnectTimeout": "rexec.errors",
    "Connection": "rexec.client.aio",
    "ConnectionLost": "rexec.errors",
    "ExecError": "rexec.errors",
    "NotRexecServer": "rexec.errors",
    "Process": "rexec.client.aio",
    "ProtocolError": "rexec.errors",
    "RemoteError": "rexec.errors",
    "Result": "rexec.result",
    "RexecError": "rexec.errors",
    "ServerRefused": "rexec.errors",
    "TruncatedError": "rexec.errors",
    "connect": "rexec.client.aio",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; the runtime uses __getattr__
    from rexec.client.aio import Connection, Process, connect
    from rexec.client.blocking import Client
    from rexec.errors import (
        AuthError,
        CommandFailed,
        CommandTimeout,
        ConfigError,
        ConnectionLost,
        ConnectTimeout,
        ExecError,
        NotRexecServer,
        ProtocolError,
        RemoteError,
        RexecError,
        ServerRefused,
        TruncatedError,
    )
    from rexec.result import Result


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rexec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
