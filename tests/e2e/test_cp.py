"""`rexec cp` end to end: the real CLI against real servers, one host and host sets.

lab1..lab3 are three servers on 127.0.1.1-3, each with a HOME of its own (remote relative
paths land there, so an upload to the set can be checked per host); lab4 is an address
nobody listens on; lab5 is lab1's address with lab2's token (authentication fails); usock
is lab1's unix socket under an alias. Client-config aliases name them, each with a token file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect  # type: ignore[import-untyped]
import pytest

MTIME_NS = 1_600_000_000_123_456_789


@dataclass
class Lab:
    config: Path
    homes: dict[str, Path]  # lab1..lab3 -> the HOME its server resolves relative paths in
    dead: str  # lab4's address
    pids: dict[str, int]  # lab1..lab3 -> its server's pid

    def env(self) -> dict[str, str]:
        return {"REXEC_CONFIG": str(self.config)}


def _secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def _dead_address() -> str:
    with socket.socket() as s:  # bound, never listening: connecting is refused
        s.bind(("127.0.1.4", 0))
        return f"127.0.1.4:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def lab(e2e: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("cplab")
    servers = []
    homes: dict[str, Path] = {}
    aliases = []
    try:
        for n in (1, 2, 3):
            home = base / f"home{n}"
            home.mkdir()
            config = f'[exec]\nbase_env = {{ PATH = "/usr/bin:/bin", HOME = "{home}" }}\n'
            unix = [str(base / "lab1.sock")] if n == 1 else []
            srv = e2e.start_server(
                base / f"srv{n}", config=config, listen=[f"127.0.1.{n}:0"], unix=unix
            )
            servers.append(srv)
            homes[f"lab{n}"] = home
            token = _secret(base / f"lab{n}.token", srv.token)
            aliases.append(f'[hosts.lab{n}]\naddress = "{srv.address}"\ntoken_file = "{token}"\n')
        dead = _dead_address()
        lab1_token = base / "lab1.token"
        aliases.append(f'[hosts.lab4]\naddress = "{dead}"\ntoken_file = "{lab1_token}"\n')
        lab2_token = base / "lab2.token"
        lab1_address = servers[0].address
        aliases.append(f'[hosts.lab5]\naddress = "{lab1_address}"\ntoken_file = "{lab2_token}"\n')
        aliases.append(
            f'[hosts.usock]\naddress = "unix:{base / "lab1.sock"}"\ntoken_file = "{lab1_token}"\n'
        )
        config_path = base / "client.toml"
        config_path.write_text("".join(aliases) + '[groups]\nlab = "lab[1-3]"\n')
        pids = {f"lab{n}": srv.pid for n, srv in enumerate(servers, 1)}
        yield Lab(config_path, homes, dead, pids)
    finally:
        for srv in servers:
            srv.stop()


def cp(
    e2e: Any, lab: Lab, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = e2e.clean_env(lab.env())
    return subprocess.run(
        [e2e.REXEC, "cp", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tree(root: Path) -> dict[str, tuple[str, int]]:
    """A tree with nested dirs, an empty file, a symlink and odd modes; returns
    relative path -> (sha256 or link target, mode) for the files and links."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "sub" / "deeper" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "deeper" / "run.sh", 0o751)
    os.chmod(root / "a.txt", 0o640)
    os.symlink("../a.txt", root / "sub" / "link")
    for path in [*root.rglob("*"), root]:
        if not path.is_symlink():
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return describe(root)


def describe(root: Path) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = (f"-> {os.readlink(path)}", 0)
        elif path.is_dir():
            out[rel] = ("dir", path.stat().st_mode & 0o7777)
        else:
            out[rel] = (sha(path), path.stat().st_mode & 0o7777)
    return out


def mtimes(root: Path) -> set[int]:
    return {p.lstat().st_mtime_ns for p in [root, *root.rglob("*")] if not p.is_symlink()}


# ---- one host --------------------------------------------------------------------------------


