"""Issue 14's measures: file transfer (`put`/`get`) against scp, asyncssh SFTP and rsync.

- **xfer-big**: one file (1 GiB; 128 MiB with --quick) up and down. rexec: `conn.put` /
  `conn.get` on the open connection (the end-to-end SHA-256 is always on). Peers: `scp` with
  aes128-gcm over the gcm ControlMaster of the private sshd (no handshake in the figure, as
  in the stream measures), and asyncssh's SFTP client against the asyncssh server's SFTP
  subsystem. Alongside: the rexec server's peak RSS during those transfers (VmHWM, reset
  through /proc/PID/clear_refs before each one), and a client in a process of its own
  (`rexec.Client.put/get`), which reports its own VmHWM: the in-process client shares this
  process with asyncssh and paramiko, so its RSS says nothing.
- **xfer-tree**: 10,000 files of 1 KiB in 100 directories (1,000 with --quick), up and down.
  rexec: `put/get(recursive=True)`. Peers: `scp -r` and `rsync -a -e ssh`, both over the
  same ControlMaster (rsync is a Debian package, installed with apt-get when missing).

Every transfer lands in a fresh empty directory of a temp dir on one file system, which is
removed after the sample. Each contender's first sample checks every received byte against
the source (SHA-256 of the file, or of every file of the tree), later samples the sizes and
the file count, so a broken contender is reported unavailable, never fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.fleet import ensure_tools
from benchmarks.measures import Group
from benchmarks.model import Comparison, Contender, Row
from benchmarks.openssh import CURVE, GCM, LOOPBACK
from benchmarks.runtime import PYTHON, ROOT

MiB = 1 << 20
TIMEOUT = 600.0
BLOCK = os.urandom(MiB)  # the big file is this block repeated: incompressible, cheap to make
TREE_DIRS_FILES = 100  # files per directory of the tree
TREE_FILE = 1024
RSYNC = {"rsync": "rsync"}
SSH_CIPHER = ["-o", f"Ciphers={GCM}", "-o", f"KexAlgorithms={CURVE}"]

# A client of its own: one put or get through the sync API, then its own peak RSS.
CHILD = """\
import json, os, sys, time
import rexec
addr, op, src, dst = sys.argv[1:5]
with rexec.Client(addr, token=os.environ["REXEC_TOKEN"]) as client:
    t0 = time.perf_counter()
    res = (client.put if op == "put" else client.get)(src, dst)
    seconds = time.perf_counter() - t0
status = open("/proc/self/status").read()
hwm = int(status.split("VmHWM:", 1)[1].split()[0])
print(json.dumps({"seconds": seconds, "hwm_kb": hwm, "ok": res.ok,
                  "sha256": [f.sha256 for f in res.files]}))
"""


# ---- the data -------------------------------------------------------------------------------
class Data:
    """The sources (made once per run) and fresh destinations for each sample."""

    def __init__(self) -> None:
        self.dir = procs.tempdir("rexec-bench-xfer-")
        self.big: Path | None = None
        self.big_size = 0
        self.big_sha = ""
        self.tree: Path | None = None
        self.tree_manifest: dict[str, str] = {}
        self._n = 0

    def make_big(self, size: int) -> Path:
        if self.big is None or self.big_size != size:
            path = self.dir / "src" / "big.bin"
            path.parent.mkdir(exist_ok=True)
            digest = hashlib.sha256()
            with path.open("wb") as f:
                for _ in range(size // MiB):
                    f.write(BLOCK)
                    digest.update(BLOCK)
            self.big, self.big_size, self.big_sha = path, size, digest.hexdigest()
        return self.big

    def make_tree(self, count: int) -> Path:
        if self.tree is None or len(self.tree_manifest) != count:
            root = self.dir / "src" / "tree"
            shutil.rmtree(root, ignore_errors=True)
            manifest: dict[str, str] = {}
            for i in range(count):
                rel = f"d{i // TREE_DIRS_FILES:03d}/f{i % TREE_DIRS_FILES:03d}.bin"
                data = os.urandom(TREE_FILE)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                manifest[rel] = hashlib.sha256(data).hexdigest()
            self.tree, self.tree_manifest = root, manifest
        return self.tree

    def fresh(self, name: str) -> Path:
        """An empty directory for one sample's destination."""
        self._n += 1
        path = self.dir / f"dst-{self._n}-{name}"
        path.mkdir()
        return path


_DATA: dict[str, Data] = {}


