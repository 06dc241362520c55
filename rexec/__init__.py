"""rexec: run commands on remote machines over an authenticated, encrypted, framed channel.

    async with rexec.connect("lab1", token=...) as conn:
        result = await conn.run(["uname", "-a"])

    with rexec.Client("lab1") as client:
        client.run("make test", check=True)

    async for r in rexec.run_many("lab[01-40]", "uptime"):   # many hosts, as each finishes
        print(r.host, r.status, r.stdout)

The public API is loaded lazily (PEP 562) so that `rexec run` pays only for what it uses.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: typing (and re) stay off `rexec run`'s path

__version__ = "0.1.0"

_EXPORTS = {
    "AuthError": "rexec.errors",
    "Client": "rexec.client.blocking",
    "CommandError": "rexec.errors",
    "CommandFailed": "rexec.result",
    "CommandTimeout": "rexec.result",
    "ConfigError": "rexec.errors",
    "ConnectTimeout": "rexec.errors",
    "Connecting": "rexec.client.aio",
    "Connection": "rexec.client.aio",
    "ConnectionLost": "rexec.errors",
    "Disconnected": "rexec.errors",
    "Endpoint": "rexec.address",
    "ErrorCode": "rexec.errors",
    "ExecError": "rexec.errors",
    "ExitStatus": "rexec.protocol.messages",
    "FileResult": "rexec.transfer",
    "FileStatus": "rexec.transfer",
    "FleetRun": "rexec.client.fleet",
    "FrameType": "rexec.protocol.frames",
    "HostResult": "rexec.client.fleet",
    "HostSetError": "rexec.errors",
    "NotRexecServer": "rexec.errors",
    "OutputStream": "rexec.client.aio",
    "PolicyError": "rexec.errors",
    "Process": "rexec.client.aio",
    "ProgressCallback": "rexec.transfer",
    "ProtocolError": "rexec.errors",
    "PtyRequest": "rexec.protocol.pty",
    "RemoteError": "rexec.errors",
    "Result": "rexec.result",
    "RexecError": "rexec.errors",
    "ServerInfo": "rexec.protocol.messages",
    "ServerRefused": "rexec.errors",
    "Stream": "rexec.protocol.events",
    "Suite": "rexec.protocol.noise",
    "SyncOutputStream": "rexec.client.blocking",
    "SyncProcess": "rexec.client.blocking",
    "Token": "rexec.protocol.token",
    "TransferError": "rexec.transfer",
    "TransferProgress": "rexec.transfer",
    "TransferResult": "rexec.transfer",
    "TruncatedError": "rexec.errors",
    "connect": "rexec.client.aio",
    "expand_hosts": "rexec.client.hosts",
    "fold_hosts": "rexec.client.hosts",
    "run_many": "rexec.client.fleet",
    "run_many_sync": "rexec.client.fleet",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs (`X as X`: an explicit re-export)
    from typing import Any

    from rexec.address import Endpoint as Endpoint
    from rexec.client.aio import Connecting as Connecting
    from rexec.client.aio import Connection as Connection
    from rexec.client.aio import OutputStream as OutputStream
    from rexec.client.aio import Process as Process
    from rexec.client.aio import connect as connect
    from rexec.client.blocking import Client as Client
    from rexec.client.blocking import SyncOutputStream as SyncOutputStream
    from rexec.client.blocking import SyncProcess as SyncProcess
    from rexec.client.fleet import FleetRun as FleetRun
    from rexec.client.fleet import HostResult as HostResult
    from rexec.client.fleet import run_many as run_many
    from rexec.client.fleet import run_many_sync as run_many_sync
    from rexec.client.hosts import expand_hosts as expand_hosts
    from rexec.client.hosts import fold_hosts as fold_hosts
    from rexec.errors import AuthError as AuthError
    from rexec.errors import CommandError as CommandError
    from rexec.errors import ConfigError as ConfigError
    from rexec.errors import ConnectionLost as ConnectionLost
    from rexec.errors import ConnectTimeout as ConnectTimeout
    from rexec.errors import Disconnected as Disconnected
    from rexec.errors import ErrorCode as ErrorCode
    from rexec.errors import ExecError as ExecError
    from rexec.errors import HostSetError as HostSetError
    from rexec.errors import NotRexecServer as NotRexecServer
    from rexec.errors import PolicyError as PolicyError
    from rexec.errors import ProtocolError as ProtocolError
    from rexec.errors import RemoteError as RemoteError
    from rexec.errors import RexecError as RexecError
    from rexec.errors import ServerRefused as ServerRefused
    from rexec.errors import TruncatedError as TruncatedError
    from rexec.protocol.events import Stream as Stream
    from rexec.protocol.frames import FrameType as FrameType
    from rexec.protocol.messages import ExitStatus as ExitStatus
    from rexec.protocol.messages import ServerInfo as ServerInfo
    from rexec.protocol.noise import Suite as Suite
    from rexec.protocol.pty import PtyRequest as PtyRequest
    from rexec.protocol.token import Token as Token
    from rexec.result import CommandFailed as CommandFailed
    from rexec.result import CommandTimeout as CommandTimeout
    from rexec.result import Result as Result
    from rexec.transfer import FileResult as FileResult
    from rexec.transfer import FileStatus as FileStatus
    from rexec.transfer import ProgressCallback as ProgressCallback
    from rexec.transfer import TransferError as TransferError
    from rexec.transfer import TransferProgress as TransferProgress
    from rexec.transfer import TransferResult as TransferResult


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
