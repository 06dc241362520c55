"""Transfers under a token's policy (docs/PROTOCOL.md 3.3): confined to a directory (no `..`,
no symlink out of it), read-only, transfers only; and the audit record of each transfer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import rexec
from rexec import AuthError, FileStatus, PolicyError


def token_with(e2e: Any, server: Any, name: str, *flags: str) -> str:
    proc = e2e.run_cli(["token", "new", "--id", name, "--store", str(server.store), *flags])
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout.decode().strip())


def client(e2e: Any, server: Any, token: str) -> rexec.Client:
    """Connect once the server has reloaded its store (it polls it every ~0.5 s)."""

    def attempt() -> rexec.Client | None:
        try:
            return rexec.Client(server.address, token=token, connect_timeout=5)
        except AuthError:
            return None

    c = e2e.wait_until(attempt, 10.0, 0.2)
    assert c is not None, "the server never took the new token"
    return c  # type: ignore[no-any-return]


def test_a_confined_token_cannot_leave_its_directory(
    e2e: Any, server_factory: Any, tmp_path: Path
) -> None:
    srv = server_factory()
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside, root / "out")  # a symlink inside the root, pointing out of it
    (root / "sub" / "mine").write_bytes(b"mine")
    local = tmp_path / "local"
    local.mkdir()
    (local / "f").write_bytes(b"data")
    token = token_with(e2e, srv, "boxed", "--transfer-under", str(root))
    with client(e2e, srv, token) as c:
        ok = c.put(local / "f", "sub/")  # relative to the root, not the home
        assert ok.ok and (root / "sub" / "f").read_bytes() == b"data"
        for bad in ("../f", "sub/../../f", str(outside / "f")):
            with pytest.raises(PolicyError, match="transfer-under"):
                c.put(local / "f", bad)
        with pytest.raises(PolicyError, match="transfer-under"):
            c.get("/etc/hostname", local)
        through = c.put(local / "f", "out/f", check=False)
        assert [(f.status, f.error) for f in through.files] == [
            (FileStatus.FAILED, "refusing to follow a symlink")
        ]
        assert not (outside / "f").exists()
        secret = c.get("out/secret", local, check=False)
        assert secret.files[0].status is FileStatus.FAILED
        assert not (local / "secret").exists()
        link = c.get("out", local)  # the link itself comes back, as a link
        assert link.files[0].kind == "symlink" and os.readlink(local / "out") == str(outside)
        got = c.get(str(root / "sub" / "mine"), local)  # absolute, but inside: fine
        assert got.ok and (local / "mine").read_bytes() == b"mine"
    records = [r for r in srv.wait_audit(8) if r.get("command", "").startswith("rexec-transfer")]
    refused = [r for r in records if r["exit_code"] == 255]
    assert len(refused) == 4 and all(r["policy"]["decision"] == "refused" for r in refused)
    done = records[0]
    assert done["command"] == "rexec-transfer put sub/"
    assert done["transfer"]["root"] == str(root) and done["transfer"]["files"] == 1
    assert done["transfer"]["bytes"] == 4 and done["transfer"]["result"] == "ok"


def test_read_only_and_transfer_only_tokens(e2e: Any, server: Any, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    reader = token_with(e2e, server, "reader", "--read-only", "--transfer-only")
    with client(e2e, server, reader) as c:
        with pytest.raises(PolicyError, match="read-only"):
            c.put(tmp_path / "f", str(tmp_path / "g"))
        assert c.get(str(tmp_path / "f"), tmp_path / "g").ok
        with pytest.raises(PolicyError, match="transfer-only"):
            c.run("true")
    assert (tmp_path / "g").read_bytes() == b"x"
