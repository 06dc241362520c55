"""The throughput measures: streaming output down and stdin up, and many commands at once
(on one connection and on a connection each)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence

from benchmarks import floors, procs
from benchmarks.common import (
    SLEEP_ARGV,
    SLEEP_CMD,
    Env,
    Group,
    MiB,
    contender,
    mbps,
    mux_err,
    rexec_err,
    row,
    run_cmd,
)
from benchmarks.model import Comparison
from benchmarks.openssh import CURVE, GCM


# ---- 3. stream ------------------------------------------------------------------------------
def stream_down(env: Env) -> Group:
    n = env.cfg.stream_bytes
    m = f"stream down {env.cfg.size_label}"
    loop, rx, assh, pmk, sshd = env.loop, env.rexec, env.assh, env.pmk, env.sshd
    cmd = f"head -c {n} /dev/zero"
    tmo = 600.0

    def mux_down(name: str) -> list[float]:
        assert sshd is not None
        argv = sshd.cmd(cmd, *env.mux[name])
        return mbps(n, lambda: run_cmd(argv, "ssh", tmo, stdout=subprocess.DEVNULL))

    cs = [
        contender(
            row("down.rexec", m, "rexec conn.start(head) -> discard", "MB/s", "higher", "rexec"),
            (lambda: mbps(n, lambda: loop.run(rx.download(env.rexec_conn, n), tmo)))
            if rx
            else None,
            rexec_err(env, "conn"),
        ),
        contender(
            row(
                "down.rexec_cli",
                m,
                "rexec run ... > /dev/null",
                "MB/s",
                "higher",
                "rexec",
                "CLI, includes its start-up; info",
            ),
            (lambda: mbps(n, lambda: rx.cli_run(cmd, timeout=tmo, stdout=subprocess.DEVNULL)))
            if rx
            else None,
            rexec_err(env, "cli"),
        ),
        contender(
            row(
                "down.ssh_gcm",
                m,
                f"ssh -c {GCM} (ControlMaster) > /dev/null",
                "MB/s",
                "higher",
                "peer",
            ),
            lambda: mux_down("gcm"),
            mux_err(env, "gcm"),
        ),
        contender(
            row(
                "down.ssh_default",
                m,
                "ssh default cipher (ControlMaster) > /dev/null",
                "MB/s",
                "higher",
                "peer",
                str(env.meta.get("openssh_default", {}).get("cipher", "")),
            ),
            lambda: mux_down("default"),
            mux_err(env, "default"),
        ),
        contender(
            row(
                "down.asyncssh",
                m,
                "asyncssh create_process(head) -> discard",
                "MB/s",
                "higher",
                "peer",
                str(env.meta.get("asyncssh_negotiated", {}).get("cipher") or ""),
            ),
            (lambda: mbps(n, lambda: loop.run(assh.download(env.assh_conn, n), tmo)))
            if assh and env.assh_conn is not None
            else None,
            env.assh_error,
        ),
        contender(
            row(
                "down.paramiko",
                m,
                "paramiko exec(head) -> discard",
                "MB/s",
                "higher",
                "peer",
                str(env.meta.get("paramiko_negotiated", {}).get("cipher") or ""),
            ),
            (lambda: mbps(n, lambda: pmk.download(env.pmk_stream, n)))
            if pmk and env.pmk_stream is not None
            else None,
            env.pmk_error,
        ),
        contender(
            row(
                "floor.tcp",
                m,
                "floor: raw loopback TCP, Python sockets",
                "MB/s",
                "higher",
                "floor",
                "1 MiB sendall/recv_into, 4 MiB socket buffers, two processes",
            ),
            lambda: [floors.tcp_throughput(n)],
            None,
        ),
        contender(
            row(
                "floor.relay",
                m,
                "floor: head -c | Python -> TCP -> Python",
                "MB/s",
                "higher",
                "floor",
                "the same path with no framing, no crypto, no protocol: three processes",
            ),
            lambda: [floors.tcp_throughput(n, sender=floors.RELAY)],
            None,
        ),
        contender(
            row(
                "floor.pipe",
                m,
                "floor: head -c | Python read, 64K pipe",
                "MB/s",
                "higher",
                "floor",
            ),
            lambda: [floors.pipe_throughput(n)],
            None,
        ),
        contender(
            row(
                "floor.pipe_1m",
                m,
                "floor: head -c | Python read, 1M pipe",
                "MB/s",
                "higher",
                "floor",
                "F_SETPIPE_SZ 1 MiB",
            ),
            lambda: [floors.pipe_throughput(n, pipe_size=MiB)],
            None,
        ),
    ]
    cmps = [
        # issue 9's bar: through the API and through `rexec run > file`, the path most take
        Comparison("down.rexec", "down.ssh_gcm", ">=", 1.3, ">= 1.3x"),
        Comparison("down.rexec", "floor.tcp", ">=", 0.30, ">= 0.30x"),
        Comparison("down.rexec_cli", "down.ssh_gcm", ">=", 1.3, ">= 1.3x"),
        Comparison("down.rexec_cli", "floor.tcp", ">=", 0.30, ">= 0.30x"),
        Comparison("down.rexec", "down.ssh_default"),
        Comparison("down.rexec", "down.asyncssh"),
        Comparison("down.rexec", "down.paramiko"),
        Comparison("down.rexec", "floor.relay"),
        Comparison("down.rexec_cli", "floor.relay"),
        Comparison("floor.relay", "floor.tcp"),
        Comparison("down.rexec", "floor.pipe"),
        Comparison("down.rexec", "floor.pipe_1m"),
    ]
    return Group(
        f"stream: {env.cfg.size_label} of zeros, remote -> client (MB = 10^6 bytes)",
        cs,
        env.cfg.stream_rounds,
        30 if env.cfg.quick else 180,
        cmps,
    )


def stream_up(env: Env) -> Group:
    n = env.cfg.stream_bytes
    m = f"stream up {env.cfg.size_label}"
    loop, rx, assh, pmk, sshd = env.loop, env.rexec, env.assh, env.pmk, env.sshd
    tmo = 600.0

    def mux_up(name: str) -> list[float]:
        assert sshd is not None
        argv = sshd.cmd("wc -c", *env.mux[name])

        def go() -> None:
            head = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
            try:
                out = run_cmd(argv, "ssh", tmo, stdin=head.stdout)
            finally:
                assert head.stdout is not None
                head.stdout.close()
                procs.stop_popen(head, grace=10)
            if int(out or b"-1") != n:
                raise RuntimeError(f"ssh upload: remote counted {out!r}")

        return mbps(n, go)

    cs = [
        contender(
            row(
                "up.rexec", m, "rexec start(wc -c, stdin=True) <- write", "MB/s", "higher", "rexec"
            ),
            (lambda: mbps(n, lambda: loop.run(rx.upload(env.rexec_conn, n), tmo))) if rx else None,
            rexec_err(env, "conn"),
        ),
        contender(
            row(
                "up.ssh_gcm",
                m,
                f"head | ssh -c {GCM} wc -c (ControlMaster)",
                "MB/s",
                "higher",
                "peer",
            ),
            lambda: mux_up("gcm"),
            mux_err(env, "gcm"),
        ),
        contender(
            row("up.ssh_default", m, "head | ssh wc -c (ControlMaster)", "MB/s", "higher", "peer"),
            lambda: mux_up("default"),
            mux_err(env, "default"),
        ),
        contender(
            row("up.asyncssh", m, "asyncssh stdin.write -> wc -c", "MB/s", "higher", "peer"),
            (lambda: mbps(n, lambda: loop.run(assh.upload(env.assh_conn, n), tmo)))
            if assh and env.assh_conn is not None
            else None,
            env.assh_error,
        ),
        contender(
            row("up.paramiko", m, "paramiko sendall -> wc -c", "MB/s", "higher", "peer"),
            (lambda: mbps(n, lambda: pmk.upload(env.pmk_stream, n)))
            if pmk and env.pmk_client is not None
            else None,
            env.pmk_error,
        ),
    ]
    cmps = [
        Comparison("up.rexec", "up.ssh_gcm", ">=", 1.0, ">= 1.0x"),
        Comparison("up.rexec", "floor.tcp", ">=", 0.25, ">= 0.25x"),
        Comparison("up.rexec", "up.ssh_default"),
        Comparison("up.rexec", "up.asyncssh"),
        Comparison("up.rexec", "up.paramiko"),
    ]
    return Group(
        f"stream: {env.cfg.size_label} client stdin -> remote `wc -c`",
        cs,
        env.cfg.stream_rounds,
        30 if env.cfg.quick else 150,
        cmps,
    )


# ---- 4. concurrency -------------------------------------------------------------------------
def concurrency(env: Env) -> Group:
    n = env.cfg.conc_n
    m1, mn = f"{n} cmds, 1 conn", f"{n} cmds, {n} conns"
    loop, rx, assh, pmk, sshd = env.loop, env.rexec, env.assh, env.pmk, env.sshd
    tmo = 300.0

    def secs(fn: Callable[[], object]) -> list[float]:
        t0 = time.perf_counter()
        fn()
        return [time.perf_counter() - t0]

    def ok_all(outs: Sequence[bytes], what: str) -> None:
        bad = [o for o in outs if o != b"ok\n"]
        if bad or len(outs) != n:
            raise RuntimeError(f"{what}: {len(bad)} of {len(outs)} wrong, e.g. {bad[:1]!r}")

    async def rexec_one_conn() -> None:
        assert rx is not None
        import asyncio

        await asyncio.gather(*(rx.run(env.rexec_conn, SLEEP_ARGV, b"ok\n") for _ in range(n)))

    async def rexec_many_conns() -> None:
        assert rx is not None
        import asyncio

        async def one() -> None:
            async with rx.connect() as conn:
                await rx.run(conn, SLEEP_ARGV, b"ok\n")

        await asyncio.gather(*(one() for _ in range(n)))

    async def assh_one_conn() -> None:
        assert assh is not None
        import asyncio

        outs = await asyncio.gather(*(assh.run(env.assh_conn, SLEEP_CMD) for _ in range(n)))
        ok_all(outs, "asyncssh")

    async def assh_many_conns() -> None:
        assert assh is not None
        import asyncio

        async def one() -> bytes:
            async with assh.connect() as conn:
                return await assh.run(conn, SLEEP_CMD)

        ok_all(await asyncio.gather(*(one() for _ in range(n))), "asyncssh")

    def ssh_parallel(opts: list[str]) -> None:
        assert sshd is not None
        argv = sshd.cmd(SLEEP_CMD, *opts)
        ps: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(n):
                ps.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                )
            deadline = time.monotonic() + tmo
            outs = []
            for p in ps:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if p.returncode != 0:
                    raise RuntimeError(
                        f"ssh: exit {p.returncode} {err.decode(errors='replace')[-80:]}"
                    )
                outs.append(out)
            ok_all(outs, "ssh")
        finally:
            for p in ps:
                if p.poll() is None:
                    procs.stop_popen(p, grace=2)

    cs = [
        contender(
            row("conc1.rexec", m1, "rexec gather(conn.run) on one conn", "s", "lower", "rexec"),
            (lambda: secs(lambda: loop.run(rexec_one_conn(), tmo))) if rx else None,
            rexec_err(env, "conn"),
        ),
        contender(
            row("conc1.ssh_mux", m1, f"{n} x ssh via one ControlMaster", "s", "lower", "peer"),
            lambda: secs(lambda: ssh_parallel(env.mux["curve"])),
            mux_err(env, "curve"),
        ),
        contender(
            row(
                "conc1.asyncssh", m1, "asyncssh gather(conn.run) on one conn", "s", "lower", "peer"
            ),
            (lambda: secs(lambda: loop.run(assh_one_conn(), tmo)))
            if env.assh_conn is not None
            else None,
            env.assh_error,
        ),
        contender(
            row("conc1.paramiko", m1, f"paramiko {n} channels on one conn", "s", "lower", "peer"),
            (lambda: secs(lambda: ok_all(pmk.run_many(env.pmk_client, SLEEP_CMD, n), "paramiko")))
            if pmk and env.pmk_client is not None
            else None,
            env.pmk_error,
        ),
        contender(
            row("concn.rexec", mn, f"rexec gather({n} x connect+run)", "s", "lower", "rexec"),
            (lambda: secs(lambda: loop.run(rexec_many_conns(), tmo))) if rx else None,
            rexec_err(env, "api"),
        ),
        contender(
            row("concn.ssh", mn, f"{n} x ssh -o KexAlgorithms={CURVE}", "s", "lower", "peer"),
            (lambda: secs(lambda: ssh_parallel(["-o", f"KexAlgorithms={CURVE}"])))
            if sshd
            else None,
            env.sshd_error,
        ),
        contender(
            row("concn.asyncssh", mn, f"asyncssh gather({n} x connect+run)", "s", "lower", "peer"),
            (lambda: secs(lambda: loop.run(assh_many_conns(), tmo)))
            if assh and env.assh_error is None
            else None,
            env.assh_error,
        ),
        contender(
            row("concn.paramiko", mn, f"paramiko {n} threads x connect+exec", "s", "lower", "peer"),
            (lambda: secs(lambda: ok_all(pmk.run_many_connections(SLEEP_CMD, n), "paramiko")))
            if pmk and env.pmk_error is None
            else None,
            env.pmk_error,
        ),
        contender(
            row(
                "floor.spawn_many",
                f"{n} cmds, local",
                f"floor: asyncio spawn+wait {n} x sh -c",
                "s",
                "lower",
                "floor",
            ),
            lambda: [loop.run(floors.spawn_many(n), tmo)],
            None,
        ),
        contender(
            row(
                "floor.spawn_many_pidfd",
                f"{n} cmds, local",
                f"floor: Popen + pidfd {n} x sh -c (info)",
                "s",
                "lower",
                "floor",
            ),
            lambda: [loop.run(floors.spawn_many_pidfd(n), tmo)],
            None,
        ),
    ]
    cmps = [
        Comparison("conc1.rexec", "floor.spawn_many", "<=", 1.3, "<= 1.3x floor"),
        Comparison("concn.rexec", "floor.spawn_many", "<=", 1.3, "<= 1.3x floor"),
    ]
    cmps += [
        Comparison("conc1.rexec", "floor.spawn_many_pidfd"),
        Comparison("concn.rexec", "floor.spawn_many_pidfd"),
    ]
    cmps += [Comparison("conc1.rexec", f"conc1.{p}") for p in ("ssh_mux", "asyncssh", "paramiko")]
    cmps += [Comparison("concn.rexec", f"concn.{p}") for p in ("ssh", "asyncssh", "paramiko")]
    return Group(
        f"concurrency: {n} x sh -c '{SLEEP_CMD}', all at once",
        cs,
        env.cfg.conc_rounds,
        30 if env.cfg.quick else 150,
        cmps,
    )
