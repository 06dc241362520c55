"""`rexec cp` edge cases a scp/rsync user meets: odd file names, trees into the wrong kind of
destination. The real CLI against one real server whose HOME is a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rexec.xferfs import ROOT_REFUSED


@dataclass
class Box:
    address: str
    token: str
    home: Path


@pytest.fixture(scope="module")
def box(e2e: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    base = tmp_path_factory.mktemp("cpedges")
    home = base / "home"
    home.mkdir()
    config = f'[exec]\nbase_env = {{ PATH = "/usr/bin:/bin", HOME = "{home}" }}\n'
    srv = e2e.start_server(base / "srv", config=config)
    try:
        yield Box(srv.address, srv.token, home)
    finally:
        srv.stop()


def cp(e2e: Any, box: Box, *args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """`rexec cp ARGS...` (bytes arguments go as they are: names that are not UTF-8)."""
    return subprocess.run(
        [e2e.REXEC, "cp", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env({"REXEC_TOKEN": box.token}),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_names_that_are_not_utf8_cross_byte_for_byte(e2e: Any, box: Box, tmp_path: Path) -> None:
    """As scp and rsync: a file name is bytes, UTF-8 or not; a lone file, one in a tree and
    a symlink's target all arrive under exactly their own bytes, both ways."""
    bad = b"bad\xffname"
    src = tmp_path / "src"
    tree = src / "t\xe9"  # (U+00E9: valid UTF-8 in a tree beside the invalid names)
    tree.mkdir(parents=True)
    (src / os.fsdecode(bad)).write_bytes(b"lone\n")
    (tree / os.fsdecode(bad)).write_bytes(b"in a tree\n")
    os.symlink(os.fsdecode(b"to\xfe"), tree / os.fsdecode(b"link\xfd"))
    (box.home / "nu").mkdir()
    up = cp(e2e, box, bad, f"{box.address}:nu/".encode(), cwd=src)
    assert (up.returncode, up.stdout, up.stderr) == (0, b"", b"")
    up = cp(e2e, box, "-r", "t\xe9", f"{box.address}:nu/", cwd=src)
    assert (up.returncode, up.stdout, up.stderr) == (0, b"", b"")
    remote = os.fsencode(box.home / "nu")
    assert sorted(os.listdir(remote)) == [bad, "t\xe9".encode()]
    assert Path(os.fsdecode(os.path.join(remote, bad))).read_bytes() == b"lone\n"
    rtree = os.path.join(remote, "t\xe9".encode())
    assert sorted(os.listdir(rtree)) == [bad, b"link\xfd"]
    assert Path(os.fsdecode(os.path.join(rtree, bad))).read_bytes() == b"in a tree\n"
    assert os.readlink(os.path.join(rtree, b"link\xfd")) == b"to\xfe"

    back = tmp_path / "back"
    back.mkdir()
    down = cp(e2e, box, "-r", f"{box.address}:nu".encode() + b"/" + bad, b".", cwd=back)
    assert (down.returncode, down.stdout, down.stderr) == (0, b"", b"")
    down = cp(e2e, box, "-r", f"{box.address}:nu/t\xe9", ".", cwd=back)
    assert (down.returncode, down.stdout, down.stderr) == (0, b"", b"")
    local = os.fsencode(back)
    assert sorted(os.listdir(local)) == [bad, "t\xe9".encode()]
    assert Path(os.fsdecode(os.path.join(local, bad))).read_bytes() == b"lone\n"
    ltree = os.path.join(local, "t\xe9".encode())
    assert Path(os.fsdecode(os.path.join(ltree, bad))).read_bytes() == b"in a tree\n"
    assert os.readlink(os.path.join(ltree, b"link\xfd")) == b"to\xfe"


