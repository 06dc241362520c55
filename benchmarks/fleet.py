"""The fleet measure: one command on N loopback hosts at once (`rexec run HOSTS`).

rexec: `rexec run -b 127.0.1.[1-100]:PORT CMD`, to one rexec server listening on N distinct
loopback addresses (one port). OpenSSH peers, to the private sshd through N distinct host
aliases (an ssh_config maps lab0001..labN to it; sshd listens on at most 16 addresses):
pssh (`parallel-ssh`), ClusterShell's `clush` and `pdsh` (Debian packages, installed with
apt-get when missing), and the parallel-ssh Python library (pip, the `bench` extra; libssh2,
not the OpenSSH client, to the same sshd). OpenSSH runs with curve25519 key exchange, its
fastest; the peers use a fanout of 64 (at or above their defaults), rexec its default 256.

Every contender runs as a process of its own, timed from spawn to exit; GNU time gives its
CPU (user + system, with the ssh children it waited for) and its peak RSS (the largest single
process: a peer's N ssh processes are not summed). Every sample checks every host's
exit status and output; one wrong host marks the row unavailable with the reason.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.model import Comparison, Contender, Role, Row, Unavailable, log
from benchmarks.openssh import CURVE
from benchmarks.runtime import REXEC_BIN, tail, wait_file

PEER_FANOUT = 64
SAMPLE_TIMEOUT = 600.0
COMMANDS = ("true", "uname -a")
APT_TOOLS = {"parallel-ssh": "pssh", "clush": "clustershell", "pdsh": "pdsh", "time": "time"}
TIME = "/usr/bin/time"  # GNU time: the contenders' CPU and peak RSS
RULE = "-" * 16
SERVER_CONFIG = """\
[server]
log_level = "warning"

[limits]
max_connections = 4096
max_unauthenticated = 2048
max_unauthenticated_per_source = 2048  # every host is 127.0.0.1 to the server, and this
unauthenticated_drop_start = 2048  # measures speed, not admission control
"""
SSH_CONFIG = """\
# every host alias is the private sshd on 127.0.0.1
Host *
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
  KexAlgorithms {kex}
  ControlMaster no
"""
# the parallel-ssh library, in a process of its own (its CPU and RSS measured alike)
PARALLEL_SSH = """\
import json, sys
from pssh.clients import ParallelSSHClient
n, port, user, key, command, fanout = sys.argv[1:]
client = ParallelSSHClient(["127.0.0.1"] * int(n), port=int(port), user=user, pkey=key,
                           pool_size=int(fanout), num_retries=1, timeout=120)
output = client.run_command(command)
client.join(output)
print(json.dumps([[o.exit_code, "".join(line + "\\n" for line in o.stdout)] for o in output]))
"""


def ensure_tools(wanted: dict[str, str] = APT_TOOLS) -> dict[str, str]:
    """The peers' binaries (tool -> Debian package); apt-get installs the missing packages
    (we run as root). Returns tool -> path for those present afterwards."""
    missing = [pkg for tool, pkg in wanted.items() if shutil.which(tool) is None]
    if missing and os.geteuid() == 0:
        log(f"installing {' '.join(missing)} (apt-get) ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        res = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
    return {tool: path for tool in wanted if (path := shutil.which(tool))}


def raise_nofile() -> None:
    """1000 listeners and connections: the rexec server (our child) inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class FleetServer:
    """One rexec server on 127.0.[1-4].[1-250] (one port), on the bench's token store."""

    def __init__(self, store: Path, count: int) -> None:
        self.dir = procs.tempdir("rexec-bench-fleet-")
        self.store = store
        self.count = count
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def addresses(self, port: int) -> list[str]:
        return [f"127.0.{1 + i // 250}.{1 + i % 250}:{port}" for i in range(self.count)]

    def start(self) -> None:
        from benchmarks.openssh import free_port

        raise_nofile()
        config = self.dir / "server.toml"
        config.write_text(SERVER_CONFIG)
        last = ""
        for _attempt in range(3):  # the port is probed, then bound by the server: retry a race
            self.port = free_port()
            ready = self.dir / "ready"
            ready.unlink(missing_ok=True)
            argv = [str(REXEC_BIN), "serve", "--config", str(config), "--tokens", str(self.store)]
            argv += ["--state-dir", str(self.dir / "state"), "--ready-file", str(ready)]
            for addr in self.addresses(self.port):
                argv += ["--listen", addr]
            with (self.dir / "server.log").open("ab") as logf:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                )
            procs.on_cleanup("rexec fleet server", self.stop)
            try:
                wait_file(ready, self.proc, 60.0, "`rexec serve` on the fleet addresses")
                return
            except Unavailable as exc:
                last = f"{exc}: {tail(self.dir / 'server.log', 1)}"
                self.stop()
        raise Unavailable(last)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_popen(self.proc)
            self.proc = None


