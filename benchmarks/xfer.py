"""Issue 14's measures: file transfer (`put`/`get`) against scp, asyncssh SFTP and rsync.

- **xfer-big**: one file (1 GiB; 128 MiB with --quick) up and down. rexec: `conn.put` /
  `conn.get` on the open connection (the end-to-end SHA-256 is always on); info rows:
  `rexec.Client.put/get` in a process of its own and the `rexec cp` CLI. Peers: `scp` with
  aes128-gcm over the gcm ControlMaster of the private sshd (no handshake in the figure, as
  in the stream measures; info: `scp -O`), and asyncssh's SFTP client against the asyncssh
  server's SFTP subsystem. Alongside: the rexec server's peak RSS during those transfers
  (VmHWM, reset through /proc/PID/clear_refs before each one), and the clients' in
  processes of their own (the in-process client shares this process with asyncssh and
  paramiko, so its RSS says nothing).
- **xfer-tree**: 10,000 files of 1 KiB in 100 directories (1,000 with --quick), up and down.
  rexec: `put/get(recursive=True)`; info: `rexec cp -r`. Peers: `scp -r` and
  `rsync -a -e ssh`, both over the same ControlMaster (rsync is a Debian package, installed
  with apt-get when missing; unavailable with the reason when that fails).

Every transfer lands in a fresh empty directory of one work dir (on /dev/shm when it has
room: see work_parent), removed after the sample. Each contender's first sample checks every
received byte against the source (SHA-256 of the file, or of every file of the tree), later
samples the sizes and the file count, so a broken contender is reported unavailable, never
fast."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.common import Group
from benchmarks.fleet import TIME, Measured, ensure_tools
from benchmarks.model import Comparison, Contender, Row, reason
from benchmarks.openssh import CURVE, GCM, LOOPBACK
from benchmarks.runtime import PYTHON, REXEC_BIN, ROOT

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
def fstype(path: Path) -> str:
    """The file system type of the mount holding path (from /proc/self/mounts)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def work_parent(need: int) -> Path | None:
    """Where the sources and destinations go: REXEC_BENCH_XFER_DIR if set, else /dev/shm when
    it is a tmpfs with room for `need` bytes, else the temp dir (None). Creating 10,000 files
    on this machine's ext4 costs 0.2 to 4 s of kernel time depending on its journal's state
    (after a sync or a large delete: slow), the same for every tool and larger than the
    tools' differences; on tmpfs the figures are the transfer tools', not the disk's."""
    if chosen := os.environ.get("REXEC_BENCH_XFER_DIR"):
        return Path(chosen)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if fstype(shm) == "tmpfs" and st.f_bavail * st.f_frsize >= need:
            return shm
    return None


class Data:
    """The sources (made once per run) and fresh destinations for each sample."""

    def __init__(self, need: int) -> None:
        self.dir = procs.tempdir("rexec-bench-xfer-", work_parent(need))
        self.fs = fstype(self.dir)
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


