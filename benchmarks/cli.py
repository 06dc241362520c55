"""`python -m benchmarks [--quick] [--only a,b] [--out DIR] [--update-docs]`."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks import procs
from benchmarks.measures import MEASURES, Config, Env, Group, setup
from benchmarks.model import Row, interleave, log
from benchmarks.report import (
    evaluate,
    load_json,
    machine,
    markdown,
    text_tables,
    update_doc,
    write_json,
)
from benchmarks.runtime import ROOT, Loop


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="rexec vs OpenSSH, asyncssh, paramiko and the machine's raw floors, "
        "all on 127.0.0.1.",
    )
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: fewer, smaller")
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {','.join(MEASURES)} (default: all)",
    )
    p.add_argument("--out", default=str(ROOT / "bench-results"), help="directory for results")
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the generated table in docs/BENCHMARKS.md with this run",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: print (and with --update-docs, write) the tables of OUT/latest.json",
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(MEASURES)
    unknown = [s for s in only if s not in MEASURES]
    if unknown:
        sys.stderr.write(f"unknown measure(s): {', '.join(unknown)}; have {', '.join(MEASURES)}\n")
        return 2
    if args.render_only:
        return render_only(Path(args.out), args.update_docs)
    cfg = Config.make(args.quick, args.verbose)
    procs.install()
    started = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows: list[Row] = []
    groups: list[Group] = []
    env: Env | None = None
    try:
        env = Env(cfg=cfg, loop=Loop())
        setup(env)
        for name in only:
            group = MEASURES[name](env)
            groups.append(group)
            log(f"{group.title} ({group.rounds} round(s)) ...")
            interleave(
                group.contenders,
                group.rounds,
                group.budget_s,
                min_rounds=min(2, group.rounds),
                verbose=cfg.verbose,
                deadline=started + cfg.total_budget_s,
            )
            rows.extend(c.row for c in group.contenders)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        procs.cleanup()
        leftovers = procs.descendants()
        if leftovers:
            log(f"WARNING: processes still alive after cleanup: {leftovers}")
    assert env is not None
    duration = time.monotonic() - started
    meta = dict(env.meta)
    meta.update(
        {
            "machine": machine(),
            "quick": cfg.quick,
            "loadavg_start": load_start,
            "stream_bytes": cfg.stream_bytes,
            "concurrency": cfg.conc_n,
            "command": "python -m benchmarks" + (" " + shlex.join(argv or sys.argv[1:])).rstrip(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "duration_s": round(duration, 1),
        }
    )
    by_key = {r.key: r for r in rows}
    ratios = evaluate(by_key, [c for g in groups for c in g.comparisons])
    title = f"rexec benchmarks ({'quick' if cfg.quick else 'full'}, {duration:.0f} s)"
    print(text_tables(title, meta, rows, ratios))
    out = Path(args.out)
    write_json(out / "latest.json", meta, rows, ratios)
    md = markdown(meta, rows, ratios)
    (out / "latest.md").write_text(md + "\n")
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    if args.update_docs:
        _update_docs(md)
    return 0


def _update_docs(md: str) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    if update_doc(doc, md):
        log(f"updated {doc}")
    else:
        log(f"{doc}: generated-section markers not found; not updated")


def render_only(out: Path, docs: bool) -> int:
    path = out / "latest.json"
    try:
        meta, rows, ratios = load_json(path)
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"cannot read {path}: {exc}\n")
        return 2
    title = f"rexec benchmarks ({'quick' if meta.get('quick') else 'full'}, from {path})"
    print(text_tables(title, meta, rows, ratios))
    if docs:
        _update_docs(markdown(meta, rows, ratios))
    return 0
