"""What every measure shares: the run's configuration, the servers and connections it sets
up once (private sshd, asyncssh and paramiko peers, the rexec server), and small timing
helpers."""

from __future__ import annotations

import contextlib
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
def ms(seconds: float) -> float:
    return seconds * 1000.0


def run_cmd(cmd: list[str], what: str, timeout: float = 60.0, **kw: Any) -> bytes:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    res = subprocess.run(cmd, stderr=subprocess.PIPE, timeout=timeout, check=False, **kw)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what}: exit {res.returncode} {err[-1] if err else ''}"[:160])
    return res.stdout or b""


def timed_ms(fn: Callable[[], object]) -> list[float]:
    t0 = time.perf_counter()
    fn()
    return [ms(time.perf_counter() - t0)]


def rexec_err(env: Env, which: str) -> str | None:
    rx = env.rexec
    if rx is None:
        return "rexec not set up"
    return {
        "cli": rx.cli_error,
        "api": rx.api_error,
        "conn": env.rexec_conn_error,
        "sync": rx.sync_error,
    }[which]


def mux_err(env: Env, name: str) -> str | None:
    if env.sshd is None:
        return env.sshd_error or "no sshd"
    return env.mux_error.get(name) if name not in env.mux else None


def mbps(nbytes: int, fn: Callable[[], object]) -> list[float]:
    t0 = time.perf_counter()
    fn()
    return [nbytes / (time.perf_counter() - t0) / 1e6]
