"""Fan-out to many hosts, whatever is done on each: `each_host` runs one job per host (at
most `fanout` at once, the open-files limit raised to fit), `connect_host` opens a host's
connection with its own token, trace and retry notices, `config_tokens` finds each host's
token. `run_many` (rexec.client.fleet) and `rexec cp` to a host set (rexec.cli.cpmany) are
built on it, so that the two fan-outs cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from rexec.client.aio import connect
from rexec.client.connecting import DEFAULT_RETRY_DELAY
from rexec.client.hosts import expand_hosts
from rexec.client.target import ClientConfig, load_client_config, resolve_host_token
from rexec.errors import AuthError, ConnectionLost, RexecError
from rexec.protocol.noise import Suite
from rexec.protocol.token import Token

if TYPE_CHECKING:
    from pathlib import Path

    from rexec.client.aio import Connection

Status = Literal["ok", "exit", "signal", "timeout", "unreachable", "auth_failed", "error"]
STATUSES: tuple[Status, ...] = (
    "ok",
    "exit",
    "signal",
    "timeout",
    "unreachable",
    "auth_failed",
    "error",
)
DEFAULT_FANOUT = 256
FD_RESERVE = 64  # descriptors kept free for everything but the connections

TokenFor = Callable[[str], "Token | str"]
HostTraceFn = Callable[[str, str, Any, int, int], None]
HostRetryFn = Callable[[str, RexecError, int, float], object]  # (host, error, retry n, wait)
R = TypeVar("R")


# ---- tokens ------------------------------------------------------------------------------


def _group_token_files(config: ClientConfig) -> dict[str, Path]:
    """host -> token_file of the first `[groups.NAME]` with a token_file that holds it."""
    groups = {name: entry.hosts for name, entry in config.groups.items()}
    where = str(config.path) if config.path else None
    files: dict[str, Path] = {}
    for name, entry in config.groups.items():
        if entry.token_file is not None:
            for host in expand_hosts(f"@{name}", groups=groups, where=where):
                files.setdefault(host, entry.token_file)
    return files


def config_tokens(
    *,
    token: str | Token | None = None,
    token_file: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Callable[[str], Token | str]:
    """The default `token_for` of run_many: a host's token from the client config.

    `token` > `token_file` > $REXEC_TOKEN > $REXEC_TOKEN_FILE > the host alias's token_file
    > a token group's token_file > [defaults].token_file > the default token file.
    This is the hook for per-host fleet tokens: pass another `token_for(host) -> token`.
    Each token file is read once per run, however many hosts share it.
    """
    if token is not None:
        fixed = token
        return lambda host: fixed
    env = os.environ if env is None else env
    config = load_client_config(config_path, env)
    group_files: dict[str, Path] | None = None
    cache: dict[tuple[Path | None, Path | None], Token] = {}

    def token_for(host: str) -> Token:
        nonlocal group_files
        if group_files is None:
            group_files = _group_token_files(config)
        entry = config.hosts.get(host)
        group_file = group_files.get(host)
        key = (entry.token_file if entry is not None else None, group_file)
        if key not in cache:
            cache[key] = resolve_host_token(
                host, token_file=token_file, group_token_file=group_file, config=config, env=env
            )[0]
        return cache[key]

    return token_for


# ---- descriptors ---------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit when `wanted` descriptors do not fit
    under it (1000+ hosts need no ulimit tuning); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return wanted if soft == resource.RLIM_INFINITY else soft
    target = hard if hard != resource.RLIM_INFINITY else wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# ---- the run -------------------------------------------------------------------------------


async def each_host(
    hosts: Sequence[str],
    job: Callable[[str], Awaitable[R]],
    *,
    fanout: int,
    crashed: Callable[[str, BaseException], R],
    skip: Callable[[str], R | None] | None = None,
) -> AsyncGenerator[R, None]:
    """`job(host)` for every host, at most `fanout` at once (the open-files limit raised to
    fit), each host's result yielded as its job ends: the fan-out of run_many and `rexec cp`.

    `skip(host)`, asked as a host's turn comes, gives a result in place of starting it (the
    run was stopped); `crashed(host, exc)` is the result of a job that raised (a bug: say so,
    never hang). Leaving the iteration early cancels every job.
    """
    slots = min(fanout, len(hosts))
    limit = raise_nofile(slots + FD_RESERVE)
    slots = max(1, min(slots, limit - FD_RESERVE))
    queue: asyncio.Queue[R] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    free = asyncio.Semaphore(slots)

    async def run(host: str) -> None:
        queue.put_nowait(await job(host))

    def finished(host: str, task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        free.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            queue.put_nowait(crashed(host, exc))

    async def launch() -> None:
        for host in hosts:
            await free.acquire()
            instead = skip(host) if skip is not None else None
            if instead is not None:
                free.release()
                queue.put_nowait(instead)
                continue
            task = asyncio.create_task(run(host))
            tasks.add(task)
            task.add_done_callback(functools.partial(finished, host))

    launcher = asyncio.create_task(launch())
    done = False
    try:
        for _ in hosts:
            yield await queue.get()
        done = True
    finally:
        if not done:
            launcher.cancel()
            for task in tasks:
                task.cancel()
        await asyncio.gather(launcher, *tasks, return_exceptions=True)


async def connect_host(
    host: str,
    *,
    token_for: TokenFor,
    connect_timeout: float | None = None,
    suite: Suite = Suite.AESGCM,
    trace: HostTraceFn | None = None,
    retry: int = 0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    on_retry: HostRetryFn | None = None,
) -> Connection:
    """One host's connection in a fan-out: its token from token_for, and trace and on_retry
    told which host they hear of."""
    return await connect(
        host,
        token=token_for(host),
        connect_timeout=connect_timeout,
        suite=suite,
        trace=functools.partial(trace, host) if trace else None,
        retry=retry,
        retry_delay=retry_delay,
        on_retry=functools.partial(on_retry, host) if on_retry else None,
    )


def connect_status(exc: RexecError) -> Status:
    """A host that could not be connected: `auth_failed`, `unreachable` (refused, no route,
    DNS, connect timeout) or `error` (a bad address, no token, a protocol error)."""
    if isinstance(exc, AuthError):
        return "auth_failed"
    if isinstance(exc, ConnectionLost):
        return "unreachable"
    return "error"
