"""The five measures: each builds its contenders (rexec, peers, floors) and the comparisons.

Every group of contenders runs interleaved (see model.interleave); floors run inside the
group they are compared with, so drift affects numerator and denominator alike.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import floors, procs
from benchmarks.model import Better, Comparison, Contender, Role, Row, Unavailable, log
from benchmarks.openssh import CURVE, GCM, OpenSSH
from benchmarks.peers import AsyncsshPeer, ParamikoPeer
from benchmarks.rexec_peer import Rexec
from benchmarks.runtime import Loop

MiB = 1 << 20
SLEEP_CMD = floors.SLEEP_CMD
SLEEP_ARGV = ["sh", "-c", SLEEP_CMD]


@dataclass
class Config:
    quick: bool
    stream_bytes: int
    cold_rounds: int
    warm_rounds: int
    warm_per_round: int
    stream_rounds: int
    conc_n: int
    conc_rounds: int
    total_budget_s: float  # no new rounds after this (the run stays under 10 minutes)
    verbose: bool = False

    @classmethod
    def make(cls, quick: bool, verbose: bool = False) -> Config:
        if quick:
            return cls(True, 64 * MiB, 7, 3, 10, 2, 50, 2, 60.0, verbose)
        return cls(False, 512 * MiB, 20, 10, 20, 5, 200, 5, 480.0, verbose)

    @property
    def size_label(self) -> str:
        return f"{self.stream_bytes // MiB}M"


@dataclass
class Env:
    """Everything the measures need: servers, peers, open connections."""

    cfg: Config
    loop: Loop
    sshd: OpenSSH | None = None
    sshd_error: str | None = None
    assh: AsyncsshPeer | None = None
    assh_error: str | None = None
    pmk: ParamikoPeer | None = None
    pmk_error: str | None = None
    rexec: Rexec | None = None
    # open connections (warm, stream, one-connection concurrency)
    rexec_conn: Any = None
    rexec_conn_error: str | None = None
    rexec_client: Any = None
    assh_conn: Any = None
    pmk_client: Any = None
    pmk_client_nagle: Any = None
    pmk_stream: Any = None
    mux: dict[str, list[str]] = field(default_factory=dict)
    mux_error: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    title: str
    contenders: list[Contender]
    rounds: int
    budget_s: float
    comparisons: list[Comparison]


def row(
    key: str, measure: str, name: str, unit: str, better: Better, role: Role, note: str = ""
) -> Row:
    return Row(key=key, measure=measure, name=name, unit=unit, better=better, role=role, note=note)


def contender(r: Row, sample: Callable[[], Sequence[float]] | None, error: str | None) -> Contender:
    if error is not None or sample is None:
        r.unavailable = error or "unavailable"
        return Contender(r, None)
    return Contender(r, sample)


# ---- set-up ---------------------------------------------------------------------------------
def setup(env: Env) -> None:
    loop = env.loop
    log("starting private sshd ...")
    try:
        env.sshd = OpenSSH()
        env.sshd.start()
        env.meta["openssh"] = env.sshd.version
        env.meta["openssh_default"] = env.sshd.negotiated()
        env.meta["openssh_curve_gcm"] = env.sshd.negotiated(
            "-o", f"KexAlgorithms={CURVE}", "-c", GCM
        )
        log(f"  sshd on 127.0.0.1:{env.sshd.port}, default: {env.meta['openssh_default']}")
    except Exception as exc:
        env.sshd_error = f"sshd: {exc}"[:160]
        env.sshd = None
        log(f"  {env.sshd_error}")
    if env.sshd is not None:
        for name, extra in (
            ("curve", ["-o", f"KexAlgorithms={CURVE}"]),
            ("gcm", ["-o", f"KexAlgorithms={CURVE}", "-c", GCM]),
            ("default", []),
        ):
            try:
                env.mux[name] = env.sshd.open_master(name, *extra)
            except Exception as exc:
                env.mux_error[name] = str(exc)[:160]

    log("starting asyncssh server ...")
    try:
        env.assh = AsyncsshPeer()
        env.assh.start()
        env.meta["asyncssh"] = env.assh.version
        conn = loop.run(_enter(env.assh.connect()), timeout=30)
        env.assh_conn = conn
        procs.on_cleanup("asyncssh connection", lambda: _close_assh(env))
        env.meta["asyncssh_negotiated"] = {
            "kex": str(conn.get_extra_info("kex_alg", "")) or None,
            "cipher": _assh_cipher(conn),
        }
        log(f"  asyncssh server on 127.0.0.1:{env.assh.port}")
    except Exception as exc:
        env.assh_error = f"asyncssh: {exc}"[:160]
        log(f"  {env.assh_error}")

    try:
        if env.sshd is None:
            raise Unavailable(env.sshd_error or "no sshd")
        env.pmk = ParamikoPeer(env.sshd)
        env.pmk.start()
        env.meta["paramiko"] = env.pmk.version
        env.pmk_client = env.pmk.connect()
        procs.on_cleanup("paramiko client", lambda: env.pmk_client.close())
        env.pmk_client_nagle = env.pmk.connect(nodelay=False)
        procs.on_cleanup("paramiko client", lambda: env.pmk_client_nagle.close())
        env.pmk_stream = env.pmk.connect()
        procs.on_cleanup("paramiko client", lambda: env.pmk_stream.close())
        # paramiko rekeys every 2^29 bytes (512 MiB), i.e. inside every full-size stream
        # sample, and such a rekey once stalled 30 s into "Key-exchange timed out" under
        # load. OpenSSH's own limit for AES-GCM is far above a run; match that.
        packetizer = env.pmk_stream.get_transport().packetizer
        packetizer.REKEY_BYTES = packetizer.REKEY_PACKETS = 1 << 40
        transport = env.pmk_client.get_transport()
        env.meta["paramiko_negotiated"] = {
            "cipher": getattr(transport, "remote_cipher", None),
            "kex": getattr(getattr(transport, "kex_engine", None), "name", None),
        }
    except Exception as exc:
        env.pmk_error = f"paramiko: {exc}"[:160]
        log(f"  {env.pmk_error}")

    log("starting rexec server ...")
    env.rexec = Rexec(loop)
    env.rexec.start()
    env.meta["rexec"] = env.rexec.version or None
    env.meta["rexec_server"] = env.rexec.note or env.rexec.server_error
    if env.rexec.api_error is None:
        try:
            stack = contextlib.AsyncExitStack()
            env.rexec_conn = loop.run(stack.enter_async_context(env.rexec.connect()), timeout=15)
            procs.on_cleanup("rexec connection", lambda: loop.run(stack.aclose(), timeout=15))
        except Exception as exc:
            env.rexec_conn_error = f"rexec.connect: {exc}"[:160]
    else:
        env.rexec_conn_error = env.rexec.api_error
    if env.rexec.sync_error is None:
        try:
            sync_stack = contextlib.ExitStack()
            env.rexec_client = sync_stack.enter_context(
                env.rexec.mod.Client(env.rexec.addr, token=env.rexec.token)
            )
            procs.on_cleanup("rexec Client", sync_stack.close)
        except Exception as exc:
            env.rexec.sync_error = f"rexec.Client: {exc}"[:160]


async def _enter(cm: Any) -> Any:
    return await cm


def _assh_cipher(conn: Any) -> str | None:
    with contextlib.suppress(Exception):
        return str(conn.get_extra_info("send_cipher") or "") or None
    return None


def _close_assh(env: Env) -> None:
    conn = env.assh_conn
    if conn is None:
        return
    conn.close()
    with contextlib.suppress(Exception):
        env.loop.run(conn.wait_closed(), timeout=10)


# ---- helpers --------------------------------------------------------------------------------
def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _run_cmd(cmd: list[str], what: str, timeout: float = 60.0, **kw: Any) -> bytes:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    res = subprocess.run(cmd, stderr=subprocess.PIPE, timeout=timeout, check=False, **kw)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what}: exit {res.returncode} {err[-1] if err else ''}"[:160])
    return res.stdout or b""


def _timed_ms(fn: Callable[[], object]) -> list[float]:
    t0 = time.perf_counter()
    fn()
    return [_ms(time.perf_counter() - t0)]


def _rexec_err(env: Env, which: str) -> str | None:
    rx = env.rexec
    if rx is None:
        return "rexec not set up"
    return {
        "cli": rx.cli_error,
        "api": rx.api_error,
        "conn": env.rexec_conn_error,
        "sync": rx.sync_error,
    }[which]


def _mux_err(env: Env, name: str) -> str | None:
    if env.sshd is None:
        return env.sshd_error or "no sshd"
    return env.mux_error.get(name) if name not in env.mux else None


# ---- 1. cold --------------------------------------------------------------------------------
def _ssh_sampler(cmd: list[str]) -> Callable[[], list[float]]:
    return lambda: _timed_ms(lambda: _run_cmd(cmd, "ssh"))


def cold_cli(env: Env) -> Group:
    m = "cold CLI"
    rx, sshd = env.rexec, env.sshd
    cs = [
        contender(
            row("cold_cli.rexec", m, "rexec run 127.0.0.1:PORT true", "ms", "lower", "rexec"),
            (lambda: _timed_ms(lambda: rx.cli_run("true"))) if rx else None,
            _rexec_err(env, "cli"),
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
            (lambda: _timed_ms(lambda: loop.run(rx.cold_api(), 30))) if rx else None,
            _rexec_err(env, "api"),
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
            (lambda: _timed_ms(rexec_sync_once)) if rx else None,
            _rexec_err(env, "sync"),
        ),
        contender(
            row("cold_api.asyncssh", m, "asyncssh.connect + run('true')", "ms", "lower", "peer"),
            (lambda: _timed_ms(lambda: loop.run(assh_once(), 30))) if assh else None,
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
            (lambda: _timed_ms(pmk_once)) if pmk else None,
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
            out.append(_ms(time.perf_counter() - t0))
        return out

    def rexec_sync_k() -> list[float]:
        from benchmarks.peers import run_in_thread

        def body() -> list[float]:
            assert rx is not None
            out = []
            for _ in range(k):
                t0 = time.perf_counter()
                rx._check(env.rexec_client.run(["true"]), b"")
                out.append(_ms(time.perf_counter() - t0))
            return out

        result: list[float] = run_in_thread(body, 60)
        return result

    async def assh_k() -> list[float]:
        assert assh is not None
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            await assh.run(env.assh_conn, "true")
            out.append(_ms(time.perf_counter() - t0))
        return out

    def pmk_k(client: Any) -> list[float]:
        assert pmk is not None
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            pmk.run(client, "true")
            out.append(_ms(time.perf_counter() - t0))
        return out

    def mux_k() -> list[float]:
        assert sshd is not None
        cmd = sshd.cmd("true", *env.mux["curve"])
        return [_timed_ms(lambda: _run_cmd(cmd, "ssh (mux)"))[0] for _ in range(k)]

    cs = [
        contender(
            row("warm.rexec", m, "rexec conn.run(['true'])", "ms", "lower", "rexec"),
            (lambda: loop.run(rexec_k(), 60)) if rx else None,
            _rexec_err(env, "conn"),
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
            _rexec_err(env, "sync") or (None if env.rexec_client else "no rexec.Client"),
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
            _mux_err(env, "curve"),
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
            lambda: [_ms(s) for s in loop.run(floors.spawn_true(k), 60)],
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
            lambda: [_ms(s) for s in loop.run(floors.spawn_true_pidfd(k), 60)],
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


# ---- 3. stream ------------------------------------------------------------------------------
def _mbps(nbytes: int, fn: Callable[[], object]) -> list[float]:
    t0 = time.perf_counter()
    fn()
    return [nbytes / (time.perf_counter() - t0) / 1e6]


def stream_down(env: Env) -> Group:
    n = env.cfg.stream_bytes
    m = f"stream down {env.cfg.size_label}"
    loop, rx, assh, pmk, sshd = env.loop, env.rexec, env.assh, env.pmk, env.sshd
    cmd = f"head -c {n} /dev/zero"
    tmo = 600.0

    def mux_down(name: str) -> list[float]:
        assert sshd is not None
        argv = sshd.cmd(cmd, *env.mux[name])
        return _mbps(n, lambda: _run_cmd(argv, "ssh", tmo, stdout=subprocess.DEVNULL))

    cs = [
        contender(
            row("down.rexec", m, "rexec conn.start(head) -> discard", "MB/s", "higher", "rexec"),
            (lambda: _mbps(n, lambda: loop.run(rx.download(env.rexec_conn, n), tmo)))
            if rx
            else None,
            _rexec_err(env, "conn"),
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
            (lambda: _mbps(n, lambda: rx.cli_run(cmd, timeout=tmo, stdout=subprocess.DEVNULL)))
            if rx
            else None,
            _rexec_err(env, "cli"),
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
            _mux_err(env, "gcm"),
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
            _mux_err(env, "default"),
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
            (lambda: _mbps(n, lambda: loop.run(assh.download(env.assh_conn, n), tmo)))
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
            (lambda: _mbps(n, lambda: pmk.download(env.pmk_stream, n)))
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
                out = _run_cmd(argv, "ssh", tmo, stdin=head.stdout)
            finally:
                assert head.stdout is not None
                head.stdout.close()
                procs.stop_popen(head, grace=10)
            if int(out or b"-1") != n:
                raise RuntimeError(f"ssh upload: remote counted {out!r}")

        return _mbps(n, go)

    cs = [
        contender(
            row(
                "up.rexec", m, "rexec start(wc -c, stdin=True) <- write", "MB/s", "higher", "rexec"
            ),
            (lambda: _mbps(n, lambda: loop.run(rx.upload(env.rexec_conn, n), tmo))) if rx else None,
            _rexec_err(env, "conn"),
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
            _mux_err(env, "gcm"),
        ),
        contender(
            row("up.ssh_default", m, "head | ssh wc -c (ControlMaster)", "MB/s", "higher", "peer"),
            lambda: mux_up("default"),
            _mux_err(env, "default"),
        ),
        contender(
            row("up.asyncssh", m, "asyncssh stdin.write -> wc -c", "MB/s", "higher", "peer"),
            (lambda: _mbps(n, lambda: loop.run(assh.upload(env.assh_conn, n), tmo)))
            if assh and env.assh_conn is not None
            else None,
            env.assh_error,
        ),
        contender(
            row("up.paramiko", m, "paramiko sendall -> wc -c", "MB/s", "higher", "peer"),
            (lambda: _mbps(n, lambda: pmk.upload(env.pmk_stream, n)))
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
            _rexec_err(env, "conn"),
        ),
        contender(
            row("conc1.ssh_mux", m1, f"{n} x ssh via one ControlMaster", "s", "lower", "peer"),
            lambda: secs(lambda: ssh_parallel(env.mux["curve"])),
            _mux_err(env, "curve"),
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
            _rexec_err(env, "api"),
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
            _rexec_err(env, "cli"),
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


# ---- fleet: one command on N hosts at once ---------------------------------------------------
def _fleet(env: Env, count: int) -> Group:
    from benchmarks.fleet import fleet_group

    contenders, comparisons = fleet_group(env, count)
    quick = env.cfg.quick
    rounds = (2 if quick else 3) if count <= 100 else (1 if quick else 2)
    return Group(
        f"fleet: `true` and `uname -a` on {count} loopback hosts at once",
        contenders,
        rounds,
        60 if quick else 600,
        comparisons,
    )


def fleet(env: Env) -> Group:
    return _fleet(env, 100)


def fleet1000(env: Env) -> Group:
    return _fleet(env, 1000)


# ---- xfer: issue 14's file transfer (benchmarks/xfer.py) ------------------------------------
def xfer_big(env: Env) -> Group:
    from benchmarks.xfer import big_group

    return big_group(env)


def xfer_tree(env: Env) -> Group:
    from benchmarks.xfer import tree_group

    return tree_group(env)


MEASURES: dict[str, Callable[[Env], Group]] = {
    "cold": cold_cli,
    "cold-api": cold_api,
    "warm": warm,
    "stream": stream_down,
    "upload": stream_up,
    "concurrency": concurrency,
    "keystroke": keystroke,
    "xfer-big": xfer_big,
    "xfer-tree": xfer_tree,
    # last: 1000 hosts at once leave the machine loaded for minutes (load 10-18 here), which
    # would skew whatever ran next
    "fleet": fleet,
    "fleet1000": fleet1000,
}