class Measured:
    """One timed process: wall time, and CPU and peak RSS from GNU time (its own small fork:
    a child forked straight from this 60 MB Python would report this process's RSS)."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        out_path, err_path, usage = workdir / "stdout", workdir / "stderr", workdir / "rusage"
        timed = [TIME, "-f", "%U %S %M", "-o", str(usage), *argv]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                timed, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=workdir
            )
            try:
                proc.wait(SAMPLE_TIMEOUT)
            except subprocess.TimeoutExpired:
                procs.stop_popen(proc, grace=2)
                raise RuntimeError(f"{argv[0]}: no exit within {SAMPLE_TIMEOUT:.0f} s") from None
        self.wall = time.perf_counter() - t0
        self.code = proc.returncode
        user, system, maxrss_kb = usage.read_text().split()[-3:]
        self.cpu = float(user) + float(system)
        self.rss_mb = int(maxrss_kb) / 1024
        self.stdout = out_path.read_bytes()
        self.stderr = err_path.read_bytes()

    def fail(self, what: str, why: str) -> RuntimeError:
        err = self.stderr.decode(errors="replace").strip().splitlines()
        return RuntimeError(f"{what}: {why} (exit {self.code}; {err[-1][:80] if err else ''})")


class Fleet:
    """The contenders of one fleet size: build, run and check one sample each."""

    def __init__(self, count: int, server: FleetServer, token: str, sshd: Any) -> None:
        self.count = count
        self.server = server
        self.token = token
        self.sshd = sshd
        self.dir = procs.tempdir(f"rexec-bench-fleet{count}-")
        self.aliases = [f"lab{i:04d}" for i in range(1, count + 1)]
        self.alias_set = f"lab[0001-{count:04d}]"
        self.expected = {"true": b"", "uname -a": _local("uname -a")}
        self.tools: dict[str, str] = {}
        self.ssh_config = self.dir / "ssh_config"
        self.hosts_file = self.dir / "hosts"
        if sshd is not None:
            port, user, key = sshd.port, sshd.user, sshd.key
            cfg = SSH_CONFIG.format(port=port, user=user, key=key, kex=CURVE)
            self.ssh_config.write_text(cfg)
            self.hosts_file.write_text("".join(a + "\n" for a in self.aliases))

    def workdir(self, name: str) -> Path:
        path = self.dir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    # ---- rexec --------------------------------------------------------------------------
    def rexec(self, command: str) -> Measured:
        addresses = self.server.addresses(self.server.port)[: self.count]
        from rexec.client.hosts import fold_hosts

        hosts = fold_hosts(addresses)
        env = dict(os.environ, REXEC_TOKEN=self.token)
        run = Measured([str(REXEC_BIN), "run", "-b", hosts, command], env, self.workdir("rexec"))
        want = f"{RULE} {hosts} ({self.count}) exit 0\n".encode() + self.expected[command]
        if run.code != 0 or run.stdout != want:
            raise run.fail("rexec", f"gathered output {run.stdout[:120]!r}")
        if run.stderr != f"{self.count} hosts: {self.count} ok\n".encode():
            raise run.fail("rexec", f"summary {run.stderr[-120:]!r}")
        return run

    # ---- OpenSSH peers -------------------------------------------------------------------
    def pssh(self, command: str) -> Measured:
        work = self.workdir("pssh")
        argv = [self.tools["parallel-ssh"], "-h", str(self.hosts_file), "-p", str(PEER_FANOUT)]
        argv += ["-t", "0", "-x", f"-F {self.ssh_config}", "-o", str(work / "out"), command]
        run = Measured(argv, dict(os.environ), work)
        lines = run.stdout.decode().splitlines()
        done = [line.split()[-1] for line in lines if "[SUCCESS]" in line]
        if run.code != 0 or sorted(done) != self.aliases:
            raise run.fail("pssh", f"{len(done)} of {self.count} hosts succeeded")
        for alias in self.aliases:
            out = work / "out" / alias
            if (out.read_bytes() if out.exists() else b"") != self.expected[command]:
                raise run.fail("pssh", f"{alias}: wrong output")
        return run

    def _prefixed(self, run: Measured, what: str, command: str) -> None:
        """clush and pdsh: exit status 0 (-S: the highest) and `host: line` per host."""
        if run.code != 0:
            raise run.fail(what, "a host failed")
        want = self.expected[command]
        got: dict[str, bytes] = {}
        for line in run.stdout.splitlines(keepends=True):
            host, _, text = line.partition(b": ")
            got[host.decode()] = got.get(host.decode(), b"") + text
        if want and (sorted(got) != self.aliases or set(got.values()) != {want}):
            raise run.fail(what, f"{len(got)} of {self.count} hosts printed the output")
        if not want and got:
            raise run.fail(what, f"unexpected output {run.stdout[:80]!r}")

    def clush(self, command: str) -> Measured:
        argv = [self.tools["clush"], "-S", "-f", str(PEER_FANOUT), "-o", f"-F {self.ssh_config}"]
        argv += ["-w", self.alias_set, command]
        run = Measured(argv, dict(os.environ), self.workdir("clush"))
        self._prefixed(run, "clush", command)
        return run

    def pdsh(self, command: str) -> Measured:
        env = dict(os.environ, PDSH_SSH_ARGS=f"-F {self.ssh_config} %h")
        argv = [self.tools["pdsh"], "-S", "-R", "ssh", "-f", str(PEER_FANOUT)]
        argv += ["-w", self.alias_set, command]
        run = Measured(argv, env, self.workdir("pdsh"))
        self._prefixed(run, "pdsh", command)
        return run

    def parallel_ssh(self, command: str) -> Measured:
        sshd = self.sshd
        assert sshd is not None
        argv = [sys.executable, "-c", PARALLEL_SSH, str(self.count), str(sshd.port)]
        argv += [sshd.user, str(sshd.key), command, str(PEER_FANOUT)]
        run = Measured(argv, dict(os.environ), self.workdir("parallel-ssh-lib"))
        try:
            results = json.loads(run.stdout)
        except ValueError:
            raise run.fail("parallel-ssh", "no JSON results") from None
        good = [1 for code, out in results if code == 0 and out.encode() == self.expected[command]]
        if run.code != 0 or len(results) != self.count or len(good) != self.count:
            raise run.fail("parallel-ssh", f"{len(good)} of {self.count} hosts right")
        return run


def _local(command: str) -> bytes:
    return subprocess.run(shlex.split(command), capture_output=True, check=True, timeout=30).stdout


def _rows(count: int, command: str, tool: str, name: str, role: Role) -> tuple[Row, Row, Row]:
    measure = f"fleet {count} x {command}"
    key = f"fleet{count}_{command.split()[0]}.{tool}"
    return (
        Row(key, measure, name, "s", "lower", role),
        Row(key + ".cpu", measure, f"{name}: client CPU", "s", "lower", role),
        Row(key + ".rss", measure, f"{name}: peak RSS", "MiB", "lower", role),
    )


def fleet_group(env: Any, count: int) -> tuple[list[Contender], list[Comparison]]:
    """Contenders for N = count hosts (wall rows sampled; CPU and RSS rows filled alongside)."""
    sshd = getattr(env, "sshd", None)
    rx = getattr(env, "rexec", None)
    server_error: str | None = None
    server: FleetServer | None = None
    if rx is None or not getattr(rx, "token", ""):
        server_error = "rexec not set up"
    else:
        server = _SERVERS.get("fleet")
        if server is None:
            server = FleetServer(rx.dir / "tokens", 1000)
            try:
                server.start()
                _SERVERS["fleet"] = server
            except Unavailable as exc:
                server_error = str(exc)[:160]
    fleet = Fleet(count, server, rx.token if rx else "", sshd) if server else None
    tools = ensure_tools()
    if "time" not in tools:
        server_error = server_error or f"{TIME} missing (apt-get install time)"
    if fleet is not None:
        fleet.tools = tools
    peers: list[tuple[str, str, str | None]] = [
        ("pssh", f"pssh (parallel-ssh -p {PEER_FANOUT})", _need(sshd, tools, "parallel-ssh")),
        ("clush", f"clush -f {PEER_FANOUT}", _need(sshd, tools, "clush")),
        ("pdsh", f"pdsh -R ssh -f {PEER_FANOUT}", _need(sshd, tools, "pdsh")),
        ("parallel_ssh", f"parallel-ssh library, pool {PEER_FANOUT}", _need_lib(sshd)),
    ]
    contenders: list[Contender] = []
    comparisons: list[Comparison] = []
    for command in COMMANDS:
        rows = _rows(count, command, "rexec", "rexec run -b (fanout 256)", "rexec")
        contenders += _contender(rows, fleet, "rexec", command, server_error)
        for tool, name, error in peers:
            peer_rows = _rows(count, command, tool, name, "peer")
            contenders += _contender(peer_rows, fleet, tool, command, error or server_error)
            target = count == 1000 and command == "true"
            comparisons.append(
                Comparison(
                    rows[0].key,
                    peer_rows[0].key,
                    "<=" if target else None,
                    0.2 if target else None,
                    "<= 0.2x (5x faster)" if target else "",
                )
            )
            comparisons.append(Comparison(rows[1].key, peer_rows[1].key))
            comparisons.append(Comparison(rows[2].key, peer_rows[2].key))
    return contenders, comparisons


_SERVERS: dict[str, FleetServer] = {}


def _need(sshd: Any, tools: dict[str, str], tool: str) -> str | None:
    if sshd is None:
        return "no sshd"
    return None if tool in tools else f"{tool} missing (apt-get install {APT_TOOLS[tool]})"


def _need_lib(sshd: Any) -> str | None:
    if sshd is None:
        return "no sshd"
    try:
        import pssh.clients  # noqa: F401
    except ImportError as exc:
        return f"parallel-ssh library: {exc} (pip install -e '.[bench]')"
    return None


def _contender(
    rows: tuple[Row, Row, Row], fleet: Fleet | None, tool: str, command: str, error: str | None
) -> list[Contender]:
    wall, cpu, rss = rows
    if error is not None or fleet is None:
        for r in rows:
            r.unavailable = error or "unavailable"
        return [Contender(r, None) for r in rows]
    run: Callable[[str], Measured] = getattr(fleet, tool)

    def sample() -> list[float]:
        result = run(command)
        cpu.samples.append(result.cpu)
        rss.samples.append(result.rss_mb)
        return [result.wall]

    return [Contender(wall, sample), Contender(cpu, None), Contender(rss, None)]
