"""The StrictModes rule (rexec.statefile) on real files and directories, and the notify
datagram (rexec.server.sdnotify) on a real socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from rexec.errors import ConfigError
from rexec.server.sdnotify import notify
from rexec.statefile import check_parents, check_state_dir, open_trusted, write_secret

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to nobody")


def test_clean_tree_passes_and_paths_come_back_canonical(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_parents(tmp_path / "link" / "f", "x") == tmp_path / "real" / "f"
    assert check_state_dir(tmp_path / "link") == tmp_path / "real"


def test_missing_directories_are_fine(tmp_path: Path) -> None:
    assert check_parents(tmp_path / "a/b/c/f", "x") == tmp_path / "a/b/c/f"


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_group_or_other_writable_parent_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError) as info:
        check_parents(d / "state" / "tokens.json", "token store")
    assert str(info.value) == (
        f"directory {d} above token store {d / 'state' / 'tokens.json'} is writable by group "
        f"or others (mode {mode:04o}): fix it with: chmod go-w {d}"
    )


def test_sticky_parent_is_accepted(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o1777)
    check_parents(d / "f", "x")


@root_only
def test_sticky_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o1777)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=r"is owned by nobody \(uid 65534\), who could replace"):
        check_parents(d / "f", "x")


def test_state_dir_itself_must_not_be_group_writable(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(0o770)
    with pytest.raises(ConfigError, match=r"^state directory .* \(mode 0770\): fix it with"):
        check_state_dir(d)


def test_open_trusted_refuses_symlink_mode_and_non_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="is a symbolic link: refusing to follow it"):
        open_trusted(link, os.O_RDONLY, "audit log")
    target.chmod(0o640)
    with pytest.raises(ConfigError, match=r"has mode 0640: .* fix it with: chmod 600"):
        open_trusted(target, os.O_RDONLY, "audit log")
    with pytest.raises(ConfigError, match="is not a regular file"):
        open_trusted(tmp_path, os.O_RDONLY, "audit log")
    with pytest.raises(FileNotFoundError):
        open_trusted(tmp_path / "none", os.O_RDONLY, "audit log")


@root_only
def test_open_trusted_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o600)
    os.chown(f, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=r"owned by nobody \(uid 65534\), not by root"):
        open_trusted(f, os.O_RDONLY, "token store")


def test_write_secret_replaces_rather_than_writes_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = tmp_path / "secret"
    path.symlink_to(victim)
    assert write_secret(path, b"s3cret\n", "client token file") == path
    assert victim.read_text() == "keep"
    assert not path.is_symlink()
    assert (path.stat().st_mode & 0o777, path.read_bytes()) == (0o600, b"s3cret\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ---- sd_notify ---------------------------------------------------------------------------


def test_notify_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(100) == b"READY=1\nSTATUS=x"


def test_notify_to_an_abstract_socket() -> None:
    name = f"rexec-unit-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(100) == b"STOPPING=1"


def test_notify_without_systemd_or_with_a_strange_address() -> None:
    assert notify("READY=1", {}) is False
    with pytest.raises(OSError, match="unsupported NOTIFY_SOCKET"):
        notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    with pytest.raises(OSError):  # nobody listens there
        notify("READY=1", {"NOTIFY_SOCKET": "@rexec-unit-notify-nobody-listens"})