def test_a_tree_whose_directory_fails_is_one_line_not_one_per_entry(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """As scp: a tree sent onto a file (or into a directory that is not there) fails at its
    top directory, and that is the one line; its entries below (each failed too, as
    --json shows) add nothing but noise, the more the bigger the tree."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (tree / name).write_bytes(b"x\n")
    (box.home / "plain").write_bytes(b"old\n")
    onto = cp(e2e, box, "-r", str(tree), f"{box.address}:plain", cwd=tmp_path)
    assert (onto.returncode, onto.stdout, onto.stderr) == (
        1,
        b"",
        f"rexec cp: {box.address}:plain: exists and is not a directory\n".encode(),
    )
    assert (box.home / "plain").read_bytes() == b"old\n"
    args = ["-r", "--json", str(tree), str(tree / "sub"), f"{box.address}:nodir/"]
    into = cp(e2e, box, *args, cwd=tmp_path)
    assert (into.returncode, into.stderr) == (
        1,
        f"rexec cp: {box.address}:nodir/tree: No such file or directory\n"
        f"rexec cp: {box.address}:nodir/sub: No such file or directory\n".encode(),
    )
    assert [json.loads(line)["status"] for line in into.stdout.splitlines()] == ["failed"] * 7
    assert not (box.home / "nodir").exists()


def test_one_directory_to_a_new_dir_slash_makes_it_as_scp_and_cp(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """`cp -r site/ HOST:www/` when www is not there yet: scp and cp make www a copy of
    site (rsync makes it too); a single file to a missing `dir/` still fails, as theirs."""
    site = tmp_path / "site"
    (site / "css").mkdir(parents=True)
    (site / "index.html").write_bytes(b"<p>\n")
    (site / "css" / "a.css").write_bytes(b"p{}\n")
    up = cp(e2e, box, "-r", f"{site}/", f"{box.address}:www/", cwd=tmp_path)
    assert (up.returncode, up.stdout, up.stderr) == (0, b"", b"")
    assert sorted(os.listdir(box.home / "www")) == ["css", "index.html"]
    assert (box.home / "www" / "css" / "a.css").read_bytes() == b"p{}\n"
    again = cp(e2e, box, "-r", f"{site}/", f"{box.address}:www/", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # it exists now: into it, as scp
    assert (box.home / "www" / "site" / "index.html").read_bytes() == b"<p>\n"
    down = cp(e2e, box, "-r", f"{box.address}:www/css", "got/", cwd=tmp_path)
    assert (down.returncode, down.stdout, down.stderr) == (0, b"", b"")
    assert os.listdir(tmp_path / "got") == ["a.css"]
    one = cp(e2e, box, str(site / "index.html"), f"{box.address}:nowhere/", cwd=tmp_path)
    assert (one.returncode, one.stderr) == (
        1,
        f"rexec cp: {box.address}:nowhere/index.html: No such file or directory\n".encode(),
    )
    assert not (box.home / "nowhere").exists()
    back = cp(e2e, box, f"{box.address}:www/index.html", "nowhere/", cwd=tmp_path)
    assert (back.returncode, back.stderr) == (
        1,
        b"rexec cp: nowhere/: No such file or directory\n",
    )
    assert not (tmp_path / "nowhere").exists()
    (box.home / "afile").write_bytes(b"a\n")
    onto = cp(e2e, box, str(site / "index.html"), f"{box.address}:afile/", cwd=tmp_path)
    assert (onto.returncode, onto.stderr) == (
        1,
        f"rexec cp: {box.address}:afile/index.html: Not a directory\n".encode(),
    )
    assert (box.home / "afile").read_bytes() == b"a\n"


def test_overwriting_a_file_keeps_its_mode_and_group_unless_p(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """As scp and rsync: a file that replaces one keeps the old one's mode (a 0600 secret
    stays 0600, a 0755 script stays executable) and group; a new file takes the source's
    mode under the umask, and -p the source's mode even over an old file. Both ways."""
    src = tmp_path / "new.conf"
    src.write_bytes(b"new\n")
    src.chmod(0o644)
    group = os.getgroups()[-1] if os.geteuid() else 100
    for name, mode in (("secret.conf", 0o600), ("run.sh", 0o750)):
        old = box.home / name
        old.write_bytes(b"old\n")
        old.chmod(mode)
        os.chown(old, -1, group)
        done = cp(e2e, box, str(src), f"{box.address}:{name}", cwd=tmp_path)
        assert (done.returncode, done.stderr) == (0, b"")
        st = old.stat()
        assert (old.read_bytes(), st.st_mode & 0o7777, st.st_gid) == (b"new\n", mode, group)
    fresh = cp(e2e, box, str(src), f"{box.address}:fresh.conf", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert (box.home / "fresh.conf").stat().st_mode & 0o7777 == 0o644
    forced = cp(e2e, box, "-p", str(src), f"{box.address}:secret.conf", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (box.home / "secret.conf").stat().st_mode & 0o7777 == 0o644
    local = tmp_path / "local.conf"
    local.write_bytes(b"old\n")
    local.chmod(0o600)
    down = cp(e2e, box, f"{box.address}:fresh.conf", str(local), cwd=tmp_path)
    assert (down.returncode, down.stderr) == (0, b"")
    assert (local.read_bytes(), local.stat().st_mode & 0o7777) == (b"new\n", 0o600)


def test_names_up_to_the_longest_the_file_system_takes(e2e: Any, box: Box, tmp_path: Path) -> None:
    """A name of 255 bytes (NAME_MAX) copies as with cp: its temporary name beside it must
    fit in 255 bytes too, for a file and for a symlink, both ways."""
    src = tmp_path / "long"
    src.mkdir()
    names = ["n" * 255, "é" * 127, "m" * 244]
    for name in names:
        (src / name).write_bytes(name.encode()[:9])
    os.symlink("n" * 255, src / ("l" * 255))
    up = cp(e2e, box, "-r", str(src), f"{box.address}:", cwd=tmp_path)
    assert (up.returncode, up.stdout, up.stderr) == (0, b"", b"")
    remote = box.home / "long"
    assert sorted(os.listdir(remote)) == sorted([*names, "l" * 255])
    for name in names:
        assert (remote / name).read_bytes() == name.encode()[:9]
    assert os.readlink(remote / ("l" * 255)) == "n" * 255
    back = tmp_path / "back"
    back.mkdir()
    down = cp(e2e, box, f"{box.address}:long/{'n' * 255}", str(back), cwd=tmp_path)
    assert (down.returncode, down.stderr) == (0, b"")
    assert os.listdir(back) == ["n" * 255]


def test_resume_of_a_tree_and_of_several_files(e2e: Any, box: Box, tmp_path: Path) -> None:
    """--resume with more than one entry: each file's RESULT may come back while the next
    file waits for its HAVE (the sender pipelines). A tree copies, then is all skipped; a
    partial file left by an earlier attempt continues; both ways."""
    tree = tmp_path / "rtree"
    (tree / "sub").mkdir(parents=True)
    data = {"a": os.urandom(70_000), "b": b"bee\n", "sub/c": os.urandom(300_000)}
    for name, content in data.items():
        (tree / name).write_bytes(content)
    first = cp(e2e, box, "-r", "--resume", "--json", str(tree), f"{box.address}:", cwd=tmp_path)
    assert (first.returncode, first.stderr) == (0, b"")
    statuses = [json.loads(line)["status"] for line in first.stdout.splitlines()]
    assert statuses == ["ok"] * 5
    for name, content in data.items():
        assert (box.home / "rtree" / name).read_bytes() == content
    (box.home / "rtree" / "sub" / "c").unlink()
    (box.home / "rtree" / "sub" / ".c.rexec-part").write_bytes(data["sub/c"][:100_000])
    again = cp(e2e, box, "-r", "--resume", "--json", str(tree), f"{box.address}:", cwd=tmp_path)
    assert (again.returncode, again.stderr) == (0, b"")
    by_path = {o["path"]: o for o in map(json.loads, again.stdout.splitlines())}
    assert by_path["rtree/a"]["status"] == "skipped"
    assert (by_path["rtree/sub/c"]["status"], by_path["rtree/sub/c"]["sent"]) == ("ok", 200_000)
    assert (box.home / "rtree" / "sub" / "c").read_bytes() == data["sub/c"]
    back = tmp_path / "back"
    back.mkdir()
    down = cp(
        e2e, box, "--resume", f"{box.address}:rtree/a", f"{box.address}:rtree/b", ".", cwd=back
    )
    assert (down.returncode, down.stderr) == (0, b"")
    assert sorted(os.listdir(back)) == ["a", "b"]


def test_a_tilde_names_the_remote_home_as_in_scp(e2e: Any, box: Box, tmp_path: Path) -> None:
    """`HOST:~/x` and `HOST:~` are the home, as scp and rsync users write them (not a
    directory named `~`); `HOST:./~` is still a file named `~`."""
    (box.home / "tsub").mkdir()
    src = tmp_path / "tilde.txt"
    src.write_bytes(b"t\n")
    for dest in ("~/tsub/", "~", "~/tsub/renamed"):
        done = cp(e2e, box, str(src), f"{box.address}:{dest}", cwd=tmp_path)
        assert (done.returncode, done.stderr) == (0, b"")
    assert (box.home / "tsub" / "tilde.txt").read_bytes() == b"t\n"
    assert (box.home / "tilde.txt").read_bytes() == b"t\n"
    assert (box.home / "tsub" / "renamed").read_bytes() == b"t\n"
    assert not (box.home / "~").exists()
    down = cp(e2e, box, f"{box.address}:~/tsub/renamed", "back.txt", cwd=tmp_path)
    assert (down.returncode, down.stderr) == (0, b"")
    assert (tmp_path / "back.txt").read_bytes() == b"t\n"
    literal = cp(e2e, box, str(src), f"{box.address}:./~", cwd=tmp_path)
    assert (literal.returncode, literal.stderr) == (0, b"")
    assert (box.home / "~").read_bytes() == b"t\n"


def test_a_file_older_than_1970_copies(e2e: Any, box: Box, tmp_path: Path) -> None:
    """A modification time before the epoch (old archives have them) cannot go on the wire
    (mtime_ns is unsigned): the file still copies, -p gives it the epoch, and the rest of
    the transfer goes on rather than ending as a protocol error."""
    tree = tmp_path / "old"
    tree.mkdir()
    (tree / "o").write_bytes(b"old\n")
    (tree / "p").write_bytes(b"new\n")
    os.utime(tree / "o", ns=(-315_619_200_000_000_000, -315_619_200_000_000_000))
    os.utime(tree, ns=(-1, -1))
    for flags, name in ((["-r"], "old1"), (["-r", "-p"], "old2")):
        done = cp(e2e, box, *flags, str(tree), f"{box.address}:{name}", cwd=tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
        assert (box.home / name / "o").read_bytes() == b"old\n"
        assert (box.home / name / "p").read_bytes() == b"new\n"
    assert (box.home / "old2" / "o").stat().st_mtime_ns == 0
    assert (box.home / "old2").stat().st_mtime_ns == 0


def test_remote_names_cannot_drive_the_terminal(e2e: Any, box: Box, tmp_path: Path) -> None:
    """A server's file names (and errors) are shown with control characters as `?`, as
    `rexec run`'s error tails: an escape sequence in a name must not recolour, move the
    cursor or fake a line (scp's CVE-2019-6109); --json carries the exact name."""
    evil = "\x1b[31mred\x1b[0m\nrexec cp: fake\x07"
    (box.home / "evil").mkdir()
    (box.home / "evil" / evil).write_bytes(b"e\n")
    got = tmp_path / "got"
    (got / "evil" / evil).mkdir(parents=True)  # a directory where the file goes: it fails
    done = cp(e2e, box, "-r", "--json", f"{box.address}:evil", "got", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (
        1,
        b"rexec cp: got/evil/?[31mred?[0m?rexec cp: fake?: is a directory\n",
    )
    paths = [json.loads(line)["path"] for line in done.stdout.splitlines()]
    assert paths == ["evil", f"evil/{evil}"]


def test_a_local_failure_is_one_line_for_a_whole_host_set(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """An upload to a host set whose local source is missing: that is one fact about this
    machine, one line (not one identical line per host), then the summary."""
    port = box.address.rpartition(":")[2]
    (tmp_path / "ok.txt").write_bytes(b"ok\n")
    (box.home / "set").mkdir()
    hosts = f"127.0.0.1:{port},localhost:{port}"
    done = cp(e2e, box, "ok.txt", "missing.txt", f"{hosts}:set/", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (
        1,
        b"rexec cp: missing.txt: No such file or directory\n"
        + f"2 hosts: 2 failed (127.0.0.1:{port},localhost:{port})\n".encode(),
    )
    assert (box.home / "set" / "ok.txt").read_bytes() == b"ok\n"


def test_the_remote_root_is_refused_not_read_as_the_home(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """`HOST:/` is the server's root directory: refused as a local `/` is (it has no name
    to land under), never silently the home instead (a whole home copied as DST)."""
    for source in ("/", "//", "/tmp/.."):
        done = cp(e2e, box, "-r", f"{box.address}:{source}", "x", cwd=tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (
            2,
            b"",
            f"rexec cp: {source}: {ROOT_REFUSED}\n".encode(),
        )
        assert not (tmp_path / "x").exists()


def test_a_server_refuses_its_root_to_any_client(
    box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own check, for clients that do not make it: the entry fails."""
    from rexec import Client
    from rexec.client import xfercore

    monkeypatch.setattr(xfercore, "check_remote_source", lambda path: path)
    with Client(box.address, token=box.token) as client:
        got = client.get("/", tmp_path / "y", recursive=True, check=False)
    assert [(f.path, f.error) for f in got.files] == [
        ("root", "cannot copy the root directory itself (name what is in it)")
    ]
    assert not (tmp_path / "y").exists()


def test_a_file_named_with_a_trailing_slash_is_not_a_directory(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """`f/` says f is a directory: for a file that is an error, as with scp and cp, at
    either end (not a silent copy of f); `d/` is d."""
    (tmp_path / "f").write_bytes(b"f\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "in").write_bytes(b"in\n")
    up = cp(e2e, box, "f/", f"{box.address}:", cwd=tmp_path)
    assert (up.returncode, up.stderr) == (1, b"rexec cp: f/: Not a directory\n")
    assert not (box.home / "f").exists()
    (box.home / "rf").write_bytes(b"rf\n")
    down = cp(e2e, box, f"{box.address}:rf/", "got", cwd=tmp_path)
    assert (down.returncode, down.stderr) == (
        1,
        f"rexec cp: {box.address}:rf/: Not a directory\n".encode(),
    )
    assert not (tmp_path / "got").exists()
    tree = cp(e2e, box, "-r", "d/", f"{box.address}:dslash", cwd=tmp_path)
    assert (tree.returncode, tree.stderr) == (0, b"")
    assert (box.home / "dslash" / "in").read_bytes() == b"in\n"


def _chain(top: Path, name: str, depth: int) -> None:
    """top/name/name/... depth times (by descriptor: the path may be too long for open())."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def _unchain(top: Path, name: str) -> None:
    """Remove top/name/name/... (shutil.rmtree recurses: Python 3.11's overflows here)."""
    fds = [os.open(top, os.O_RDONLY)]
    try:
        while name in os.listdir(fds[-1]):
            fds.append(os.open(name, os.O_RDONLY, dir_fd=fds[-1]))
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir(name, dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def _depth(top: Path, name: str) -> int:
    depth, fd = 0, os.open(top, os.O_RDONLY)
    try:
        while name in os.listdir(fd):
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, depth = nxt, depth + 1
    finally:
        os.close(fd)
    return depth


def test_a_tree_deeper_than_python_s_stack_and_the_wire_s_paths(
    e2e: Any, box: Box, tmp_path: Path
) -> None:
    """A tree 1100 directories deep copies (no RecursionError traceback). In one whose
    paths outgrow a wire path (4096 bytes), what fits is copied and the directory whose
    entries would not fit is one failed line; the rest of the transfer goes on."""
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "long").mkdir()
    (src / "top.txt").write_bytes(b"top\n")
    name = "n" * 200
    try:
        _chain(src / "deep", "a", 1100)
        _chain(src / "long", name, 25)
        done = cp(e2e, box, "-r", "src", f"{box.address}:", cwd=tmp_path)
        depth = _depth(box.home / "src" / "deep", "a")
    finally:
        for top in (src, box.home / "src"):
            if (top / "deep").exists():
                _unchain(top / "deep", "a")
    cut = "src/long" + f"/{name}" * 20  # 4028 bytes: one more part would be 4229
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        b"",
        f"rexec cp: {cut}: entries below it not copied (their paths exceed 4096 bytes)\n".encode(),
    )
    assert (box.home / "src" / "top.txt").read_bytes() == b"top\n"
    assert depth == 1100
    assert _depth(box.home / "src" / "long", name) == 20
