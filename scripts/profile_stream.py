"""Streaming throughput of a real server on loopback, optionally under cProfile.

    .venv/bin/python scripts/profile_stream.py [--mib 512] [--repeat 3]
        [--profile-client FILE] [--profile-server FILE] [--cli]

Starts `rexec serve` on 127.0.0.1:0 with a fresh token, downloads `head -c N /dev/zero`
through the async API (`proc.stdout` iterated, as a streaming consumer would), and prints
MB/s per run. `--cli` also times `rexec run ADDR 'head -c N /dev/zero' > /dev/null`.
`--profile-server` runs the server under cProfile (the stats are written when it stops).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rexec

REXEC = str(Path(sys.executable).parent / "rexec")
MiB = 1024 * 1024
GiB = 1024 * MiB


def start_server(base: Path, profile: str | None) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXEC_")}
    store = base / "tokens.json"
    out = subprocess.run(
        [REXEC, "token", "new", "--id", "bench", "--store", str(store)],
        capture_output=True,
        env=env,
        check=True,
    )
    token = out.stdout.decode().strip()
    ready = base / "ready"
    cfg = base / "server.toml"
    cfg.write_text('[server]\nlog_level = "warning"\n')
    head = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "rexec"] if profile else [REXEC]
    proc = subprocess.Popen(
        [
            *head,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(store),
            "--state-dir",
            str(base / "state"),
            "--ready-file",
            str(ready),
            "--config",
            str(cfg),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not (ready.exists() and ready.read_text().endswith("\n")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start")
        time.sleep(0.02)
    return proc, ready.read_text().split()[0], token


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def download(addr: str, token: str, size: int) -> float:
    async with rexec.connect(addr, token=token) as conn:
        t0 = time.perf_counter()
        proc = await conn.start(f"head -c {size} /dev/zero")
        got = 0
        async for chunk in proc.stdout:
            got += len(chunk)
        result = await proc.wait()
        elapsed = time.perf_counter() - t0
    if got != size or result.exit_code != 0:
        raise SystemExit(f"download failed: {got} bytes, exit {result.exit_code}")
    return elapsed


def cli_download(addr: str, token: str, size: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXEC_")}
    env["REXEC_TOKEN"] = token
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        rc = subprocess.run(
            [REXEC, "run", addr, f"head -c {size} /dev/zero"], stdout=sink, env=env, check=False
        ).returncode
    if rc != 0:
        raise SystemExit(f"rexec run failed: {rc}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile-client", metavar="FILE")
    ap.add_argument("--profile-server", metavar="FILE")
    ap.add_argument("--cli", action="store_true")
    args = ap.parse_args()
    size = args.mib * MiB
    with tempfile.TemporaryDirectory(prefix="rexec-prof-") as tmp:
        proc, addr, token = start_server(Path(tmp), args.profile_server)
        try:
            for i in range(args.repeat):
                profiled = bool(args.profile_client) and i == args.repeat - 1
                prof = cProfile.Profile()
                cpu0, srv0 = time.process_time(), cpu_seconds(proc.pid)
                if profiled:
                    prof.enable()
                elapsed = asyncio.run(download(addr, token, size))
                if profiled:
                    prof.disable()
                    prof.dump_stats(args.profile_client)
                cpu, srv = time.process_time() - cpu0, cpu_seconds(proc.pid) - srv0
                print(
                    f"api {args.mib} MiB: {size / elapsed / 1e6:7.0f} MB/s; CPU per GiB: "
                    f"client {cpu * GiB / size:.2f} s, server {srv * GiB / size:.2f} s"
                    + (" (profiled)" if profiled else "")
                )
            if args.cli:
                for _ in range(args.repeat):
                    elapsed = cli_download(addr, token, size)
                    print(f"cli {args.mib} MiB: {size / elapsed / 1e6:7.0f} MB/s")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    for name in (args.profile_client, args.profile_server):
        if name:
            print(f"\n== {name}")
            pstats.Stats(name).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
