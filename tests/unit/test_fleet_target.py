"""Fleet tokens on the client: which server name each target derives its key from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rexec.client.target import read_token_file, resolve_target
from rexec.errors import ConfigError, TokenError
from rexec.protocol.fleetkey import FleetToken, derive_server_token

MASTER = bytes(range(32))
FLEET = FleetToken("lab", MASTER)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        """
[hosts.lab01]
address = "127.0.0.1:9000"

[hosts.front]
address = "127.0.0.1:9001"
server_id = "LAB07.example.org."

[hosts.sock]
address = "unix:/run/rexec.sock"
"""
    )
    token = tmp_path / "fleet.token"
    token.write_text(FLEET.format() + "\n")
    token.chmod(0o600)
    return {
        "HOME": str(tmp_path),
        "REXEC_CONFIG": str(cfg),
        "REXEC_TOKEN_FILE": str(token),
    }


@pytest.mark.parametrize(
    ("target", "server"),
    [
        ("lab01", "lab01"),  # an alias: its name
        ("front", "lab07.example.org"),  # an alias with server_id
        ("LAB02:8222", "lab02"),  # an address: its host part
        ("[::1]:9", "::1"),
    ],
)
def test_the_key_is_derived_for_the_name_connected_to(
    env: dict[str, str], target: str, server: str
) -> None:
    resolved = resolve_target(target, env=env)
    assert resolved.token == derive_server_token(MASTER, server)
    assert f"(fleet lab, server {server})" in resolved.token_source
    assert "AAEC" not in resolved.token_source


def test_fleet_token_text_in_the_environment(env: dict[str, str]) -> None:
    env = {**env, "REXEC_TOKEN": FLEET.format()}
    assert resolve_target("lab01", env=env).token == derive_server_token(MASTER, "lab01")


def test_a_unix_socket_needs_an_alias(env: dict[str, str]) -> None:
    assert resolve_target("sock", env=env).token == derive_server_token(MASTER, "sock")
    with pytest.raises(ConfigError, match="a unix socket has none: use an alias"):
        resolve_target("unix:/run/other.sock", env=env)


def test_server_id_must_be_a_non_empty_string(env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[hosts.a]\naddress = "h"\nserver_id = 5\n')
    with pytest.raises(ConfigError, match=r"hosts\.a\.server_id: must be a non-empty string"):
        resolve_target("a", env={**env, "REXEC_CONFIG": str(cfg)})


def test_read_token_file_wants_a_server_token(env: dict[str, str]) -> None:
    with pytest.raises(TokenError, match="a fleet token, not a server's token"):
        read_token_file(env["REXEC_TOKEN_FILE"])


def test_a_malformed_fleet_token_is_named(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("rexec1fleet:lab:short\n")
    bad.chmod(0o600)
    with pytest.raises(TokenError, match=r"token file .*bad.token: malformed token: secret"):
        resolve_target("lab01", env={**env, "REXEC_TOKEN_FILE": str(bad)})


def test_deriving_stays_off_the_heavy_imports(env: dict[str, str]) -> None:
    """`rexec run` with a fleet token pays only for HKDF (DESIGN.md 2a; test_cold_start)."""
    probe = (
        "import sys\n"
        "from rexec.client.target import resolve_target\n"
        "import rexec.client.blocking\n"
        "resolve_target('lab01')\n"
        "bad = ('asyncio', 'pydantic', 'hashlib', 'hmac', 'threading', 'random', 'pathlib',\n"
        "       'cryptography.hazmat.backends', 'dataclasses', 'argparse')\n"
        "print(sorted(m for m in bad if m in sys.modules))\n"
    )
    env = {**env, "REXEC_CONFIG": ""}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr
