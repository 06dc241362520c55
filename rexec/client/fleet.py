"""One command on many hosts at once: `async for r in rexec.run_many("lab[01-40]", "uptime")`.

Built on the public async API only (`rexec.connect`, `Connection.start`, `Process`): one
connection per host, at most `fanout` of them open at a time, and every host's outcome as a
`HostResult` as soon as it is known (an unreachable host is a result, not an exception).
Ctrl-C handling belongs to the caller: `FleetRun.signal()` reaches every running command and
`FleetRun.stop()` keeps the hosts not yet started from starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any

from rexec._record import FrozenRecord, setfield
from rexec.client.connecting import DEFAULT_RETRY_DELAY, Retry
from rexec.client.fanout import (
    DEFAULT_FANOUT,
    HostRetryFn,
    HostTraceFn,
    Status,
    config_tokens,
    connect_host,
    connect_status,
    each_host,
)
from rexec.client.hosts import expand_hosts
from rexec.errors import ExecError, RexecError
from rexec.protocol.noise import Suite
from rexec.protocol.token import Token
from rexec.result import (
    EXIT_FAILURE,
    EXIT_TIMEOUT,
    MAX_OUTPUT,
    Head,
    Result,
    dropped_fields,
    error_fields,
    error_kind,
    timeout_message,
)

if TYPE_CHECKING:
    from rexec.client.aio import Connection, OutputStream, Process

EXIT_GRACE = 10.0  # past --timeout: the server's kill grace and the EXIT's way back
STDIN_CHUNK = 256 * 1024
MAX_LINE = 64 * 1024  # a longer line reaches the line callback in pieces
NOT_STARTED = "not started: the run was stopped first"

LineFn = Callable[[str, int, bytes], None]
# stdin for every host: the bytes, or an async function giving them (awaited once the host's
# command runs, so that a command that never reads stdin never waits for it)
StdinSource = bytes | Callable[[], Awaitable[bytes]]


class HostResult(FrozenRecord):
    """What happened on one host. `status` says which fields mean something:

    ok / exit / signal / timeout: the command ran (exit_code or signal, its output);
    unreachable / auth_failed / error: it did not, or the connection broke (`error` says why).
    `error_kind` names the error's kind (`connect`, `auth`, `policy`, `truncated`, `timeout`,
    `exec`, ...: rexec.result.error_kind), None when there is none.
    `duration` is the client's: from starting to connect to the command's exit.
    `stdout_dropped`/`stderr_dropped`: the bytes read past run_many's `max_output` and not
    kept (stdout/stderr hold the first max_output bytes).
    """

    __match_args__ = (
        "host",
        "status",
        "command",
        "exit_code",
        "signal",
        "duration",
        "stdout",
        "stderr",
        "error",
        "error_kind",
        "stdout_dropped",
        "stderr_dropped",
    )
    __slots__ = __match_args__
    host: str
    status: Status
    command: str | tuple[str, ...]
    exit_code: int | None
    signal: int | None
    duration: float
    stdout: bytes
    stderr: bytes
    error: str | None
    error_kind: str | None
    stdout_dropped: int
    stderr_dropped: int

    def __init__(
        self,
        host: str,
        status: Status,
        command: str | tuple[str, ...],
        exit_code: int | None = None,
        signal: int | None = None,
        duration: float = 0.0,
        stdout: bytes = b"",
        stderr: bytes = b"",
        error: str | None = None,
        error_kind: str | None = None,
        stdout_dropped: int = 0,
        stderr_dropped: int = 0,
    ) -> None:
        setfield(self, "host", host)
        setfield(self, "status", status)
        setfield(self, "command", command)
        setfield(self, "exit_code", exit_code)
        setfield(self, "signal", signal)
        setfield(self, "duration", duration)
        setfield(self, "stdout", stdout)
        setfield(self, "stderr", stderr)
        setfield(self, "error", error)
        setfield(self, "error_kind", error_kind)
        setfield(self, "stdout_dropped", stdout_dropped)
        setfield(self, "stderr_dropped", stderr_dropped)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def shell_status(self) -> int:
        """As `rexec run` on one host: the code, 128+N, 124 for a timeout, 255 otherwise."""
        if self.status in ("ok", "exit"):
            return self.exit_code or 0
        if self.status == "signal":
            return 128 + (self.signal or 0)
        if self.status == "timeout":
            return EXIT_TIMEOUT
        return EXIT_FAILURE

    @property
    def label(self) -> str:
        """`exit 0`, `exit 2`, `signal 9`, `timeout`, `unreachable`, `auth_failed`, and for
        any other error its kind (`policy`, `truncated`, ...), else `error`."""
        if self.status in ("ok", "exit"):
            return f"exit {self.exit_code}"
        if self.status == "signal":
            return f"signal {self.signal}"
        if self.status == "error":
            return self.error_kind or "error"
        return self.status

    def to_result(self, target: str | None = None) -> Result:
        return Result(
            self.command,
            self.exit_code,
            self.signal,
            self.status == "timeout",
            self.duration,
            self.stdout,
            self.stderr,
            target,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Result.to_json_dict (output as UTF-8 text or base64) with host and status, then
        `exit_status` and `error` ({kind, message} or null), as `rexec run --json` has them;
        `stdout_dropped`/`stderr_dropped` only when output was dropped."""
        return {
            "host": self.host,
            "status": self.status,
            **self.to_result().to_json_dict(),
            **error_fields(self.shell_status, self.error_kind, self.error),
            **dropped_fields(self.stdout_dropped, self.stderr_dropped),
        }


