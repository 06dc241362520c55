"""`rexec cp` to or from a host set: one transfer per host, on run_many's fan-out.

rexec.cli.cp hands over here when HOST names a host set (`lab[01-40]`, `a,b`, `@group`) or
a fleet option is given; one plain host stays on the sync path. An upload sends the same
sources to every host; a download from host H writes into DST/H/ (DST a directory, made
if needed), so that names never clash. The hosts run under rexec.client.fanout.each_host
(at most --fanout at once, the open-files limit raised to fit) and connect as run_many's do;
the run ends with `rexec run`'s summary line (rexec.cli.summary), hosts counted as it counts.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rexec.cli.cpreport import CpArgs, Plan, Report, usage_failure
from rexec.cli.fleet import host_file_name, is_plain, select_hosts
from rexec.cli.outcome import EXIT_TRANSFER_FAILED, UsageError, retry_notice
from rexec.cli.summary import Entry, host_entry, summary_line
from rexec.client.connecting import DEFAULT_RETRY_DELAY
from rexec.client.fanout import DEFAULT_FANOUT, config_tokens, connect_host, each_host
from rexec.client.fleet import failed_host
from rexec.errors import RexecError
from rexec.protocol.noise import Suite


def copy_many(args: CpArgs, plan: Plan) -> int | None:
    """The copy on every host of the set; None when the set is one plain host (cp.py runs
    it on the sync path). A failure before any host starts is one line (exit 2 or 255)."""
    try:
        hosts = select_hosts(args)  # HostSetError: a usage error (its kind says so)
        if len(hosts) == 1 and is_plain(args):
            args.target = hosts[0]
            return None
        resolve = config_tokens(token_file=args.token_file)
        tokens = {host: resolve(host) for host in hosts}
        if plan.direction == "get":
            make_dest_dir(plan.dest)
    except (UsageError, RexecError) as exc:
        return usage_failure(args, exc)
    dest_for = None
    if plan.direction == "get":
        dest_for = lambda host: host_dest(plan.dest, host)  # noqa: E731
    report = Report(args, plan, hosts, dest_for=dest_for)
    try:
        asyncio.run(_copy_all(args, plan, hosts, tokens, report))
    except KeyboardInterrupt:
        return report.interrupted(summary(report, len(hosts)))
    return report.close(summary(report, len(hosts)))


def summary(report: Report, hosts: int) -> str:
    """`rexec run`'s summary line, counting hosts: `ok`, `failed` (some files failed: their
    lines are above), and a host that failed as a whole as `rexec run` names it
    (`unreachable`, `auth_failed`, `refused`, `truncated`, ...)."""
    entries: list[Entry] = []
    for host, ended in report.ended.items():
        if isinstance(ended, tuple):
            exc, started = ended
            if not isinstance(exc, RexecError):  # (only RexecError ends a host here)
                exc = RexecError(str(exc))
            entries.append(host_entry(failed_host(host, "", exc, started=started)))
        elif ended.ok:
            entries.append((host, "ok", 0, "ok"))
        else:
            entries.append((host, "exit", EXIT_TRANSFER_FAILED, "failed"))
    return summary_line(entries, hosts - len(entries))


def make_dest_dir(dest: str) -> None:
    """DST of a download from several hosts: a directory, made if needed."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UsageError(
            f"{dest}: not a directory (a copy from several hosts writes DST/HOST/...)",
            parse=False,
        )
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{dest}: {exc.strerror}", parse=False) from None


def host_dest(dest: str, host: str) -> str:
    """Where a download from host lands: DST/HOST/ (`/` and `%` in HOST escaped)."""
    return os.path.join(dest, host_file_name(host), "")


async def _copy_all(
    args: CpArgs, plan: Plan, hosts: list[str], tokens: dict[str, Any], report: Report
) -> None:
    def on_retry(host: str, exc: RexecError, n: int, wait: float) -> None:
        report.notice(f"{host}: rexec: {retry_notice(exc, n, args.retry, wait)}")

    def trace(host: str, direction: str, ftype: object, channel: int, length: int) -> None:
        arrow = ">" if direction == "send" else "<"
        name = getattr(ftype, "name", ftype)
        report.notice(f"{host}: rexec: {arrow} {name} ch={channel} len={length}")

    async def copy(host: str) -> None:
        conn = None
        started = False
        try:
            conn = await connect_host(
                host,
                token_for=tokens.__getitem__,
                connect_timeout=args.connect_timeout,
                suite=Suite.AESGCM if args.suite == "aesgcm" else Suite.CHACHAPOLY,
                trace=trace if args.trace else None,
                retry=args.retry,
                retry_delay=args.retry_delay or DEFAULT_RETRY_DELAY,
                on_retry=on_retry if args.retry else None,
            )
            report.start(host)
            started = True
            options = args.transfer_options(report.callback(host))
            if plan.direction == "put":
                result = await conn.put(plan.sources, plan.dest, **options)
            else:
                dest = host_dest(plan.dest, host)
                try:
                    os.makedirs(dest, exist_ok=True)
                except OSError as exc:
                    raise RexecError(f"{dest}: {exc.strerror}") from None
                result = await conn.get(plan.sources, dest, **options)
            report.transferred(host, result)
        except RexecError as exc:
            report.failed(host, exc, started=started)
        finally:
            if conn is not None:
                await conn.close()

    def crashed(host: str, exc: BaseException) -> None:  # a bug: say so, never hang
        report.failed(host, RexecError(f"internal error: {exc!r}"))

    fanout = args.fanout or DEFAULT_FANOUT
    results = each_host(hosts, copy, fanout=fanout, crashed=crashed)
    try:
        async for _ in results:
            pass
    finally:
        await results.aclose()
