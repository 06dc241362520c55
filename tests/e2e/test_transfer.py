"""File transfers (issue 14) end to end, through both drivers: `rexec.Client.put/get` and
`rexec.connect(...).put/get`, against a real server on 127.0.0.1.

Trees round-trip byte-exact (hashes and stat compared), an interrupted file leaves the old
destination intact and resume sends only the rest (counted in the results), a full disk is
a clear FAILED line, and paths cannot escape a token's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import rexec
from rexec import FileStatus, TransferError, TransferProgress, TransferResult

T = TypeVar("T")
STEP = 120.0
MTIME = 1_600_000_000_123_456_789


class Stop(Exception):
    """Raised from a progress callback: the transfer dies mid-file."""


class Side:
    """One connection through one driver, with a blocking face."""

    def __init__(self, kind: str, address: str, token: str) -> None:
        self.kind = kind
        if kind == "sync":
            self.client: rexec.Client | None = rexec.Client(address, token=token)
            self.loop = None
        else:
            self.client = None
            self.loop = asyncio.new_event_loop()
            self.conn: rexec.Connection = self.call(rexec.connect(address, token=token))

    def call(self, aw: Awaitable[T]) -> T:
        assert self.loop is not None

        async def bounded() -> T:
            return await asyncio.wait_for(aw, STEP)

        return self.loop.run_until_complete(bounded())

    def put(self, *args: Any, **kw: Any) -> TransferResult:
        if self.client is not None:
            return self.client.put(*args, **kw)
        return self.call(self.conn.put(*args, **kw))

    def get(self, *args: Any, **kw: Any) -> TransferResult:
        if self.client is not None:
            return self.client.get(*args, **kw)
        return self.call(self.conn.get(*args, **kw))

    def run(self, cmd: str) -> rexec.Result:
        if self.client is not None:
            return self.client.run(cmd)
        return self.call(self.conn.run(cmd))

    def kill(self) -> None:
        """End the connection now (sync: a reset; async: CLOSE, the server stops it)."""
        if self.client is not None:
            self.client.abort()
        else:
            self.call(self.conn.close())

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            else:
                self.call(self.conn.close())
        finally:
            if self.loop is not None:
                self.loop.close()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest, server: Any) -> Iterator[Callable[..., Side]]:
    sides: list[Side] = []

    def make(token: str | None = None, srv: Any = None) -> Side:
        srv = srv or server
        side = Side(request.param, srv.address, token or srv.token)
        sides.append(side)
        return side

    yield make
    for side in sides:
        with contextlib.suppress(Exception):
            side.close()


# ---- trees -----------------------------------------------------------------------------


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(MTIME, MTIME))


def make_tree(root: Path, big: int = 3 * 1024 * 1024) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "empty-dir").mkdir()
    write(root / "top.txt", b"top\n" * 1000, 0o640)
    write(root / "a" / "empty", b"", 0o600)
    write(root / "a" / "b" / "mid.bin", os.urandom(big), 0o600)
    write(root / "a" / "b" / "c" / "deep.sh", b"#!/bin/sh\necho deep\n", 0o755)
    os.symlink("b/mid.bin", root / "a" / "link")
    os.utime(root / "a" / "link", ns=(MTIME, MTIME), follow_symlinks=False)
    (root / "a" / "b").chmod(0o750)
    for d in (root / "a" / "b" / "c", root / "a" / "b" / "empty-dir", root / "a" / "b"):
        os.utime(d, ns=(MTIME - 10**9, MTIME - 10**9))
    os.utime(root / "a", ns=(MTIME - 2 * 10**9, MTIME - 2 * 10**9))


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below root: kind, permission bits, mtime, size and content hash (or link
    target). The top directory's own stat is left out (it is the test's)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, sha(p))
    return out


def test_a_tree_round_trips_byte_exact_with_preserve(
    connect: Callable[..., Side], tmp_path: Path
) -> None:
    src, remote, back = tmp_path / "src", tmp_path / "remote", tmp_path / "back"
    make_tree(src)
    remote.mkdir()
    back.mkdir()
    side = connect()
    seen: list[TransferProgress] = []
    up = side.put(src, str(remote), recursive=True, preserve=True, progress=seen.append)
    assert up.ok and up.direction == "put"
    assert snapshot(remote / "src") == snapshot(src)
    total = sum(f.size for f in up.files)
    assert up.bytes == total == sum(f.sent for f in up.files)
    assert [f.path for f in up.files][:3] == ["src", "src/a", "src/a/b"]
    kinds = {f.path: f.kind for f in up.files}
    assert kinds["src/a/link"] == "symlink" and kinds["src/a/b/empty-dir"] == "dir"
    mid = next(f for f in up.files if f.path == "src/a/b/mid.bin")
    assert mid.sha256 == sha(src / "a" / "b" / "mid.bin") and mid.status is FileStatus.OK
    assert seen and seen[-1].total == total and seen[-1].files == len(up.files)
    assert seen[-1].total_done == total and seen[-1].files_done == len(up.files)
    assert {p.path for p in seen} == {f.path for f in up.files}  # every entry, as it ends
    got: list[TransferProgress] = []
    down = side.get(str(remote / "src"), back, recursive=True, preserve=True, progress=got.append)
    assert down.ok and down.direction == "get" and down.bytes == total
    assert (got[-1].total, got[-1].files) == (total, len(down.files))  # the TREE's, unswapped
    assert snapshot(back / "src") == snapshot(src)
    assert not list(back.rglob("*.rexec-part")) and not list(remote.rglob("*.rexec-part"))


@pytest.mark.parametrize(
    "size", [16 * 1024 * 1024 + 7, pytest.param(200 * 1024 * 1024, marks=pytest.mark.slow)]
)
def test_a_big_file_round_trips(
    connect: Callable[..., Side], server: Any, tmp_path: Path, size: int
) -> None:
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for n in range(0, size, 1 << 22):
            f.write(os.urandom(min(1 << 22, size - n)))
    side = connect()
    up = side.put(src, str(tmp_path / "up"))
    assert up.bytes == size and up.files[0].sha256 == sha(src) == sha(tmp_path / "up")
    down = side.get(str(tmp_path / "up"), tmp_path / "down")
    assert down.bytes == size and sha(tmp_path / "down") == up.files[0].sha256
    assert server.rss_kib() < 100 * 1024  # bounded by the windows, whatever the file size


# ---- scp's rules -----------------------------------------------------------------------


def test_destinations_follow_scp(connect: Callable[..., Side], tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "f1", b"one")
    write(tmp_path / "f2", b"two")
    (tmp_path / "dir").mkdir()
    side = connect()
    side.put(tmp_path / "f1", str(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_bytes() == b"one"
    side.put(tmp_path / "f1", str(tmp_path / "d"))  # an existing directory: inside it
    side.put([tmp_path / "f1", tmp_path / "f2"], str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path / "d")) == ["f1", "f2"]
    missing = side.put(tmp_path / "f1", str(tmp_path / "nodir") + "/", check=False)
    assert [(f.status, f.error) for f in missing.files] == [
        (FileStatus.FAILED, "No such file or directory")
    ]
    noflag = side.put(tmp_path / "dir", str(tmp_path / "d"), check=False)
    assert [(f.path, f.kind, f.error) for f in noflag.files] == [
        ("dir", "dir", "is a directory (use -r)")
    ]
    with pytest.raises(TransferError, match="1 of 1 files failed; dir: is a directory"):
        side.put(tmp_path / "dir", str(tmp_path / "d"))
    (tmp_path / "local").mkdir()
    got = side.get([str(tmp_path / "f1"), str(tmp_path / "f2")], tmp_path / "local")
    assert got.ok and sorted(os.listdir(tmp_path / "local")) == ["f1", "f2"]
    gone = side.get(str(tmp_path / "nope"), tmp_path / "local", check=False)
    assert [(f.path, f.error) for f in gone.files] == [("nope", "No such file or directory")]


def test_a_fifo_is_refused_and_the_rest_goes_on(
    connect: Callable[..., Side], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    write(src / "ok", b"fine")
    result = connect().put(src, str(tmp_path / "dst"), recursive=True, check=False)
    assert {f.path: (f.status, f.error) for f in result.files} == {
        "src": (FileStatus.OK, None),
        "src/ok": (FileStatus.OK, None),
        "src/pipe": (FileStatus.FAILED, "not a regular file (a fifo)"),
    }
    assert (tmp_path / "dst" / "ok").read_bytes() == b"fine"


def test_file_result_paths_are_wire_paths_whichever_side_failed(
    connect: Callable[..., Side], tmp_path: Path
) -> None:
    """FileResult.path: the entry's relative wire path (its first part the source's name)
    for a failure at either end; "" for a local destination that cannot be opened."""
    side = connect()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write(src / "sub" / "f", b"f")
    os.mkfifo(src / "sub" / "pipe")  # the sender's failure (at_source)
    (tmp_path / "down" / "src").mkdir(parents=True)
    (tmp_path / "down" / "src" / "sub").write_bytes(b"in the way")  # the receiver's failure
    for result in (
        side.put(src, str(tmp_path / "down") + "/", recursive=True, check=False),
        side.get(str(src), tmp_path / "down", recursive=True, check=False),
    ):
        failed = {f.path: f.at_source for f in result.failed}
        assert failed["src/sub/pipe"] is True, result.files
        assert failed["src/sub"] is False, result.files
        assert all(not f.path.startswith("/") for f in result.files), result.files
    nodir = str(tmp_path / "no" / "dir") + "/"
    down = side.get(str(src / "sub" / "f"), nodir, check=False)
    assert [(f.path, f.kind, f.status, f.error, f.at_source) for f in down.files] == [
        ("", "dir", FileStatus.FAILED, "No such file or directory", False)
    ]
    with pytest.raises(TransferError, match="1 of 1 files failed; the destination: No such"):
        side.get(str(src / "sub" / "f"), nodir)
    # `/` has no name to land under: refused before anything is sent, the connection goes on
    with pytest.raises(ValueError, match=r"^/: cannot copy the root directory itself"):
        side.put(["/", src], str(tmp_path / "root"), recursive=True)
    assert not (tmp_path / "root").exists()
    assert side.run("echo on").stdout == b"on\n"


# ---- interrupted, then resumed ---------------------------------------------------------


def _stop_after(limit: int) -> Callable[[TransferProgress], None]:
    def progress(p: TransferProgress) -> None:
        if p.done >= limit:
            raise Stop

    return progress


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_killed_transfer_keeps_the_old_file_and_resume_sends_only_the_rest(
    connect: Callable[..., Side], server: Any, tmp_path: Path, direction: str
) -> None:
    size = 24 * 1024 * 1024
    src = tmp_path / "src.bin"
    write(src, os.urandom(size))
    dest = tmp_path / "dest.bin"
    write(dest, b"the old version")
    part = tmp_path / ".dest.bin.rexec-part"
    side = connect()
    transfer = side.put if direction == "put" else side.get
    a, b = (src, str(dest)) if direction == "put" else (str(src), dest)
    audits = len(server.audit_lines())
    with pytest.raises(Stop):
        transfer(a, b, progress=_stop_after(6 * 1024 * 1024))
    side.kill()
    server.wait_audit(audits + 1, timeout=10)  # the server has let go of the channel
    assert dest.read_bytes() == b"the old version"
    have = part.stat().st_size
    assert 0 < have < size
    again = connect()
    result = (again.put if direction == "put" else again.get)(a, b, resume=True)
    (f,) = result.files
    assert f.status is FileStatus.OK and f.sent == size - have == result.bytes
    assert sha(dest) == sha(src) == f.sha256 and not part.exists()
    done = (again.put if direction == "put" else again.get)(a, b, resume=True)
    assert done.files[0].status is FileStatus.SKIPPED and done.bytes == 0


# ---- a full disk -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_full_disk_fails_that_file_cleanly(
    connect: Callable[..., Side], tmp_path: Path, small_disk: Path, direction: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write(src / "big", os.urandom(3 * 1024 * 1024))
    write(src / "small", b"fits")
    write(small_disk / "big", b"old content")
    side = connect()
    transfer = side.put if direction == "put" else side.get
    files = [src / "big", src / "small"]
    args = (files, str(small_disk)) if direction == "put" else ([str(f) for f in files], small_disk)
    with pytest.raises(TransferError) as info:
        transfer(*args)
    message = str(info.value)
    assert "1 of 2 files failed; big: No space left on device" in message
    result = info.value.result
    assert [(f.path, f.status) for f in result.files] == [
        ("big", FileStatus.FAILED),
        ("small", FileStatus.OK),
    ]
    assert (small_disk / "big").read_bytes() == b"old content"
    assert (small_disk / "small").read_bytes() == b"fits"


def test_an_abandoned_transfer_ends_its_channel_and_the_connection_goes_on(
    connect: Callable[..., Side], server: Any, tmp_path: Path
) -> None:
    write(tmp_path / "src", os.urandom(8 * 1024 * 1024))
    write(tmp_path / "dest", b"old")
    side = connect()
    audits = len(server.audit_lines())
    with pytest.raises(Stop):
        side.put(tmp_path / "src", str(tmp_path / "dest"), progress=_stop_after(1))
    (record,) = server.wait_audit(audits + 1, timeout=10)[audits:]
    assert record["command"].startswith("rexec-transfer put") and record["exit_code"] == 1
    assert record["transfer"]["result"] == "incomplete"
    assert (tmp_path / "dest").read_bytes() == b"old"
    assert side.put(tmp_path / "src", str(tmp_path / "dest")).ok
    assert side.run("echo on").stdout == b"on\n"