def failed_host(
    host: str,
    command: str | tuple[str, ...],
    exc: RexecError,
    *,
    started: bool,
    duration: float = 0.0,
    stdout: bytes = b"",
    stderr: bytes = b"",
    dropped: tuple[int, int] = (0, 0),
) -> HostResult:
    """The HostResult of a host that failed with `exc`: before it `started` (connecting,
    authenticating) connect_status's `unreachable`, `auth_failed` or `error`; after, `error`;
    error_kind's kind either way. `rexec cp` to a host set classifies its hosts with it too."""
    return HostResult(
        host,
        "error" if started else connect_status(exc),
        command,
        duration=duration,
        stdout=stdout,
        stderr=stderr,
        error=str(exc),
        error_kind=error_kind(exc, started=started),
        stdout_dropped=dropped[0],
        stderr_dropped=dropped[1],
    )


def _finished(
    host: str, result: Result, duration: float, dropped: tuple[int, int] = (0, 0)
) -> HostResult:
    """The HostResult of a command that ran to its exit."""
    status: Status
    error = kind = None
    if result.timed_out:
        status = "timeout"
        error, kind = timeout_message(result.duration), "timeout"
    elif result.exit_code == 0:
        status = "ok"
    elif result.exit_code is not None:
        status = "exit"
    else:
        status = "signal"
    return HostResult(
        host,
        status,
        result.command,
        result.exit_code,
        result.signal,
        duration,
        result.stdout,
        result.stderr,
        error,
        kind,
        *dropped,
    )