def data() -> Data:
    if "data" not in _DATA:
        _DATA["data"] = Data()
    return _DATA["data"]


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_file(path: Path, size: int, sha: str, full: bool, what: str) -> None:
    try:
        got = path.stat().st_size
    except OSError as exc:
        raise RuntimeError(f"{what}: no destination file ({exc.strerror})") from None
    if got != size:
        raise RuntimeError(f"{what}: {got} bytes of {size} arrived")
    if full and sha256_file(path) != sha:
        raise RuntimeError(f"{what}: the received bytes differ from the source (SHA-256)")


def check_tree(root: Path, manifest: dict[str, str], full: bool, what: str) -> None:
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = path
    if sorted(found) != sorted(manifest):
        raise RuntimeError(f"{what}: {len(found)} files arrived, {len(manifest)} sent")
    for rel, path in found.items():
        if path.stat().st_size != TREE_FILE:
            raise RuntimeError(f"{what}: {rel} has {path.stat().st_size} bytes")
        if full and hashlib.sha256(path.read_bytes()).hexdigest() != manifest[rel]:
            raise RuntimeError(f"{what}: {rel} differs from the source (SHA-256)")


def _run(argv: list[str], what: str) -> None:
    res = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, check=False
    )
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what}: exit {res.returncode} {err[-1] if err else ''}"[:160])


# ---- peak RSS ---------------------------------------------------------------------------------
class PeakRss:
    """A process's peak RSS (VmHWM), reset before each transfer through clear_refs (Linux >= 4.0,
    needs the right to write it: we started the process, as root)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.resettable = self.reset()

    def reset(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return round(_hwm_kb(status) * 1024 / 1e6, 1)


def _hwm_kb(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/PID/status")


# ---- shared bits ------------------------------------------------------------------------------
def _rexec_error(env: Any) -> str | None:
    """Why the rexec contenders cannot run, or None."""
    rx = env.rexec
    if rx is None or rx.server_error:
        return rx.server_error if rx else "rexec not set up"
    if env.rexec_conn is None:
        return env.rexec_conn_error or "no rexec connection"
    if not hasattr(env.rexec_conn, "put") or not hasattr(env.rexec_conn, "get"):
        return "rexec.Connection has no put/get (issue 14's API is not in this tree)"
    return None


def _sshd_error(env: Any) -> str | None:
    return None if env.sshd is not None else (env.sshd_error or "no sshd")


def _ssh_opts(env: Any) -> list[str]:
    """scp's and rsync's ssh options: aes128-gcm, over the gcm ControlMaster when it is up."""
    opts: list[str] = env.sshd.opts(*SSH_CIPHER, *env.mux.get("gcm", []))
    return opts


def _remote(env: Any, path: Path | str) -> str:
    return f"{env.sshd.user}@{LOOPBACK}:{path}"


def _check_result(res: Any, files: int, what: str) -> None:
    got = [f for f in res.files if f.kind == "file"]
    if not res.ok or len(got) != files:
        bad = [f"{f.path}: {f.error}" for f in res.files if f.error][:1]
        raise RuntimeError(f"{what}: {len(got)} files, ok={res.ok} {' '.join(bad)}"[:160])


class _Once:
    """Full verification on a contender's first sample only."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    def __call__(self, key: str) -> bool:
        first = key not in self.done
        self.done.add(key)
        return first


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


