"""The measures by name (`make bench BENCH_ARGS="--only NAME,..."`), in the order a full run
takes them. Each builds its contenders (rexec, peers, floors) and the comparisons: latency.py
(cold, warm, keystroke), throughput.py (stream, upload, concurrency), xfer.py, fleet.py.

Every group of contenders runs interleaved (see model.interleave); floors run inside the
group they are compared with, so drift affects numerator and denominator alike.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.common import Config, Env, Group, setup
from benchmarks.latency import cold_api, cold_cli, keystroke, warm
from benchmarks.throughput import concurrency, stream_down, stream_up

__all__ = ["MEASURES", "Config", "Env", "Group", "setup"]


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