class FleetRun:
    """One command on many hosts (from `run_many`): iterate it once for the results.

    `signal(n)` delivers signal n to every command still running; `stop()` starts no more
    hosts (those waiting for a slot end as `error`, NOT_STARTED). Leaving the iteration
    early (break, an exception, aclose) closes every connection, which stops the commands.
    """

    def __init__(
        self,
        hosts: list[str],
        command: str | Sequence[str],
        *,
        fanout: int,
        timeout: float | None,
        connect_timeout: float | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: StdinSource | None,
        token_for: Callable[[str], Token | str],
        suite: Suite,
        on_line: LineFn | None,
        keep_output: bool,
        trace: HostTraceFn | None,
        retry: int = 0,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        on_retry: HostRetryFn | None = None,
        max_output: int | None = MAX_OUTPUT,
    ) -> None:
        if fanout < 1:
            raise ValueError(f"fanout must be at least 1, got {fanout}")
        Retry(retry, retry_delay, 0.0)  # bad values fail here, not once per host
        if max_output is not None and max_output < 0:
            raise ValueError(f"max_output must be 0 or more, got {max_output}")
        self.hosts = hosts
        self.command = command
        self._name: str | tuple[str, ...] = command if isinstance(command, str) else tuple(command)
        self.fanout = fanout
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._env = env
        self._cwd = cwd
        self._stdin = stdin
        self._token_for = token_for
        self._suite = suite
        self._on_line = on_line
        self._keep = keep_output
        self._max_output = max_output or None  # 0: unlimited, as `rexec run --max-output 0`
        self._trace = trace
        self._retry = retry
        self._retry_delay = retry_delay
        self._on_retry = on_retry
        self._running: dict[str, Process] = {}
        self._connecting: dict[str, asyncio.Task[Connection]] = {}
        self._stopped = False
        self._iterated = False

    @property
    def running(self) -> list[str]:
        """The hosts whose command has started and not yet ended."""
        return list(self._running)

    def signal(self, signum: int) -> list[str]:
        """Deliver signum to every running command; returns the hosts it went to."""
        for proc in self._running.values():
            proc.signal(signum)
        return list(self._running)

    def stop(self) -> None:
        """Start no more hosts; those already running carry on. A host still connecting is
        abandoned at once (not started), not waited for until its connect timeout."""
        self._stopped = True
        for connecting in self._connecting.values():
            connecting.cancel()

    def __aiter__(self) -> AsyncGenerator[HostResult, None]:
        if self._iterated:
            raise RuntimeError("a FleetRun can be iterated only once")
        self._iterated = True
        return self._results()

    async def _results(self) -> AsyncGenerator[HostResult, None]:
        def skip(host: str) -> HostResult | None:
            return self._not_started(host) if self._stopped else None

        def crashed(host: str, exc: BaseException) -> HostResult:
            error = f"internal error: {exc!r}"
            return HostResult(host, "error", self._name, error=error, error_kind="internal")

        results = each_host(self.hosts, self._host, fanout=self.fanout, crashed=crashed, skip=skip)
        done = False
        try:
            async for result in results:
                yield result
            done = True
        finally:
            if not done:
                self._stopped = True
            await results.aclose()

    async def _host(self, host: str) -> HostResult:
        start = time.monotonic()
        conn: Connection | None = None
        try:
            connecting = asyncio.ensure_future(
                connect_host(
                    host,
                    token_for=self._token_for,
                    connect_timeout=self._connect_timeout,
                    suite=self._suite,
                    trace=self._trace,
                    retry=self._retry,
                    retry_delay=self._retry_delay,
                    on_retry=self._on_retry,
                )
            )
            self._connecting[host] = connecting
            try:
                conn = await connecting
            except asyncio.CancelledError:
                this = asyncio.current_task()
                if self._stopped and not (this is not None and this.cancelling()):
                    return self._not_started(host)  # stop() abandoned the connect
                raise
            except RexecError as exc:  # refused, no route, DNS, timeout, auth, a bad address
                return failed_host(
                    host, self._name, exc, started=False, duration=time.monotonic() - start
                )
            finally:
                self._connecting.pop(host, None)
            return await self._run_on(host, conn, start)
        finally:
            if conn is not None:
                await conn.close()

    def _not_started(self, host: str) -> HostResult:
        return HostResult(host, "error", self._name, error=NOT_STARTED, error_kind="interrupted")

    async def _run_on(self, host: str, conn: Connection, start: float) -> HostResult:
        if self._stopped:
            return self._not_started(host)
        out, err = Head(self._max_output), Head(self._max_output)
        feeder: asyncio.Task[None] | None = None
        deadline = self._timeout + EXIT_GRACE if self._timeout else None
        try:
            proc = await conn.start(
                self.command,
                env=self._env,
                cwd=self._cwd,
                timeout=self._timeout,
                stdin=self._stdin is not None,
            )
            self._running[host] = proc
            if self._stdin is not None:
                feeder = asyncio.create_task(self._feed(proc, self._stdin))
            async with asyncio.timeout(deadline):
                # pumped here, not by wait(): what came before a broken connection or a
                # deadline is kept in out/err for the HostResult
                pumps = (
                    asyncio.create_task(self._pump(host, 1, proc.stdout, out)),
                    asyncio.create_task(self._pump(host, 2, proc.stderr, err)),
                )
                try:
                    await asyncio.wait(pumps)  # both drain their stream, even past an error
                finally:  # cancelled (the run was closed, the deadline): no orphan pump
                    for pump in pumps:
                        pump.cancel()
                for pump in pumps:
                    pump.result()  # the connection's error, if it cut the command short
                result = await proc.wait()
        except ExecError as exc:  # the server could not start it: as the shell's 126/127
            return HostResult(
                host,
                "exit",
                self._name,
                exc.exit_code or 127,
                duration=time.monotonic() - start,
                error=str(exc),
                error_kind="exec",
            )
        except TimeoutError:
            return HostResult(
                host,
                "timeout",
                self._name,
                duration=time.monotonic() - start,
                stdout=bytes(out.data),
                stderr=bytes(err.data),
                error=f"no exit status from the server within {deadline or 0:g}s",
                error_kind="timeout",
                stdout_dropped=out.dropped,
                stderr_dropped=err.dropped,
            )
        except RexecError as exc:  # the connection broke, or the server refused the command
            return failed_host(
                host,
                self._name,
                exc,
                started=True,
                duration=time.monotonic() - start,
                stdout=bytes(out.data),
                stderr=bytes(err.data),
                dropped=(out.dropped, err.dropped),
            )
        finally:
            self._running.pop(host, None)
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
        output = result.with_output(bytes(out.data), bytes(err.data))
        return _finished(host, output, time.monotonic() - start, (out.dropped, err.dropped))

    async def _feed(self, proc: Process, source: StdinSource) -> None:
        """The same stdin bytes to this host, in chunks, then EOF."""
        data = source if isinstance(source, bytes) else await source()
        with contextlib.suppress(RexecError):
            view = memoryview(data)
            for offset in range(0, len(data), STDIN_CHUNK):
                await proc.write(bytes(view[offset : offset + STDIN_CHUNK]))
            await proc.close_stdin()

    async def _pump(self, host: str, fd: int, stream: OutputStream, keep: Head) -> None:
        """Keep the stream's output (with keep_output, up to max_output); hand every complete
        line to on_line, if any (and a last partial one at the end). Read to the end either
        way: the server's flow-control window keeps opening."""
        on_line = self._on_line
        partial = b""
        async for chunk in stream:
            if self._keep:
                keep.add(chunk)
            if on_line is None:
                continue
            data = partial + chunk if partial else bytes(chunk)
            begin = 0
            while (end := data.find(b"\n", begin)) >= 0:
                on_line(host, fd, data[begin : end + 1])
                begin = end + 1
            partial = data[begin:]
            while len(partial) >= MAX_LINE:
                on_line(host, fd, partial[:MAX_LINE])
                partial = partial[MAX_LINE:]
        if partial and on_line is not None:
            on_line(host, fd, partial)