# ---- xfer-big ---------------------------------------------------------------------------------
def big_group(env: Any) -> Group:
    quick = env.cfg.quick
    size = (128 if quick else 1024) * MiB
    label = f"{size // MiB}M" if size < 1024 * MiB else f"{size // (1024 * MiB)}G"
    d = data()
    src = d.make_big(size)
    loop, rx = env.loop, env.rexec
    rx_err = _rexec_error(env)
    ssh_err = _sshd_error(env)
    full = _Once()
    contenders: list[Contender] = []
    comparisons: list[Comparison] = []
    server_rss: PeakRss | None = None
    if rx_err is None and rx.proc is not None:
        server_rss = PeakRss(rx.proc.pid)
    rss_note = (
        "VmHWM, reset before each transfer"
        if server_rss is None or server_rss.resettable
        else "VmHWM since the server started (clear_refs refused)"
    )
    rss_rows: dict[str, Row] = {}
    for op in ("put", "get"):
        direction = "up" if op == "put" else "down"
        m = f"xfer {direction} {label}"
        k = f"xfer_{direction}"
        rows = {
            "rexec": Row(
                f"{k}.rexec", m, f"rexec conn.{op} (SHA-256 end to end)", "MB/s", "higher", "rexec"
            ),
            "rexec_proc": Row(
                f"{k}.rexec_proc",
                m,
                f"rexec.Client.{op}, own process (info)",
                "MB/s",
                "higher",
                "rexec",
                "transfer only, not start-up; its peak RSS is the client RSS row",
            ),
            "scp": Row(
                f"{k}.scp", m, f"scp -o Ciphers={GCM} (ControlMaster)", "MB/s", "higher", "peer"
            ),
            "sftp": Row(f"{k}.sftp", m, f"asyncssh SFTP {op}", "MB/s", "higher", "peer"),
        }
        server_row = Row(
            f"xfer_rss.server_{direction}",
            f"xfer peak RSS {label}",
            f"rexec server during conn.{op}",
            "MB",
            "lower",
            "rexec",
            rss_note,
        )
        client_row = Row(
            f"xfer_rss.client_{direction}",
            f"xfer peak RSS {label}",
            f"rexec client (own process) during Client.{op}",
            "MB",
            "lower",
            "rexec",
            "VmHWM of the process, read at its end",
        )
        rss_rows[direction] = server_row

        # the source and a fresh destination (both ends are this machine, one file system)
        def paths(name: str) -> tuple[Path, Path]:
            return src, d.fresh(name) / "big.bin"

        def finish(dst: Path, key: str) -> None:
            try:
                check_file(dst, size, d.big_sha, full(key), key)
            finally:
                shutil.rmtree(dst.parent, ignore_errors=True)

        def rexec_sample(
            op: str = op, key: str = rows["rexec"].key, srow: Row = server_row
        ) -> list[float]:
            s, dst = paths("rexec")
            assert server_rss is not None
            server_rss.reset()
            t0 = time.perf_counter()
            res = loop.run(getattr(env.rexec_conn, op)(str(s), str(dst)), TIMEOUT)
            seconds = time.perf_counter() - t0
            srow.samples.append(server_rss.mb())
            try:
                _check_result(res, 1, key)
                if res.files[0].sha256 != d.big_sha:
                    raise RuntimeError(f"{key}: reported SHA-256 differs from the source's")
            finally:
                finish(dst, key)
            return [_mbps(size, seconds)]

        def proc_sample(
            op: str = op, key: str = rows["rexec_proc"].key, crow: Row = client_row
        ) -> list[float]:
            s, dst = paths("rexec-proc")
            argv = [PYTHON, "-c", CHILD, rx.addr, op, str(s), str(dst)]
            res = subprocess.run(
                argv,
                env=rx.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
            try:
                if res.returncode != 0:
                    err = res.stderr.decode(errors="replace").strip().splitlines()
                    raise RuntimeError(f"{key}: exit {res.returncode} {err[-1] if err else ''}")
                out = json.loads(res.stdout)
                if not out["ok"] or out["sha256"] != [d.big_sha]:
                    raise RuntimeError(f"{key}: result not ok or wrong SHA-256: {out}"[:160])
            finally:
                finish(dst, key)
            crow.samples.append(round(out["hwm_kb"] * 1024 / 1e6, 1))
            return [_mbps(size, float(out["seconds"]))]

        def scp_sample(op: str = op, key: str = rows["scp"].key) -> list[float]:
            s, dst = paths("scp")
            if op == "put":
                argv = ["scp", "-q", *_ssh_opts(env), str(s), _remote(env, dst)]
            else:
                argv = ["scp", "-q", *_ssh_opts(env), _remote(env, s), str(dst)]
            t0 = time.perf_counter()
            try:
                _run(argv, "scp")
            except BaseException:
                shutil.rmtree(dst.parent, ignore_errors=True)
                raise
            seconds = time.perf_counter() - t0
            finish(dst, key)
            return [_mbps(size, seconds)]

        def sftp_sample(op: str = op, key: str = rows["sftp"].key) -> list[float]:
            s, dst = paths("sftp")
            t0 = time.perf_counter()
            try:
                loop.run(env.assh.sftp(env.assh_conn, op, str(s), str(dst)), TIMEOUT)
            except BaseException:
                shutil.rmtree(dst.parent, ignore_errors=True)
                raise
            seconds = time.perf_counter() - t0
            finish(dst, key)
            return [_mbps(size, seconds)]

        assh_err = env.assh_error or (None if env.assh_conn is not None else "no asyncssh conn")
        proc_err = rx_err or (None if rx.sync_error is None else rx.sync_error)
        contenders += [
            _contender(rows["rexec"], rexec_sample, rx_err),
            _contender(rows["rexec_proc"], proc_sample, proc_err),
            _contender(rows["scp"], scp_sample, ssh_err),
            _contender(rows["sftp"], sftp_sample, assh_err),
            _contender(server_row, None, rx_err),
            _contender(client_row, None, proc_err),
        ]
        comparisons += [
            Comparison(rows["rexec"].key, rows["scp"].key, ">=", 1.2, ">= 1.2x"),
            Comparison(rows["rexec"].key, rows["sftp"].key, ">=", 3.0, ">= 3x"),
            Comparison(rows["rexec_proc"].key, rows["scp"].key),
            Comparison(server_row.key, "", "<", 100.0, "< 100 MB"),
            Comparison(client_row.key, "", "<", 100.0, "< 100 MB"),
        ]
    # the RSS rows last, after both directions' speed rows
    speed = [c for c in contenders if c.row.unit != "MB"]
    rss = [c for c in contenders if c.row.unit == "MB"]
    return Group(
        f"xfer: one {label} file up and down (MB = 10^6 bytes)",
        speed + rss,
        2 if quick else 3,
        60 if quick else 300,
        comparisons,
    )


# ---- xfer-tree --------------------------------------------------------------------------------
def tree_group(env: Any) -> Group:
    quick = env.cfg.quick
    count = 1_000 if quick else 10_000
    d = data()
    src = d.make_tree(count)
    loop = env.loop
    rx_err = _rexec_error(env)
    ssh_err = _sshd_error(env)
    rsync_err = ssh_err
    if rsync_err is None and "rsync" not in ensure_tools(RSYNC):
        rsync_err = (
            "rsync unavailable: not installed, and `apt-get install rsync` failed (no network?)"
        )
    full = _Once()
    contenders: list[Contender] = []
    comparisons: list[Comparison] = []
    for op in ("put", "get"):
        direction = "up" if op == "put" else "down"
        m = f"tree {direction} {count:,} x 1K"
        k = f"tree_{direction}"
        rows = {
            "rexec": Row(
                f"{k}.rexec", m, f"rexec conn.{op}(recursive=True)", "s", "lower", "rexec"
            ),
            "scp": Row(
                f"{k}.scp", m, f"scp -r -o Ciphers={GCM} (ControlMaster)", "s", "lower", "peer"
            ),
            "rsync": Row(
                f"{k}.rsync",
                m,
                "rsync -a -e 'ssh -o Ciphers=aes128-gcm' (ControlMaster)",
                "s",
                "lower",
                "peer",
            ),
        }

        def timed(name: str, key: str, go: Callable[[Path], None]) -> list[float]:
            dst = d.fresh(name) / "tree"
            try:
                t0 = time.perf_counter()
                go(dst)
                seconds = time.perf_counter() - t0
                check_tree(dst, d.tree_manifest, full(key), key)
            finally:
                shutil.rmtree(dst.parent, ignore_errors=True)
            return [seconds]

        def rexec_sample(op: str = op, key: str = rows["rexec"].key) -> list[float]:
            def go(dst: Path) -> None:
                res = loop.run(
                    getattr(env.rexec_conn, op)(str(src), str(dst), recursive=True), TIMEOUT
                )
                _check_result(res, count, key)

            return timed("rexec", key, go)

        def scp_sample(op: str = op, key: str = rows["scp"].key) -> list[float]:
            def go(dst: Path) -> None:
                pair = (
                    [str(src), _remote(env, dst)] if op == "put" else [_remote(env, src), str(dst)]
                )
                _run(["scp", "-q", "-r", *_ssh_opts(env), *pair], "scp -r")

            return timed("scp", key, go)

        def rsync_sample(op: str = op, key: str = rows["rsync"].key) -> list[float]:
            def go(dst: Path) -> None:
                ssh = " ".join(["ssh", *_ssh_opts(env)])
                a, b = f"{src}/", f"{dst}/"
                pair = [a, _remote(env, b)] if op == "put" else [_remote(env, a), b]
                _run(["rsync", "-a", "-e", ssh, *pair], "rsync -a")

            return timed("rsync", key, go)

        contenders += [
            _contender(rows["rexec"], rexec_sample, rx_err),
            _contender(rows["scp"], scp_sample, ssh_err),
            _contender(rows["rsync"], rsync_sample, rsync_err),
        ]
        comparisons += [
            Comparison(rows["rexec"].key, rows["scp"].key, "<=", 1 / 3, "<= 0.33x (3x faster)"),
            Comparison(rows["rexec"].key, rows["rsync"].key, "<=", 1 / 3, "<= 0.33x (3x faster)"),
        ]
    return Group(
        f"xfer: a tree of {count:,} files of 1 KiB up and down",
        contenders,
        2 if quick else 3,
        60 if quick else 240,
        comparisons,
    )


def _contender(row: Row, sample: Callable[[], list[float]] | None, error: str | None) -> Contender:
    """A sampled row, or (sample None) a row filled alongside another's samples."""
    if error is not None:
        row.unavailable = error
        return Contender(row, None)
    if sample is None:
        return Contender(row, None)
    return Contender(row, sample)
