"""`rexec run HOSTS ...` when HOSTS names several hosts: the fan-out front end.

`rexec.cli.run` hands over here when HOSTS is a host set (`lab[01-40]`, `a,b`, `@group`) or a
fleet option is given; one plain host stays on its lean path. Output modes: live lines
prefixed `host: ` (default), `-b/--gather` (hosts with the same output folded under one
header), `--json` (JSON Lines, one object per host as it finishes) and `--outdir DIR` (files
per host); then one summary line on stderr. The exit status is the highest per-host status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from rexec.cli.common import err, parse_env, writer
from rexec.cli.outcome import (
    EXIT_INTERRUPTED,
    EXIT_SIGPIPE,
    JUnitCase,
    Outcome,
    UsageError,
    fail_early,
    json_line,
    of_host,
    retry_notice,
    write_junit,
)
from rexec.cli.summary import host_entry, summary_line
from rexec.client.connecting import DEFAULT_RETRY_DELAY
from rexec.client.fanout import DEFAULT_FANOUT, config_tokens
from rexec.client.fleet import HostResult, run_many
from rexec.client.hosts import expand_hosts, fold_hosts, read_hosts_file, sort_hosts
from rexec.client.target import load_client_config, target_endpoint
from rexec.errors import ConfigError, HostSetError, RexecError
from rexec.protocol.noise import Suite
from rexec.protocol.token import Token

if TYPE_CHECKING:
    from rexec.client.fleet import FleetRun


class RunArgs(Protocol):
    """The parsed `rexec run` command line (rexec.cli.run.RunArgs) as far as used here."""

    target: str | None
    command: list[str]
    token_file: str | None
    env: list[str]
    cwd: str | None
    timeout: float | None
    connect_timeout: float | None
    retry: int
    retry_delay: float | None
    no_stdin: bool
    json: bool
    junit: str | None
    trace: bool
    suite: str
    fanout: int | None
    exclude: list[str]
    hosts_from: str | None
    gather: bool
    outdir: str | None
    failed_to: str | None
    max_output: int


STDIN_LIMIT = 64 * 1024 * 1024  # the same stdin goes to every host: read once, in memory
RULE = "-" * 16
PROGRESS_EVERY = 0.2


def is_plain(args: RunArgs) -> bool:
    """No group, file, exclusion or fleet-only option: a set of one host runs as one host."""
    return (
        args.hosts_from is None
        and not args.exclude
        and "@" not in (args.target or "")
        and not (args.gather or args.outdir or args.failed_to or args.fanout is not None)
    )


def select_hosts(args: RunArgs) -> list[str]:
    """HOSTS (or --hosts-from FILE) minus every -x set; groups from the client config.
    An empty result is a HostSetError that says what emptied it (`a&b`, -x, the file)."""
    config = load_client_config()
    groups = {name: entry.hosts for name, entry in config.groups.items()}
    where = str(config.path) if config.path else None
    if args.hosts_from is not None:
        hosts = read_hosts_file(args.hosts_from, groups=groups, where=where)
        named = f"--hosts-from {args.hosts_from} names none"
    else:
        hosts = expand_hosts(args.target or "", groups=groups, where=where)
        named = f"the host set '{args.target}' is empty"
    if not hosts:
        raise HostSetError(f"no hosts: {named}")
    for text in args.exclude:
        excluded = set(expand_hosts(text, groups=groups, where=where))
        hosts = [host for host in hosts if host not in excluded]
    if not hosts:
        raise HostSetError("no hosts: the set is empty once -x is applied")
    shown = f"--hosts-from {args.hosts_from}" if args.hosts_from else f"host set '{args.target}'"
    for host in hosts:  # a bad address is one usage error up front, not one per host
        try:
            target_endpoint(host, config)
        except ConfigError as exc:
            raise HostSetError(f"{shown}: {exc}") from None
    return hosts


def read_stdin(limit: int = STDIN_LIMIT) -> bytes:
    """All of stdin (for every host); ValueError past the limit."""
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(0, 1024 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(
                f"stdin is larger than {limit // (1024 * 1024)} MiB: every host gets the same "
                "stdin, read into memory once (copy the file to the hosts, or use -n)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def cmd_fleet(args: RunArgs) -> int | None:
    """Run args.command on the host set; None when the set is one plain host (run.py runs it).

    A failure before any host runs (a usage or config error) is one error line, and with
    --json one object as for a single target (rexec.cli.outcome.fail_early).
    """

    def usage(message: str) -> UsageError:
        return UsageError(message, parse=False)

    try:
        if args.hosts_from is not None and args.target is not None:
            raise usage("give HOSTS or --hosts-from FILE, not both")
        hosts = select_hosts(args)  # HostSetError: a usage error (its kind says so)
        if len(hosts) == 1 and is_plain(args):
            args.target = hosts[0]
            return None
        if not args.command:
            raise usage("no command given")
        resolve = config_tokens(token_file=args.token_file)
        tokens = {host: resolve(host) for host in hosts}
        if args.outdir is not None:
            try:
                os.makedirs(args.outdir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--outdir {args.outdir}: {exc.strerror}") from None
        given = not args.no_stdin and not os.isatty(0)  # stdin to forward (read later)
        try:
            os.fstat(0)
        except OSError:
            given = False  # no readable stdin (a closed descriptor): as -n
    except (UsageError, RexecError) as exc:
        return fail_early(args, exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    fleet = Fleet(args, hosts, args.command, parse_env(args.env), given, tokens)
    return asyncio.run(fleet.main())


class StdinOnce:
    """stdin read to its end once, in a thread, while the hosts start; every host's feeder
    awaits the same bytes. A command that never reads stdin does not wait for its EOF: a pipe
    that a CI runner or a parent leaves open must not hold the run back (ssh's way)."""

    def __init__(self, too_large: Callable[[str], None]) -> None:
        self._too_large = too_large
        self._data: asyncio.Future[bytes] | None = None

    async def __call__(self) -> bytes:
        if self._data is None:
            loop = asyncio.get_running_loop()
            self._data = loop.create_future()
            threading.Thread(target=self._read, args=(loop, self._data), daemon=True).start()
        return await asyncio.shield(self._data)

    def _read(self, loop: asyncio.AbstractEventLoop, data: asyncio.Future[bytes]) -> None:
        got, error = b"", None
        try:
            got = read_stdin()
        except ValueError as exc:  # past the bound: the run is stopped; nobody gets stdin
            error = str(exc)
        except OSError:
            pass  # unreadable after all: EOF, as -n
        with contextlib.suppress(RuntimeError):  # the run ended first: its loop is closed
            if error is not None:
                loop.call_soon_threadsafe(self._too_large, error)
            else:
                loop.call_soon_threadsafe(data.set_result, got)


def size_text(n: int) -> str:
    """`64 MiB`, `8 KiB`, `1000 bytes`: --max-output as given (whole binary units)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def host_file_name(host: str) -> str:
    """A host as a file name: `/` (unix:/path) and `%` escaped as %2F and %25."""
    return host.replace("%", "%25").replace("/", "%2F")


class Screen:
    """stdout and stderr, written whole lines at a time (batched per loop turn), and the
    progress line on a terminal, cleared before anything else is written."""

    def __init__(self, progress: bool) -> None:
        self._out = bytearray()
        self._err = bytearray()
        self._write_out = writer(1)
        self._write_err = writer(2)
        self._scheduled = False
        self.progress = progress and os.isatty(2)
        self._drawn = False
        self.broken: Callable[[], None] | None = None  # called when stdout's reader left

    def stdout(self, data: bytes) -> None:
        self._out += data
        self._schedule()

    def stderr(self, data: bytes) -> None:
        self._err += data
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._out or self._err:
            self.clear_progress()
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            try:
                self._write_out(data)
            except BrokenPipeError:
                if self.broken is not None:
                    self.broken()
        if self._err:
            data = bytes(self._err)
            self._err.clear()
            with contextlib.suppress(BrokenPipeError):
                self._write_err(data)

    def draw_progress(self, text: str) -> None:
        if self.progress:
            with contextlib.suppress(OSError):
                self._write_err(f"\r{text}\x1b[K".encode())
                self._drawn = True

    def clear_progress(self) -> None:
        if self._drawn:
            self._drawn = False
            with contextlib.suppress(OSError):
                self._write_err(b"\r\x1b[K")


class Fleet:
    """One `rexec run HOSTS` invocation: the run, its output mode, Ctrl-C, and the summary."""

    def __init__(
        self,
        args: RunArgs,
        hosts: list[str],
        command: list[str],
        env: dict[str, str],
        stdin: bool,
        tokens: dict[str, Token | str],
    ) -> None:
        self.args = args
        self.hosts = hosts
        self.command = command
        self.env = env
        self.stdin = StdinOnce(self.on_stdin_too_large) if stdin else None
        self.stdin_error: str | None = None
        self.terminated: int | None = None  # SIGTERM/SIGHUP ended the run
        self.main_task: asyncio.Task[int] | None = None
        self.tokens = tokens
        self.live = not (args.json or args.gather or args.outdir is not None)
        self.started = time.time()
        self.screen = Screen(progress=True)
        self.results: list[HostResult] = []
        self.interrupts = 0
        self.aborted = False
        self.pipe_closed = False
        self.finishing = False
        self.prefix: dict[str, bytes] = {}

    # ---- output ------------------------------------------------------------------------

    def on_line(self, host: str, fd: int, line: bytes) -> None:
        prefix = self.prefix.get(host)
        if prefix is None:
            prefix = self.prefix[host] = f"{host}: ".encode()
        text = prefix + line if line.endswith(b"\n") else prefix + line + b"\n"
        (self.screen.stdout if fd == 1 else self.screen.stderr)(text)

    def on_result(self, result: HostResult) -> None:
        self.results.append(result)
        if self.args.json:
            self.screen.stdout(json_line(result.to_json_dict()))
        elif result.error is not None:
            self.screen.stderr(f"{result.host}: rexec: {result.error}\n".encode())
        if self.args.outdir is not None:
            self._write_files(result)
            if not self.args.gather:
                self._dropped_note(result)

    def _dropped_note(self, result: HostResult) -> None:
        """After a host's kept output (-b, --outdir): what was dropped past --max-output."""
        counts = [
            f"{n} bytes of {name}"
            for n, name in ((result.stdout_dropped, "stdout"), (result.stderr_dropped, "stderr"))
            if n
        ]
        if counts:
            size = size_text(self.args.max_output)
            note = f"{result.host}: rexec: output past {size} dropped ({', '.join(counts)})\n"
            self.screen.stderr(note.encode())

    def _write_files(self, result: HostResult) -> None:
        base = os.path.join(self.args.outdir or ".", host_file_name(result.host))
        status = result.label + (f": {result.error}" if result.error else "") + "\n"
        try:
            for suffix, data in (
                (".out", result.stdout),
                (".err", result.stderr),
                (".status", status.encode()),
            ):
                with open(base + suffix, "wb") as f:
                    f.write(data)
        except OSError as exc:
            self.screen.stderr(f"rexec: --outdir: {base}: {exc.strerror}\n".encode())

    def gathered(self) -> None:
        """Hosts with the same status and output, folded under one header each."""
        rank = {host: i for i, host in enumerate(sort_hosts(r.host for r in self.results))}
        groups: dict[tuple[str, bytes, bytes], list[str]] = {}
        by_host = {r.host: r for r in self.results}
        for r in self.results:
            groups.setdefault((r.label, r.stdout, r.stderr), []).append(r.host)
        for (label, out, errout), hosts in sorted(
            groups.items(), key=lambda item: min(rank[h] for h in item[1])
        ):
            header = f"{RULE} {fold_hosts(hosts)} ({len(hosts)}) {label}\n".encode()
            self.screen.stdout(header + out + (b"\n" if out and not out.endswith(b"\n") else b""))
            if errout:
                end = b"\n" if not errout.endswith(b"\n") else b""
                self.screen.stderr(header + errout + end)
            for host in sort_hosts(hosts):
                self._dropped_note(by_host[host])

    def progress_text(self, run: FleetRun) -> str:
        failed = sum(1 for r in self.results if not r.ok)
        return (
            f"rexec: {len(self.results)}/{len(self.hosts)} done, {failed} failed, "
            f"{len(run.running)} running"
        )

    # ---- Ctrl-C ------------------------------------------------------------------------

    def on_sigint(self, run: FleetRun, main: asyncio.Task[int]) -> None:
        self.interrupts += 1
        if self.interrupts >= 3:
            self.screen.stderr(b"rexec: interrupted: closing every connection\n")
            self.aborted = True
            main.cancel()
            return
        run.stop()
        signum = signal.SIGINT if self.interrupts == 1 else signal.SIGKILL
        hosts = run.signal(signum)
        name = signal.Signals(signum).name
        still = f": {fold_hosts(hosts)}" if hosts else ""
        again = "SIGKILL" if self.interrupts == 1 else "closes every connection"
        self.screen.stderr(
            f"rexec: {name} sent; {len(hosts)} host(s) still running{still} "
            f"(Ctrl-C again: {again})\n".encode()
        )

    def on_termination(self, signum: int, main: asyncio.Task[int]) -> None:
        """SIGTERM/SIGHUP (a CI job cancelled): close every connection (the servers end the
        commands), still write the summary and --junit, exit 128 + signum."""
        self.screen.stderr(f"rexec: ended by signal {signum}: closing every connection\n".encode())
        self.terminated = signum
        self.aborted = True
        main.cancel()

    def on_stdin_too_large(self, message: str) -> None:
        """stdin passed its bound: a usage error found late; stop everything (no host got any
        stdin: feeders wait for all of it)."""
        self.stdin_error = message
        self.aborted = True
        if self.main_task is not None and not self.finishing:
            self.main_task.cancel()

    def on_broken_pipe(self, main: asyncio.Task[int]) -> None:
        """stdout's reader left: stop the run (closing the connections stops the commands)."""
        if not self.pipe_closed:
            self.pipe_closed = True
            if not self.finishing:
                main.cancel()

    # ---- the run -------------------------------------------------------------------------

    async def main(self) -> int:
        args = self.args
        loop = asyncio.get_running_loop()
        main = self.main_task = asyncio.current_task()
        assert main is not None
        run = run_many(
            self.hosts,
            self.command[0] if len(self.command) == 1 else self.command,
            fanout=args.fanout or DEFAULT_FANOUT,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            env=self.env or None,
            cwd=args.cwd,
            stdin=self.stdin,
            token_for=self.tokens.__getitem__,
            suite=Suite.AESGCM if args.suite == "aesgcm" else Suite.CHACHAPOLY,
            on_line=self.on_line if self.live else None,
            keep_output=not self.live or args.junit is not None,
            trace=self._trace if args.trace else None,
            retry=args.retry,
            retry_delay=args.retry_delay or DEFAULT_RETRY_DELAY,
            on_retry=self._on_retry if args.retry else None,
            max_output=args.max_output or None,
        )
        self.screen.broken = lambda: self.on_broken_pipe(main)
        loop.add_signal_handler(signal.SIGINT, self.on_sigint, run, main)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.on_termination, signum, main)
        ticker = self._tick(run) if self.screen.progress else None
        try:
            async with contextlib.aclosing(run.__aiter__()) as results:
                async for result in results:
                    self.on_result(result)
        except asyncio.CancelledError:
            if not (self.aborted or self.pipe_closed):
                raise
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if ticker is not None:
                ticker.cancel()
        return self.finish()

    def _tick(self, run: FleetRun) -> _Ticker:
        loop = asyncio.get_running_loop()
        ticker = _Ticker()

        def tick() -> None:
            self.screen.draw_progress(self.progress_text(run))
            ticker.handle = loop.call_later(PROGRESS_EVERY, tick)

        ticker.handle = loop.call_later(PROGRESS_EVERY, tick)
        return ticker

    def _on_retry(self, host: str, exc: RexecError, n: int, wait: float) -> None:
        notice = retry_notice(exc, n, self.args.retry, wait)
        self.screen.stderr(f"{host}: rexec: {notice}\n".encode())

    def _trace(self, host: str, direction: str, ftype: object, channel: int, length: int) -> None:
        arrow = ">" if direction == "send" else "<"
        name = getattr(ftype, "name", ftype)
        self.screen.stderr(f"{host}: rexec: {arrow} {name} ch={channel} len={length}\n".encode())

    def finish(self) -> int:
        """Gathered output, --failed-to, the summary line; returns the exit status."""
        self.finishing = True
        if self.stdin_error is not None:
            self.screen.flush()
            self.screen.clear_progress()
            return fail_early(self.args, UsageError(self.stdin_error, parse=False))
        if self.args.gather and not self.pipe_closed:
            self.gathered()
        self.screen.flush()
        self.screen.clear_progress()
        if self.args.junit is not None:
            self.write_junit()
        if self.pipe_closed:
            return EXIT_SIGPIPE
        done = {r.host for r in self.results}
        failed = [r.host for r in self.results if not r.ok] + [
            h for h in self.hosts if h not in done
        ]
        if self.args.failed_to is not None:
            try:
                with open(self.args.failed_to, "w", encoding="utf-8") as f:
                    f.write(fold_hosts(failed) + "\n" if failed else "")
            except OSError as exc:
                err(f"--failed-to {self.args.failed_to}: {exc.strerror}")
        missing = len(self.hosts) - len(done)
        line = summary_line(map(host_entry, self.results), missing)
        with contextlib.suppress(BrokenPipeError):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        if self.terminated is not None:
            return 128 + self.terminated
        if self.aborted:
            return EXIT_INTERRUPTED
        return max((of_host(r).exit_status for r in self.results), default=0)

    def write_junit(self) -> None:
        """One testcase per host, in host order; a host that never finished is interrupted."""
        assert self.args.junit is not None
        by_host = {r.host: r for r in self.results}
        cases = []
        for host in sort_hosts(self.hosts):
            r = by_host.get(host)
            if r is None:
                status = EXIT_INTERRUPTED if self.terminated is None else 128 + self.terminated
                outcome = Outcome(status, "interrupted", "not finished: interrupted")
                cases.append(JUnitCase(host, outcome, 0.0))
            else:
                cases.append(JUnitCase(host, of_host(r), r.duration, r.stdout, r.stderr))
        write_junit(self.args.junit, self.command, cases, self.started)


class _Ticker:
    """The progress line's timer: cancel() stops the latest scheduled tick."""

    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