def run_many(
    hosts: str | Iterable[str],
    command: str | Sequence[str],
    *,
    fanout: int = DEFAULT_FANOUT,
    timeout: float | None = None,
    connect_timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: StdinSource | None = None,
    token: str | Token | None = None,
    token_file: str | None = None,
    token_for: Callable[[str], Token | str] | None = None,
    suite: Suite = Suite.AESGCM,
    on_line: LineFn | None = None,
    keep_output: bool = True,
    trace: HostTraceFn | None = None,
    retry: int = 0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    on_retry: HostRetryFn | None = None,
    max_output: int | None = MAX_OUTPUT,
) -> FleetRun:
    """Run `command` on every host; `async for result in run_many(...)` as each finishes.

    `hosts` is a host set (`"lab[01-40],@gpu"`) or an iterable of hosts. `timeout` is the
    server-enforced deadline per host; `stdin` bytes (or an async function returning
    them, awaited when a host's command has started) go to every host. `token_for(host)` gives
    each host's token (default: `config_tokens(token=..., token_file=...)`). `on_line(host,
    fd, line)` sees output live, line by line (fd 1 or 2; the last line may lack its "\\n");
    with `keep_output=False` the results carry no output. `retry=N`: each host's connect is
    tried up to N more times when it fails before the command was sent (as `rexec.connect`);
    `on_retry(host, error, n, wait)` hears of each retry. `max_output`: the bytes of each
    host's stdout and of its stderr kept in its result (the first ones; default 64 MiB, None
    or 0 for no limit); the rest is read and dropped, counted in `stdout_dropped` and
    `stderr_dropped`, and the command runs on.
    """
    names = expand_hosts(hosts) if isinstance(hosts, str) else list(dict.fromkeys(hosts))
    return FleetRun(
        names,
        command,
        fanout=fanout,
        timeout=timeout,
        connect_timeout=connect_timeout,
        env=env,
        cwd=cwd,
        stdin=stdin,
        token_for=token_for or config_tokens(token=token, token_file=token_file),
        suite=suite,
        on_line=on_line,
        keep_output=keep_output,
        trace=trace,
        retry=retry,
        retry_delay=retry_delay,
        on_retry=on_retry,
        max_output=max_output,
    )


def run_many_sync(
    hosts: str | Iterable[str], command: str | Sequence[str], **options: Any
) -> Iterator[HostResult]:
    """run_many for synchronous code, on an event loop of its own: results as they finish.

    Nothing happens on the network between two results the caller has not asked for yet.
    """
    run = run_many(hosts, command, **options)
    with asyncio.Runner() as runner:
        results = run.__aiter__()

        async def step() -> HostResult:
            return await results.__anext__()

        try:
            while True:
                try:
                    result = runner.run(step())
                except StopAsyncIteration:
                    return
                yield result
        finally:
            runner.run(results.aclose())