def test_upload_and_download_one_file(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "one.bin"
    src.write_bytes(os.urandom(1024 * 1024 + 3))
    up = cp(e2e, lab, str(src), "lab1:one-up.bin")
    assert (up.returncode, up.stdout, up.stderr) == (0, b"", b"")  # a pipe: no progress
    assert sha(lab.homes["lab1"] / "one-up.bin") == sha(src)
    down = cp(e2e, lab, "lab1:one-up.bin", str(tmp_path / "back.bin"))
    assert (down.returncode, down.stdout, down.stderr) == (0, b"", b"")
    assert sha(tmp_path / "back.bin") == sha(src)
    # HOST: alone is the remote home; an existing local directory receives the file
    (tmp_path / "into").mkdir()
    down = cp(e2e, lab, "lab1:one-up.bin", str(tmp_path / "into"))
    assert down.returncode == 0, down.stderr
    assert sha(tmp_path / "into" / "one-up.bin") == sha(src)


def test_a_unix_socket_server_through_an_alias(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "via-unix.txt"
    src.write_bytes(b"over a unix socket\n")
    done = cp(e2e, lab, str(src), "usock:")
    assert done.returncode == 0, done.stderr
    assert (lab.homes["lab1"] / "via-unix.txt").read_bytes() == b"over a unix socket\n"


def test_tree_round_trip_with_preserve(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    tree = tmp_path / "ptree"
    want = make_tree(tree)
    up = cp(e2e, lab, "-r", "-p", str(tree), "lab1:")
    assert (up.returncode, up.stderr) == (0, b"")
    remote = lab.homes["lab1"] / "ptree"
    assert describe(remote) == want
    assert mtimes(remote) == {MTIME_NS}
    back = tmp_path / "back"
    back.mkdir()
    down = cp(e2e, lab, "-rp", "lab1:ptree", str(back))
    assert (down.returncode, down.stderr) == (0, b"")
    assert describe(back / "ptree") == want
    assert mtimes(back / "ptree") == {MTIME_NS}


def test_a_directory_without_r_fails_that_file_exit_1(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_bytes(b"good\n")
    (tmp_path / "adir").mkdir()
    (lab.homes["lab1"] / "mixed").mkdir()  # as scp: the target directory must exist
    done = cp(e2e, lab, str(tmp_path / "good.txt"), str(tmp_path / "adir"), "lab1:mixed/")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    # the local source is at fault, so it is named (as scp does), not the remote destination
    assert lines == [f"rexec cp: {tmp_path / 'adir'}: is a directory (use -r)"]
    assert (lab.homes["lab1"] / "mixed" / "good.txt").read_bytes() == b"good\n"


def test_a_missing_remote_file_exit_1(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    done = cp(e2e, lab, "lab1:no-such-file", str(tmp_path / "x"))
    assert done.returncode == 1
    assert done.stderr == b"rexec cp: lab1:no-such-file: No such file or directory\n"
    assert not (tmp_path / "x").exists()


def test_local_failures_name_the_local_path(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    """A missing local source (put) or an unwritable local destination (get) is named by
    its local path, never as HOST:PATH."""
    missing = tmp_path / "nonexist"
    done = cp(e2e, lab, str(missing), "lab1:x")
    assert (done.returncode, done.stderr) == (
        1,
        f"rexec cp: {missing}: No such file or directory\n".encode(),
    )
    (lab.homes["lab1"] / "f").write_bytes(b"f\n")
    nodir = tmp_path / "no" / "dir"
    done = cp(e2e, lab, "lab1:f", f"{nodir}/")
    assert (done.returncode, done.stderr) == (
        1,
        f"rexec cp: {nodir}: No such file or directory\n".encode(),
    )


def test_json_one_object_per_file(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    tree = tmp_path / "jtree"
    tree.mkdir()
    (tree / "x").write_bytes(b"x" * 1000)
    (tree / "y").write_bytes(b"")
    done = cp(e2e, lab, "-r", "--json", str(tree), "lab1:")
    assert done.returncode == 0, done.stderr
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    files = {o["path"]: o for o in objects if o["kind"] == "file"}
    assert {p.rpartition("/")[2] for p in files} == {"x", "y"}
    for obj in objects:
        assert (obj["host"], obj["direction"], obj["status"], obj["error"]) == (
            "lab1",
            "put",
            "ok",
            None,
        )
    x = next(o for p, o in files.items() if p.endswith("x"))
    assert (x["size"], x["sent"], x["sha256"]) == (1000, 1000, sha(tree / "x"))


def test_resume_skips_a_complete_file(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "res.bin"
    src.write_bytes(os.urandom(300_000))
    first = cp(e2e, lab, "--json", str(src), "lab1:res.bin")
    again = cp(e2e, lab, "--json", "--resume", str(src), "lab1:res.bin")
    assert (first.returncode, again.returncode) == (0, 0), again.stderr
    (one,), (two,) = (
        [json.loads(line) for line in done.stdout.splitlines()] for done in (first, again)
    )
    assert (one["status"], one["sent"]) == ("ok", 300_000)
    assert (two["status"], two["sent"], two["sha256"]) == ("skipped", 0, sha(src))


def test_resume_with_several_files_both_ways(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    """The receiver's RESULT for one file and its HAVE for the next cross on the wire; a
    resumed copy of two files used to end in a protocol error ("kind 18 out of order")."""
    a, b = tmp_path / "ra.bin", tmp_path / "rb.bin"
    a.write_bytes(os.urandom(100_000))
    b.write_bytes(os.urandom(70_000))
    up = cp(e2e, lab, "--resume", str(a), str(b), "lab1:")
    assert (up.returncode, up.stderr) == (0, b"")
    down = tmp_path / "down"
    down.mkdir()
    back = cp(e2e, lab, "--resume", "lab1:ra.bin", "lab1:rb.bin", str(down))
    assert (back.returncode, back.stderr) == (0, b"")
    assert [sha(down / n) for n in ("ra.bin", "rb.bin")] == [sha(a), sha(b)]


def test_ctrl_c_keeps_the_old_file_and_resume_sends_the_rest(
    e2e: Any, lab: Lab, tmp_path: Path
) -> None:
    """The server is stopped (SIGSTOP) once the partial file exists, so that Ctrl-C lands
    mid-file whatever the machine's speed; the old destination survives; --resume completes
    the file sending less than all of it."""
    src = tmp_path / "intr.bin"
    src.write_bytes(os.urandom(32 * 1024 * 1024))
    home = lab.homes["lab2"]
    (home / "intr.bin").write_bytes(b"old\n")
    part = home / ".intr.bin.rexec-part"
    cli = subprocess.Popen(
        [e2e.REXEC, "cp", str(src), "lab2:intr.bin"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env(lab.env()),
    )
    stopped = False
    try:
        assert e2e.wait_until(lambda: part.exists() and part.stat().st_size > 0, 20)
        os.kill(lab.pids["lab2"], signal.SIGSTOP)
        stopped = True
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=20)
    finally:
        if stopped:
            os.kill(lab.pids["lab2"], signal.SIGCONT)
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    assert (cli.returncode, out) == (130, b""), err
    assert err == (
        b"rexec cp: lab2: interrupted: closing the connection (partial files are kept for "
        b"--resume)\n"
    )
    assert (home / "intr.bin").read_bytes() == b"old\n"
    # the server's side of the interrupted transfer winds down after SIGCONT (it still reads
    # what the client had sent); until then it holds the partial file's lock
    assert e2e.wait_until(lambda: _unlocked(part), 20)
    kept = part.stat().st_size  # (on a loaded machine the server may have had it all)
    assert kept > 0
    done = cp(e2e, lab, "--resume", "--json", str(src), "lab2:intr.bin")
    assert done.returncode == 0, done.stderr
    (obj,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (obj["status"], obj["sha256"]) == ("ok", sha(src))
    assert obj["sent"] == src.stat().st_size - kept, kept  # the rest, and only the rest
    assert sha(home / "intr.bin") == sha(src)


def _unlocked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_json_for_a_host_that_fails(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    done = cp(e2e, lab, "--json", str(tmp_path / "f"), "lab4:")
    assert done.returncode == 255
    (obj,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (obj["host"], obj["status"], obj["path"], obj["error"]["kind"]) == (
        "lab4",
        "failed",
        None,
        "connect",
    )
    assert done.stderr.decode() == f"rexec cp: lab4: {obj['error']['message']}\n"


def test_usage_errors_exit_2(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    both = cp(e2e, lab, "lab1:a", "lab2:b")
    assert both.returncode == 2
    assert both.stderr == (
        b"rexec cp: cannot copy between two remote operands ('lab1:a' and 'lab2:b'): copy "
        b"to a local directory first\n"
    )
    none = cp(e2e, lab, "a", "b")
    assert none.returncode == 2
    assert none.stderr.startswith(b"rexec cp: no remote operand: ")


# ---- host sets ---------------------------------------------------------------------------------


def test_fan_out_upload_to_every_host(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "fan.txt"
    src.write_bytes(b"to every host\n")
    done = cp(e2e, lab, str(src), "lab[1-3]:")
    assert (done.returncode, done.stderr) == (0, b"3 hosts: 3 ok\n")  # as `rexec run`'s
    for host in ("lab1", "lab2", "lab3"):
        assert (lab.homes[host] / "fan.txt").read_bytes() == b"to every host\n"


def test_fan_out_download_into_dst_host(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    for n, host in enumerate(("lab1", "lab2", "lab3")):
        tree = lab.homes[host] / "logs"
        (tree / "d").mkdir(parents=True, exist_ok=True)
        (tree / "d" / "syslog").write_bytes(f"log of {host}\n".encode() * (n + 1))
    out = tmp_path / "out"  # made as needed
    done = cp(e2e, lab, "-r", "@lab:logs", str(out))
    assert (done.returncode, done.stderr) == (0, b"3 hosts: 3 ok\n")
    for n, host in enumerate(("lab1", "lab2", "lab3")):
        got = (out / host / "logs" / "d" / "syslog").read_bytes()
        assert got == f"log of {host}\n".encode() * (n + 1)
    (tmp_path / "plain").write_bytes(b"")
    clash = cp(e2e, lab, "lab[1-2]:logs", str(tmp_path / "plain"))
    assert clash.returncode == 2
    assert (
        clash.stderr
        == (
            f"rexec cp: {tmp_path / 'plain'}: not a directory (a copy from several hosts "
            "writes DST/HOST/...)\n"
        ).encode()
    )


def test_a_failing_host_255_the_others_copied(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "some.txt"
    src.write_bytes(b"some\n")
    for host in ("lab1", "lab2", "lab3"):
        (lab.homes[host] / "some-dir").mkdir()
    done = cp(e2e, lab, str(src), "lab[1-4]:some-dir/")
    assert done.returncode == 255
    line, summary = done.stderr.decode().splitlines()  # one line, for the failed host only
    assert line.startswith(f"rexec cp: lab4: cannot connect to {lab.dead}: "), line
    assert summary == "4 hosts: 3 ok, 1 unreachable (lab4)"
    for host in ("lab1", "lab2", "lab3"):
        assert (lab.homes[host] / "some-dir" / "some.txt").read_bytes() == b"some\n"
    with_json = cp(e2e, lab, "--json", str(src), "lab[1-4]:some-dir/")
    objects = [json.loads(line) for line in with_json.stdout.splitlines()]
    assert sorted((o["host"], o["status"]) for o in objects) == [
        ("lab1", "ok"),
        ("lab2", "ok"),
        ("lab3", "ok"),
        ("lab4", "failed"),
    ]


def test_a_host_set_ends_with_run_s_summary_line(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    """Per host, as `rexec run` counts and words it: ok, failed (some file: its line is
    above), unreachable, auth_failed; --json changes stdout only; one host has no summary."""
    for host in ("lab1", "lab3"):
        (lab.homes[host] / "only-some.txt").write_bytes(f"{host}\n".encode())
    out = tmp_path / "out"
    done = cp(e2e, lab, "lab[1-5]:only-some.txt", str(out))
    assert done.returncode == 255
    *before, summary = done.stderr.decode().splitlines()
    assert summary == "5 hosts: 2 ok, 1 failed (lab2), 1 unreachable (lab4), 1 auth_failed (lab5)"
    assert sorted(before)[0] == "rexec cp: lab2:only-some.txt: No such file or directory"
    assert sorted(before)[1].startswith(f"rexec cp: lab4: cannot connect to {lab.dead}: ")
    assert sorted(before)[2].startswith("rexec cp: lab5: authentication failed")
    assert len(before) == 3, before
    assert (out / "lab3" / "only-some.txt").read_bytes() == b"lab3\n"
    with_json = cp(e2e, lab, "--json", "lab[1-5]:only-some.txt", str(out))
    assert with_json.returncode == 255
    assert with_json.stderr.decode().splitlines()[-1] == summary  # as `rexec run --json`
    objects = [json.loads(line) for line in with_json.stdout.splitlines()]
    assert sorted((o["host"], o["status"]) for o in objects) == [
        ("lab1", "ok"),
        ("lab2", "failed"),
        ("lab3", "ok"),
        ("lab4", "failed"),
        ("lab5", "failed"),
    ]
    # one plain host (lab[1] too) has no summary, as `rexec run`; a set of one with -x does
    for n, (args, stderr) in enumerate(
        (
            (["lab1:only-some.txt"], b""),
            (["lab[1]:only-some.txt"], b""),
            (["-x", "lab2", "lab[1-2]:only-some.txt"], b"1 host: 1 ok\n"),
        )
    ):
        one = cp(e2e, lab, *args, str(tmp_path / f"one{n}"))
        assert (one.returncode, one.stderr) == (0, stderr), args


# ---- progress ----------------------------------------------------------------------------------


def _on_pty(e2e: Any, lab: Lab, *args: str, rows: int = 24) -> tuple[int, str]:
    env = e2e.clean_env(lab.env())
    env["TERM"] = "xterm"
    child = pexpect.spawn(
        e2e.REXEC,
        ["cp", *args],
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
        dimensions=(rows, 100),
    )
    try:
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close()
    return child.exitstatus, output


def pieces(shown: str) -> list[str]:
    """What the terminal showed, cut at every CR and LF, the escape sequences left out."""
    plain = re.sub(r"\x1b\[[0-9]*[A-Za-z]", "", shown)
    return [piece for piece in re.split(r"[\r\n]", plain) if piece]


def test_progress_bar_on_a_terminal_not_in_a_pipe(e2e: Any, lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "bar.bin"
    src.write_bytes(os.urandom(4 * 1024 * 1024))
    code, shown = _on_pty(e2e, lab, str(src), "lab1:bar.bin")
    assert code == 0, shown
    assert "\x1b[K" in shown  # drawn in place
    last = pieces(shown)[-1]
    assert last.startswith("bar.bin"), shown  # the current file names the line
    assert " 100% [" in last and "4.0 MiB" in last and " in 0:" in last, shown
    # many hosts: one line per host
    code, shown = _on_pty(e2e, lab, str(src), "lab[1-3]:bar2.bin")
    assert code == 0, shown
    for host in ("lab1", "lab2", "lab3"):
        assert any(line.startswith(host) and "100% [" in line for line in pieces(shown)), shown
    # more hosts than rows on the screen: one aggregate line
    code, shown = _on_pty(e2e, lab, str(src), "lab[1-3]:bar4.bin", rows=3)
    assert code == 0, shown
    *_, bar, summary = pieces(shown)
    assert bar.startswith("3/3 hosts, 0 failed 100% ["), shown
    assert "12.0 MiB" in bar, shown
    assert summary == "3 hosts: 3 ok", shown  # below the bar, which stays on the screen
    # a host that cannot be reached: its error line, no bar
    code, shown = _on_pty(e2e, lab, str(src), "lab4:x")
    assert code == 255, shown
    (line,) = pieces(shown)
    assert line.startswith(f"rexec cp: lab4: cannot connect to {lab.dead}: "), shown
    # -q: none; a pipe: none (test_upload_and_download_one_file)
    code, shown = _on_pty(e2e, lab, "-q", str(src), "lab1:bar3.bin")
    assert (code, shown) == (0, "")
