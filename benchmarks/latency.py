"""The latency measures: a cold `rexec run` and connect, a warm command on an open
connection, and a keystroke's round trip through a remote pty."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks import floors
from benchmarks.common import (
    Env,
    Group,
    contender,
    ms,
    mux_err,
    rexec_err,
    row,
    run_cmd,
    timed_ms,
)
from benchmarks.model import Comparison
from benchmarks.openssh import CURVE


# ---- 1. cold --------------------------------------------------------------------------------
def _ssh_sampler(cmd: list[str]) -> Callable[[], list[float]]:
    return lambda: timed_ms(lambda: run_cmd(cmd, "ssh"))


def cold_cli(env: Env) -> Group:
    m = "cold CLI"
    rx, sshd = env.rexec, env.sshd
    cs = [
        contender(
            row("cold_cli.rexec", m, "rexec run 127.0.0.1:PORT true", "ms", "lower", "rexec"),
            (lambda: timed_ms(lambda: rx.cli_run("true"))) if rx else None,
            rexec_err(env, "cli"),
        )
    ]
    for key, name, extra in (
        ("ssh_default", "ssh true (default kex)", []),
        ("ssh_curve25519", f"ssh -o KexAlgorithms={CURVE} true", ["-o", f"KexAlgorithms={CURVE}"]),
    ):
        cmd = sshd.cmd("true", *extra) if sshd else []
        cs.append(
            contender(
                row(f"cold_cli.{key}", m, name, "ms", "lower", "peer"),
                _ssh_sampler(cmd) if sshd else None,
                None if sshd else env.sshd_error,
            )
        )
    return Group(
        "cold: a new process per command",
        cs,
        env.cfg.cold_rounds,
        30 if env.cfg.quick else 90,
        [
            Comparison("cold_cli.rexec", "cold_cli.ssh_curve25519", "<=", 0.5, "<= 0.5x"),
            Comparison("cold_cli.rexec", "cold_cli.ssh_default"),
        ],
    )


def cold_api(env: Env) -> Group:
    m = "cold API"
    loop, rx, assh, pmk = env.loop, env.rexec, env.assh, env.pmk

    async def assh_once() -> None:
        assert assh is not None
        async with assh.connect() as conn:
            await assh.run(conn, "true")

    def pmk_once() -> None:
        assert pmk is not None
        client = pmk.connect()
        try:
            pmk.run(client, "true")
        finally:
            client.close()

    def rexec_sync_once() -> None:
        assert rx is not None
        with rx.mod.Client(rx.addr, token=rx.token) as c:
            rx._check(c.run(["true"]), b"")

    cs = [
        contender(
            row("cold_api.rexec", m, "rexec.connect + run(['true'])", "ms", "lower", "rexec"),
            (lambda: timed_ms(lambda: loop.run(rx.cold_api(), 30))) if rx else None,
            rexec_err(env, "api"),
        ),
        contender(
            row(
                "cold_api.rexec_sync",
                m,
                "rexec.Client + run(['true'])",
                "ms",
                "lower",
                "rexec",
                "sync API; info",
            ),
            (lambda: timed_ms(rexec_sync_once)) if rx else None,
            rexec_err(env, "sync"),
        ),
        contender(
            row("cold_api.asyncssh", m, "asyncssh.connect + run('true')", "ms", "lower", "peer"),
            (lambda: timed_ms(lambda: loop.run(assh_once(), 30))) if assh else None,
            env.assh_error,
        ),
        contender(
            row(
                "cold_api.paramiko",
                m,
                "paramiko connect + exec 'true'",
                "ms",
                "lower",
                "peer",
                "vs sshd",
            ),
            (lambda: timed_ms(pmk_once)) if pmk else None,
            env.pmk_error,
        ),
    ]
    return Group(
        "cold: connect + auth + run + exit, in process",
        cs,
        env.cfg.cold_rounds,
        20 if env.cfg.quick else 60,
        [
            Comparison("cold_api.rexec", "cold_api.asyncssh", "<=", 0.4, "<= 0.4x"),
            Comparison("cold_api.rexec", "cold_api.paramiko"),
            Comparison("cold_api.rexec_sync", "cold_api.asyncssh"),
        ],
    )


# ---- 2. warm --------------------------------------------------------------------------------
def warm(env: Env) -> Group:
    m = "warm"
    k = env.cfg.warm_per_round
    loop, rx, assh, pmk, sshd = env.loop, env.rexec, env.assh, env.pmk, env.sshd

    async def rexec_k() -> list[float]:
        assert rx is not None
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            await rx.run(env.rexec_conn, ["true"], b"")
            out.append(ms(time.perf_counter() - t0))
        return out

    def rexec_sync_k() -> list[float]:
        from benchmarks.peers import run_in_thread

        def body() -> list[float]:
            assert rx is not None
            out = []
            for _ in range(k):
                t0 = time.perf_counter()
                rx._check(env.rexec_client.run(["true"]), b"")
                out.append(ms(time.perf_counter() - t0))
            return out

        result: list[float] = run_in_thread(body, 60)
        return result

    async def assh_k() -> list[float]:
        assert assh is not None
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            await assh.run(env.assh_conn, "true")
            out.append(ms(time.perf_counter() - t0))
        return out

    def pmk_k(client: Any) -> list[float]:
        assert pmk is not None
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            pmk.run(client, "true")
            out.append(ms(time.perf_counter() - t0))
        return out

    def mux_k() -> list[float]:
        assert sshd is not None
        cmd = sshd.cmd("true", *env.mux["curve"])
        return [timed_ms(lambda: run_cmd(cmd, "ssh (mux)"))[0] for _ in range(k)]

    cs = [
        contender(
            row("warm.rexec", m, "rexec conn.run(['true'])", "ms", "lower", "rexec"),
            (lambda: loop.run(rexec_k(), 60)) if rx else None,
            rexec_err(env, "conn"),
        ),
        contender(
            row(
                "warm.rexec_sync",
                m,
                "rexec Client.run(['true'])",
                "ms",
                "lower",
                "rexec",
                "sync API; info",
            ),
            rexec_sync_k if rx and env.rexec_client is not None else None,
            rexec_err(env, "sync") or (None if env.rexec_client else "no rexec.Client"),
        ),
        contender(
            row(
                "warm.ssh_mux",
                m,
                "ssh true via ControlMaster",
                "ms",
                "lower",
                "peer",
                "a new ssh mux client process per command",
            ),
            mux_k,
            mux_err(env, "curve"),
        ),
        contender(
            row("warm.asyncssh", m, "asyncssh conn.run('true')", "ms", "lower", "peer"),
            (lambda: loop.run(assh_k(), 60)) if env.assh_conn is not None else None,
            env.assh_error,
        ),
        contender(
            row("warm.paramiko", m, "paramiko exec 'true' (TCP_NODELAY)", "ms", "lower", "peer"),
            (lambda: pmk_k(env.pmk_client)) if env.pmk_client is not None else None,
            env.pmk_error,
        ),
        contender(
            row(
                "warm.paramiko_nagle",
                m,
                "paramiko exec 'true', Nagle on",
                "ms",
                "lower",
                "peer",
                "paramiko's default socket (no TCP_NODELAY); info",
            ),
            (lambda: pmk_k(env.pmk_client_nagle)) if env.pmk_client_nagle is not None else None,
            env.pmk_error,
        ),
        contender(
            row(
                "floor.spawn_true",
                m,
                "floor: asyncio spawn `true`",
                "ms",
                "lower",
                "floor",
                "create_subprocess_exec + communicate, local",
            ),
            lambda: [ms(s) for s in loop.run(floors.spawn_true(k), 60)],
            None,
        ),
        contender(
            row(
                "floor.spawn_true_pidfd",
                m,
                "floor: Popen + pidfd `true` (info)",
                "ms",
                "lower",
                "floor",
                "subprocess.Popen, exit awaited via pidfd in the loop, local",
            ),
            lambda: [ms(s) for s in loop.run(floors.spawn_true_pidfd(k), 60)],
            None,
        ),
    ]
    cmps = [Comparison("warm.rexec", "floor.spawn_true", "<=", 2.0, "<= 2x floor")]
    cmps += [
        Comparison("warm.rexec", f"warm.{p}", "<", 1.0, "faster")
        for p in ("ssh_mux", "asyncssh", "paramiko")
    ]
    cmps += [
        Comparison("warm.rexec", "floor.spawn_true_pidfd"),
        Comparison("warm.rexec_sync", "floor.spawn_true"),
    ]
    return Group(
        "warm: one command on an open connection",
        cs,
        env.cfg.warm_rounds,
        20 if env.cfg.quick else 60,
        cmps,
    )


# ---- 7. keystroke --------------------------------------------------------------------------
def keystroke(env: Env) -> Group:
    """A key typed into an interactive pty session until its echo is back (keystroke.py)."""
    from benchmarks import keystroke as ks
    from benchmarks.runtime import REXEC_BIN

    m = "keystroke"
    keys, rounds, gap = (60, 2, 0.01) if env.cfg.quick else (200, 5, 0.01)
    rx, sshd = env.rexec, env.sshd
    rows = [
        (
            row(
                "keystroke.rexec",
                m,
                "rexec run -t ADDR cat: key to echo, p50",
                "ms",
                "lower",
                "rexec",
            ),
            row(
                "keystroke.rexec_p99",
                m,
                "rexec: key to echo, p99",
                "ms",
                "lower",
                "rexec",
                "median over rounds of each round's p99",
            ),
        ),
        (
            row("keystroke.ssh", m, "ssh -tt HOST cat: key to echo, p50", "ms", "lower", "peer"),
            row(
                "keystroke.ssh_p99",
                m,
                "ssh -tt: key to echo, p99",
                "ms",
                "lower",
                "peer",
                "median over rounds of each round's p99",
            ),
        ),
    ]
    term = {"TERM": "xterm"}
    clients: list[tuple[list[str] | None, dict[str, str], str | None]] = [
        (
            [str(REXEC_BIN), "run", "-t", rx.addr, "cat"] if rx else None,
            {**rx.env, **term} if rx else {},
            rexec_err(env, "cli"),
        ),
        (
            sshd.cmd("cat", "-tt") if sshd else None,
            {**os.environ, **term},
            None if sshd else env.sshd_error,
        ),
    ]
    return Group(
        f"keystroke: {keys} keys a session, one at a time",
        ks.contenders(rows, clients, keys, gap),
        rounds,
        60 if env.cfg.quick else 120,
        ks.TARGETS,
    )