def data(quick: bool) -> Data:
    """One work dir for both measures; room for the big file, a copy and some slack."""
    if "data" not in _DATA:
        _DATA["data"] = Data(need=(1 if quick else 3) << 30)
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
class Big:
    """The contenders of xfer-big: one sample each moves the file one way and checks it."""

    def __init__(self, env: Any, size: int) -> None:
        self.env = env
        self.size = size
        self.data = data(env.cfg.quick)
        self.src = self.data.make_big(size)
        self.full = _Once()
        rx = env.rexec
        self.server_rss = PeakRss(rx.proc.pid) if rx is not None and rx.proc else None

    @contextlib.contextmanager
    def dest(self, name: str, key: str) -> Iterator[Path]:
        """A fresh destination path; after the transfer, the file is checked and removed."""
        dst = self.data.fresh(name) / "big.bin"
        try:
            yield dst
            check_file(dst, self.size, self.data.big_sha, self.full(key), key)
        finally:
            shutil.rmtree(dst.parent, ignore_errors=True)

    def pair(self, op: str, dst: Path, remote: Callable[[Path], str]) -> list[str]:
        return [str(self.src), remote(dst)] if op == "put" else [remote(self.src), str(dst)]

    def rexec(self, op: str, key: str, server: Row) -> list[float]:
        assert self.server_rss is not None
        with self.dest("rexec", key) as dst:
            self.server_rss.reset()
            t0 = time.perf_counter()
            res = self.env.loop.run(_api(self.env.rexec_conn, op, self.src, dst), TIMEOUT)
            seconds = time.perf_counter() - t0
            server.samples.append(self.server_rss.mb())
            _check_result(res, 1, key)
            if res.files[0].sha256 != self.data.big_sha:
                raise RuntimeError(f"{key}: reported SHA-256 differs from the source's")
        return [_mbps(self.size, seconds)]

    def client(self, op: str, key: str, client: Row) -> list[float]:
        rx = self.env.rexec
        with self.dest("rexec-proc", key) as dst:
            argv = [PYTHON, "-c", CHILD, rx.addr, op, str(self.src), str(dst)]
            res = subprocess.run(
                argv,
                env=rx.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
            if res.returncode != 0:
                err = res.stderr.decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"{key}: exit {res.returncode} {err[-1] if err else ''}")
            out = json.loads(res.stdout)
            if not out["ok"] or out["sha256"] != [self.data.big_sha]:
                raise RuntimeError(f"{key}: result not ok or wrong SHA-256: {out}"[:160])
        client.samples.append(round(out["hwm_kb"] * 1024 / 1e6, 1))
        return [_mbps(self.size, float(out["seconds"]))]

    def cli(self, op: str, key: str, client: Row) -> list[float]:
        rx = self.env.rexec
        with self.dest("rexec-cp", key) as dst:
            work = self.data.fresh("rexec-cp-run")
            argv = [str(REXEC_BIN), "cp", "-q", *self.pair(op, dst, lambda p: f"{rx.addr}:{p}")]
            try:
                run = Measured(argv, rx.env, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if run.code != 0:
                raise run.fail("rexec cp", "a file failed")
        client.samples.append(round(run.rss_mb * MiB / 1e6, 1))
        return [_mbps(self.size, run.wall)]

    def scp(self, op: str, key: str, legacy: bool = False) -> list[float]:
        """scp (OpenSSH 9 speaks SFTP to the server); `legacy`: -O, the old scp protocol."""
        env = self.env
        with self.dest("scp", key) as dst:
            pair = self.pair(op, dst, lambda p: _remote(env, p))
            argv = ["scp", "-q", *(["-O"] if legacy else []), *_ssh_opts(env), *pair]
            t0 = time.perf_counter()
            _run(argv, "scp")
            seconds = time.perf_counter() - t0
        return [_mbps(self.size, seconds)]

    def floor(self, side: str, key: str) -> list[float]:
        """One side's file work alone, in 256 KiB pieces as rexec's frames: the sender's
        read + SHA-256, or the receiver's SHA-256 + write. No network, no encryption: each
        side of a transfer does at least this, on one of the machine's two cores."""
        piece = 256 * 1024
        if side == "send":
            buf = bytearray(piece)
            digest = hashlib.sha256()
            t0 = time.perf_counter()
            with self.src.open("rb", buffering=0) as f:
                while n := f.readinto(buf):
                    digest.update(memoryview(buf)[:n])
            seconds = time.perf_counter() - t0
            if digest.hexdigest() != self.data.big_sha:
                raise RuntimeError(f"{key}: the hash of the source differs")
            return [_mbps(self.size, seconds)]
        with self.dest("floor", key) as dst:
            pieces = [memoryview(BLOCK)[i : i + piece] for i in range(0, len(BLOCK), piece)]
            digest = hashlib.sha256()
            t0 = time.perf_counter()
            with dst.open("wb", buffering=0) as f:
                for _ in range(self.size // len(BLOCK)):
                    for view in pieces:
                        digest.update(view)
                        f.write(view)
            seconds = time.perf_counter() - t0
        return [_mbps(self.size, seconds)]

    def sftp(self, op: str, key: str) -> list[float]:
        env = self.env
        with self.dest("sftp", key) as dst:
            t0 = time.perf_counter()
            env.loop.run(env.assh.sftp(env.assh_conn, op, str(self.src), str(dst)), TIMEOUT)
            seconds = time.perf_counter() - t0
        return [_mbps(self.size, seconds)]


async def _api(conn: Any, op: str, src: Path, dst: Path, recursive: bool = False) -> Any:
    """conn.put(local, remote) or conn.get(remote, local): both ends are this machine."""
    return await getattr(conn, op)(str(src), str(dst), recursive=recursive)


def big_group(env: Any) -> Group:
    quick = env.cfg.quick
    size = (128 if quick else 1024) * MiB
    label = f"{size // MiB}M" if size < 1024 * MiB else f"{size // (1024 * MiB)}G"
    big = Big(env, size)
    env.meta["xfer_dir"] = f"{big.data.dir} ({big.data.fs})"
    rx_err = _rexec_error(env)
    proc_err = rx_err or env.rexec.sync_error
    cli_err = rx_err or _cp_error(env)
    assh_err = env.assh_error or (None if env.assh_conn is not None else "no asyncssh conn")
    rss_note = (
        "VmHWM, reset before each transfer"
        if big.server_rss is None or big.server_rss.resettable
        else "VmHWM since the server started (clear_refs refused)"
    )
    speed: list[Contender] = []
    rss: list[Contender] = []
    comparisons: list[Comparison] = []
    for op in ("put", "get"):
        way = "up" if op == "put" else "down"
        m, k, mr = f"xfer {way} {label}", f"xfer_{way}", f"xfer peak RSS {label}"
        rexec = Row(
            f"{k}.rexec", m, f"rexec conn.{op} (SHA-256 end to end)", "MB/s", "higher", "rexec"
        )
        proc = Row(
            f"{k}.rexec_proc",
            m,
            f"rexec.Client.{op}, own process (info)",
            "MB/s",
            "higher",
            "rexec",
            "transfer only, not start-up",
        )
        cli = Row(
            f"{k}.rexec_cp",
            m,
            "rexec cp -q (CLI, with start-up; info)",
            "MB/s",
            "higher",
            "rexec",
        )
        scp = Row(f"{k}.scp", m, f"scp -o Ciphers={GCM} (ControlMaster)", "MB/s", "higher", "peer")
        scp_o = Row(
            f"{k}.scp_legacy",
            m,
            "scp -O (old scp protocol; info), same options",
            "MB/s",
            "higher",
            "peer",
        )
        sftp = Row(f"{k}.sftp", m, f"asyncssh SFTP {op}", "MB/s", "higher", "peer")
        server = Row(
            f"xfer_rss.server_{way}",
            mr,
            f"rexec server during conn.{op}",
            "MB",
            "lower",
            "rexec",
            rss_note,
        )
        client = Row(
            f"xfer_rss.client_{way}",
            mr,
            f"rexec client: Client.{op} in its own process",
            "MB",
            "lower",
            "rexec",
            "VmHWM of that process at its end",
        )
        cp_rss = Row(
            f"xfer_rss.cp_{way}",
            mr,
            "rexec client: the rexec cp process",
            "MB",
            "lower",
            "rexec",
            "peak RSS from GNU time",
        )
        speed += [
            _contender(rexec, _fills(partial(big.rexec, op, rexec.key, server), server), rx_err),
            _contender(proc, _fills(partial(big.client, op, proc.key, client), client), proc_err),
            _contender(cli, _fills(partial(big.cli, op, cli.key, cp_rss), cp_rss), cli_err),
            _contender(scp, partial(big.scp, op, scp.key), _sshd_error(env)),
            _contender(scp_o, partial(big.scp, op, scp_o.key, True), _sshd_error(env)),
            _contender(sftp, partial(big.sftp, op, sftp.key), assh_err),
        ]
        rss += [
            _contender(server, None, rx_err),
            _contender(client, None, proc_err),
            _contender(cp_rss, None, cli_err),
        ]
        comparisons += [
            Comparison(rexec.key, scp.key, ">=", 1.2, ">= 1.2x"),
            Comparison(rexec.key, sftp.key, ">=", 3.0, ">= 3x"),
            Comparison(rexec.key, scp_o.key),
            Comparison(proc.key, scp.key),
            Comparison(cli.key, scp.key),
            Comparison(server.key, "", "<", 100.0, "< 100 MB"),
            Comparison(client.key, "", "<", 100.0, "< 100 MB"),
            Comparison(cp_rss.key, "", "<", 100.0, "< 100 MB"),
        ]
    m = f"xfer {label}, no network"
    send = Row(
        "xfer.floor_send",
        m,
        "floor: read + SHA-256 (a sender's file work)",
        "MB/s",
        "higher",
        "floor",
        "256 KiB pieces, one core",
    )
    recv = Row(
        "xfer.floor_recv",
        m,
        "floor: SHA-256 + write (a receiver's file work)",
        "MB/s",
        "higher",
        "floor",
        "256 KiB pieces, one core",
    )
    speed += [
        _contender(send, partial(big.floor, "send", send.key), None),
        _contender(recv, partial(big.floor, "recv", recv.key), None),
    ]
    comparisons += [
        Comparison(recv.key, "xfer_up.scp"),
        Comparison(recv.key, "xfer_down.scp"),
        Comparison("xfer_up.rexec", recv.key),
        Comparison("xfer_down.rexec", recv.key),
    ]
    return Group(
        f"xfer: one {label} file up and down, on {big.data.fs} (MB = 10^6 bytes)",
        speed + rss,
        2 if quick else 3,
        60 if quick else 300,
        comparisons,
    )


def _cp_error(env: Any) -> str | None:
    """Why `rexec cp` cannot be measured (issue 14's CLI, GNU time for its RSS), or None."""
    try:
        res = subprocess.run(
            [str(REXEC_BIN), "cp", "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"rexec cp --help: {exc}"[:160]
    if res.returncode != 0 or not res.stdout.startswith(b"usage: rexec cp"):
        return "no `rexec cp` in this tree"
    if "time" not in ensure_tools({"time": "time"}):
        return f"{TIME} missing (apt-get install time)"
    return None


# ---- xfer-tree --------------------------------------------------------------------------------
class Tree:
    """The contenders of xfer-tree: one sample each moves the tree one way and checks it."""

    def __init__(self, env: Any, count: int) -> None:
        self.env = env
        self.count = count
        self.data = data(env.cfg.quick)
        self.src = self.data.make_tree(count)
        self.full = _Once()
        self.contents: dict[str, bytes] = {}

    def timed(self, name: str, key: str, go: Callable[[Path], None]) -> list[float]:
        dst = self.data.fresh(name) / "tree"
        try:
            t0 = time.perf_counter()
            go(dst)
            seconds = time.perf_counter() - t0
            check_tree(dst, self.data.tree_manifest, self.full(key), key)
        finally:
            shutil.rmtree(dst.parent, ignore_errors=True)
        return [seconds]

    def pair(self, op: str, dst: Path, remote: Callable[[str], str], slash: str = "") -> list[str]:
        a, b = f"{self.src}{slash}", f"{dst}{slash}"
        return [a, remote(b)] if op == "put" else [remote(a), b]

    def rexec(self, op: str, key: str) -> list[float]:
        def go(dst: Path) -> None:
            res = self.env.loop.run(_api(self.env.rexec_conn, op, self.src, dst, True), TIMEOUT)
            _check_result(res, self.count, key)

        return self.timed("rexec", key, go)

    def cli(self, op: str, key: str) -> list[float]:
        rx = self.env.rexec

        def go(dst: Path) -> None:
            argv = [
                str(REXEC_BIN),
                "cp",
                "-q",
                "-r",
                *self.pair(op, dst, lambda p: f"{rx.addr}:{p}"),
            ]
            res = subprocess.run(
                argv,
                env=rx.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
            if res.returncode != 0:
                err = res.stderr.decode(errors="replace").strip().splitlines()
                raise RuntimeError(
                    f"rexec cp -r: exit {res.returncode} {err[-1] if err else ''}"[:160]
                )

        return self.timed("rexec-cp", key, go)

    def scp(self, op: str, key: str) -> list[float]:
        env = self.env

        def go(dst: Path) -> None:
            pair = self.pair(op, dst, lambda p: _remote(env, p))
            _run(["scp", "-q", "-r", *_ssh_opts(env), *pair], "scp -r")

        return self.timed("scp", key, go)

    def floor(self, atomic: bool, key: str) -> list[float]:
        """The receiving side's file system work alone, in a Python loop with the data in
        memory: mkdir per directory, then per file open(O_CREAT|O_EXCL), write and close,
        and with `atomic` under a temporary name renamed into place, as rexec must (the
        issue's rule: no file appears before its hash matched). No network, no hashing, no
        protocol: rexec's receiver does at least this, in one thread."""
        if not self.contents:
            self.contents = {rel: (self.src / rel).read_bytes() for rel in self.data.tree_manifest}
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

        def go(dst: Path) -> None:
            dst.mkdir()
            dirs: dict[str, int] = {}
            try:
                for rel, body in self.contents.items():
                    top, name = rel.split("/")
                    dfd = dirs.get(top)
                    if dfd is None:
                        os.mkdir(top, 0o755, dir_fd=_dirfd(dirs, dst))
                        dfd = dirs[top] = os.open(top, os.O_RDONLY, dir_fd=dirs[""])
                    if atomic:
                        part = f".{name}.part"
                        fd = os.open(part, flags, 0o600, dir_fd=dfd)
                        os.write(fd, body)
                        os.fchmod(fd, 0o644)
                        os.rename(part, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                    else:
                        fd = os.open(name, flags, 0o644, dir_fd=dfd)
                        os.write(fd, body)
                    os.close(fd)
            finally:
                for fd in dirs.values():
                    os.close(fd)

        return self.timed("floor", key, go)

    def rsync(self, op: str, key: str) -> list[float]:
        env = self.env

        def go(dst: Path) -> None:
            ssh = " ".join(["ssh", *_ssh_opts(env)])
            pair = self.pair(op, dst, lambda p: _remote(env, p), slash="/")
            _run(["rsync", "-a", "-e", ssh, *pair], "rsync -a")

        return self.timed("rsync", key, go)


def _dirfd(dirs: dict[str, int], root: Path) -> int:
    """The destination root's fd, opened once per sample (key "")."""
    if "" not in dirs:
        dirs[""] = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    return dirs[""]


def tree_group(env: Any) -> Group:
    quick = env.cfg.quick
    count = 1_000 if quick else 10_000
    tree = Tree(env, count)
    env.meta["xfer_dir"] = f"{tree.data.dir} ({tree.data.fs})"
    rx_err = _rexec_error(env)
    cli_err = rx_err or _cp_error(env)
    ssh_err = _sshd_error(env)
    rsync_err = ssh_err
    if rsync_err is None and "rsync" not in ensure_tools(RSYNC):
        rsync_err = (
            "rsync unavailable: not installed, and `apt-get install rsync` failed (no network?)"
        )
    contenders: list[Contender] = []
    comparisons: list[Comparison] = []
    for op in ("put", "get"):
        way = "up" if op == "put" else "down"
        m, k = f"tree {way} {count:,} x 1K", f"tree_{way}"
        rexec = Row(f"{k}.rexec", m, f"rexec conn.{op}(recursive=True)", "s", "lower", "rexec")
        cli = Row(
            f"{k}.rexec_cp", m, "rexec cp -q -r (CLI, with start-up; info)", "s", "lower", "rexec"
        )
        scp = Row(f"{k}.scp", m, f"scp -r -o Ciphers={GCM} (ControlMaster)", "s", "lower", "peer")
        rsync = Row(
            f"{k}.rsync",
            m,
            f"rsync -a -e 'ssh -o Ciphers={GCM}' (ControlMaster)",
            "s",
            "lower",
            "peer",
        )
        contenders += [
            _contender(rexec, partial(tree.rexec, op, rexec.key), rx_err),
            _contender(cli, partial(tree.cli, op, cli.key), cli_err),
            _contender(scp, partial(tree.scp, op, scp.key), ssh_err),
            _contender(rsync, partial(tree.rsync, op, rsync.key), rsync_err),
        ]
        comparisons += [
            Comparison(rexec.key, scp.key, "<=", 1 / 3, "<= 0.33x (3x faster)"),
            Comparison(rexec.key, rsync.key, "<=", 1 / 3, "<= 0.33x (3x faster)"),
            Comparison(cli.key, rsync.key),
        ]
    m = f"tree {count:,} x 1K, no network"
    atomic = Row(
        "tree.floor_atomic",
        m,
        "floor: Python loop writing the files, temp name + rename",
        "s",
        "lower",
        "floor",
        "the receiver's least work under rexec's atomic rule; data in memory, no hashing",
    )
    bare = Row(
        "tree.floor_bare",
        m,
        "floor: Python loop writing the files in place",
        "s",
        "lower",
        "floor",
        "open O_EXCL, write, close: no temp name, nothing a crash could not leave half-done",
    )
    contenders += [
        _contender(atomic, partial(tree.floor, True, atomic.key), None),
        _contender(bare, partial(tree.floor, False, bare.key), None),
    ]
    comparisons += [
        Comparison(atomic.key, "tree_up.rsync"),
        Comparison(atomic.key, "tree_down.rsync"),
        Comparison(bare.key, "tree_up.rsync"),
        Comparison("tree_up.rexec", atomic.key),
        Comparison("tree_down.rexec", atomic.key),
    ]
    return Group(
        f"xfer: a tree of {count:,} files of 1 KiB up and down, on {tree.data.fs}",
        contenders,
        2 if quick else 3,
        60 if quick else 240,
        comparisons,
    )


def _fills(sample: Callable[[], list[float]], *rows: Row) -> Callable[[], list[float]]:
    """A sampler that also fills `rows` (RSS read alongside): when it fails, they say why."""

    def wrapped() -> list[float]:
        try:
            return sample()
        except Exception as exc:
            for row in rows:
                row.unavailable = reason(exc)
            raise

    return wrapped


def _contender(row: Row, sample: Callable[[], list[float]] | None, error: str | None) -> Contender:
    """A sampled row, or (sample None) a row filled alongside another's samples."""
    if error is not None:
        row.unavailable = error
        return Contender(row, None)
    return Contender(row, sample)
