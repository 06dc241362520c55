"""Client target and token resolution: every address form, every precedence rule.

Every test passes `env=` explicitly and points HOME into tmp_path, so nothing here depends
on the real environment or home directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rexec.address import DEFAULT_PORT, Endpoint, parse_address
from rexec.client.target import (
    DEFAULT_CONNECT_TIMEOUT,
    load_client_config,
    read_token_file,
    resolve_target,
)
from rexec.errors import ConfigError, TokenError
from rexec.protocol.token import Token, format_token, generate_token

PROJECT = Path(__file__).resolve().parents[2]


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("example.com", "example.com", DEFAULT_PORT, "example.com:8222"),
        ("example.com:22", "example.com", 22, "example.com:22"),
        ("10.0.0.5", "10.0.0.5", DEFAULT_PORT, "10.0.0.5:8222"),
        ("10.0.0.5:9000", "10.0.0.5", 9000, "10.0.0.5:9000"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("[::1]", "::1", DEFAULT_PORT, "[::1]:8222"),
        ("[::1]:8223", "::1", 8223, "[::1]:8223"),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1, "[fe80::1%eth0]:1"),
        ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1", 80, "[::ffff:10.0.0.1]:80"),
        ("my_host-1.lan", "my_host-1.lan", DEFAULT_PORT, "my_host-1.lan:8222"),
    ],
)
def test_parse_tcp_addresses(text: str, host: str, port: int, shown: str) -> None:
    ep = parse_address(text)
    assert (ep.host, ep.port, ep.path) == (host, port, None)
    assert not ep.is_unix
    assert str(ep) == shown
    assert parse_address(str(ep)) == ep  # str() round-trips


def test_parse_unix_address() -> None:
    ep = parse_address("unix:/run/rexec.sock")
    assert (ep.host, ep.port, ep.path) == (None, None, "/run/rexec.sock")
    assert ep.is_unix
    assert str(ep) == "unix:/run/rexec.sock"


def test_default_port_argument() -> None:
    assert parse_address("h", default_port=1234).port == 1234
    assert parse_address("[::1]", default_port=1234).port == 1234


def test_port_zero_only_when_allowed() -> None:
    with pytest.raises(ConfigError, match=r"port must be 1\.\.65535, got 0"):
        parse_address("127.0.0.1:0")
    assert parse_address("127.0.0.1:0", allow_zero_port=True).port == 0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected host"),
        ("host:", "port '' is not a number"),
        ("host:http", "port 'http' is not a number"),
        ("host:65536", "port must be 1..65535, got 65536"),
        ("host:-1", "is not a number"),
        ("host:²", "is not a number"),
        ("::1", "brackets"),
        ("::1:8222", "brackets"),
        ("[::1", "missing ']'"),
        ("[]:80", "is not an IPv6 address"),
        ("[host]:80", "is not an IPv6 address"),
        ("[::1]80", "expected ':port'"),
        ("unix:", "unix socket path is empty"),
        ("-oProxyCommand=x", "expected host"),
        ("user@host", "expected host"),
        ("a b", "expected host"),
        ("http://host", "port '//host' is not a number"),
    ],
)
def test_parse_address_errors(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert why in str(info.value)
    assert f"invalid address {text!r}" in str(info.value)


def test_endpoint_needs_exactly_one_kind() -> None:
    with pytest.raises(ValueError):
        Endpoint()
    with pytest.raises(ValueError):
        Endpoint(host="h", port=1, path="/x")
    with pytest.raises(ValueError):
        Endpoint(host="h")
    with pytest.raises(ValueError):
        Endpoint(path="/x", port=1)


# --- token files -------------------------------------------------------------------------


def write_token(path: Path, token: Token | None = None, mode: int = 0o600) -> Token:
    token = token or generate_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_token(token) + "\n")
    path.chmod(mode)
    return token


def test_read_token_file_0600(tmp_path: Path) -> None:
    token = write_token(tmp_path / "t", mode=0o600)
    assert read_token_file(tmp_path / "t") == token
    write_token(tmp_path / "r", token, mode=0o400)
    assert read_token_file(str(tmp_path / "r")) == token


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666])
def test_read_token_file_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    token = write_token(tmp_path / "t", mode=mode)
    with pytest.raises(ConfigError) as info:
        read_token_file(tmp_path / "t")
    msg = str(info.value)
    assert f"mode {mode:04o}" in msg
    assert f"chmod 600 {tmp_path / 't'}" in msg
    assert format_token(token).split(":")[2] not in msg


def test_read_token_file_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"token file not found: {tmp_path / 'nope'}")):
        read_token_file(tmp_path / "nope")


def test_read_token_file_malformed(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("rexec1:zz:nope\n")
    p.chmod(0o600)
    with pytest.raises(TokenError, match=re.escape(f"token file {p}: malformed token")):
        read_token_file(p)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not ASCII"):
        read_token_file(p)


def test_read_token_file_not_regular(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(d)


def test_token_never_in_repr_or_resolved_repr(tmp_path: Path) -> None:
    token = write_token(tmp_path / "t")
    secret = format_token(token).split(":")[2]
    resolved = resolve_target("h", token_file=str(tmp_path / "t"), env={"HOME": str(tmp_path)})
    assert secret not in repr(resolved)
    assert secret not in str(resolved)


# --- client config -----------------------------------------------------------------------


def home_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), **extra}


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_default_config_is_fine(tmp_path: Path) -> None:
    cfg = load_client_config(env=home_env(tmp_path))
    assert cfg.path is None
    assert cfg.hosts == {}
    assert cfg.connect_timeout == DEFAULT_CONNECT_TIMEOUT


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"{tmp_path / 'c.toml'}: client config file not found")
    ):
        load_client_config(tmp_path / "c.toml", env=home_env(tmp_path))
    env = home_env(tmp_path, REXEC_CONFIG=str(tmp_path / "e.toml"))
    with pytest.raises(
        ConfigError, match=re.escape(f"{tmp_path / 'e.toml'}: client config file not found")
    ):
        load_client_config(env=env)


def test_config_locations(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    write_config(Path(env["HOME"]) / ".config/rexec/client.toml", '[hosts.a]\naddress = "h1"\n')
    assert load_client_config(env=env).hosts["a"].address == parse_address("h1")
    xdg = tmp_path / "xdg"
    write_config(xdg / "rexec/client.toml", '[hosts.a]\naddress = "h2"\n')
    env["XDG_CONFIG_HOME"] = str(xdg)
    assert load_client_config(env=env).hosts["a"].address == parse_address("h2")
    write_config(tmp_path / "other.toml", '[hosts.a]\naddress = "h3"\n')
    env["REXEC_CONFIG"] = str(tmp_path / "other.toml")
    assert load_client_config(env=env).hosts["a"].address == parse_address("h3")
    write_config(tmp_path / "arg.toml", '[hosts.a]\naddress = "h4"\n')
    cfg = load_client_config(tmp_path / "arg.toml", env=env)
    assert cfg.hosts["a"].address == parse_address("h4")
    assert cfg.path == tmp_path / "arg.toml"


def test_relative_xdg_config_home_is_ignored(tmp_path: Path) -> None:
    env = home_env(tmp_path, XDG_CONFIG_HOME="relative/dir")
    write_config(Path(env["HOME"]) / ".config/rexec/client.toml", '[hosts.a]\naddress = "h1"\n')
    assert "a" in load_client_config(env=env).hosts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults]\ntoken_fil = 'x'\n", "unknown key 'defaults.token_fil'"),
        ("[hosts.a]\naddress = 'h'\nport = 1\n", "unknown key 'hosts.a.port'"),
        ("[other]\n", "unknown key 'other'"),
        ("[hosts.a]\ntoken_file = 'x'\n", "hosts.a.address: missing key"),
        ("[hosts.a]\naddress = 5\n", "hosts.a.address: must be a string"),
        ("[hosts.a]\naddress = 'h:99999'\n", "hosts.a.address: invalid address 'h:99999'"),
        ("[hosts.a]\naddress = 'h'\ntoken_file = 3\n", "hosts.a.token_file: must be a non-empty"),
        ("[defaults]\nconnect_timeout = 0\n", "defaults.connect_timeout: must be a positive"),
        ("[defaults]\nconnect_timeout = true\n", "defaults.connect_timeout: must be a positive"),
        ("[defaults]\nconnect_timeout = '5'\n", "defaults.connect_timeout: must be a positive"),
        (
            "[hosts.a]\naddress = 'h'\nconnect_timeout = -1\n",
            "hosts.a.connect_timeout: must be a positive",
        ),
        ("defaults = 3\n", "defaults: must be a table"),
        ("hosts = 3\n", "hosts: must be a table"),
        ("[hosts]\na = 3\n", "hosts.a: must be a table"),
        ('[hosts."a b"]\naddress = "h"\n', "hosts.a b: alias names may use only"),
        ("[hosts.a\n", "invalid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_client_config(path, env=home_env(tmp_path))
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", "[defaults]\n\nconnect_timeout = = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML: .*line 3"):
        load_client_config(path, env=home_env(tmp_path))


def test_example_client_config_validates(tmp_path: Path) -> None:
    cfg = load_client_config(PROJECT / "configs/client.example.toml", env=home_env(tmp_path))
    kinds = {name: host.address.is_unix for name, host in cfg.hosts.items()}
    assert len(kinds) >= 2
    assert set(kinds.values()) == {True, False}  # one TCP alias and one unix alias


# --- resolve_target ----------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A config with one alias, and a distinct token at every precedence level."""
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    paths = {
        "explicit": tmp_path / "explicit.token",
        "env_file": tmp_path / "envfile.token",
        "alias": tmp_path / "alias.token",
        "defaults": tmp_path / "defaults.token",
        "xdg": xdg / "rexec/token",
        "config": xdg / "rexec/client.toml",
        "home": home,
        "xdg_dir": xdg,
    }
    home.mkdir()
    write_config(
        paths["config"],
        f"""
[defaults]
token_file = "{paths["defaults"]}"
connect_timeout = 3.5

[hosts.lab1]
address = "10.0.0.5:9000"
token_file = "../../alias.token"   # relative to the config file's directory
connect_timeout = 1.25

[hosts.sock]
address = "unix:/run/rexec.sock"

[hosts.rel]
address = "unix:~/rexec.sock"
""",
    )
    return paths


def tokens_at(setup: dict[str, Path], *levels: str) -> dict[str, Token]:
    return {level: write_token(setup[level]) for level in levels}


def env_for(setup: dict[str, Path], **extra: str) -> dict[str, str]:
    return {"HOME": str(setup["home"]), "XDG_CONFIG_HOME": str(setup["xdg_dir"]), **extra}


ALL_LEVELS = ("explicit", "env_file", "alias", "defaults", "xdg")


def test_precedence_explicit_argument_wins(setup: dict[str, Path]) -> None:
    toks = tokens_at(setup, *ALL_LEVELS)
    other = generate_token()
    env = env_for(setup, REXEC_TOKEN=format_token(other), REXEC_TOKEN_FILE=str(setup["env_file"]))
    r = resolve_target("lab1", token_file=str(setup["explicit"]), env=env)
    assert r.token == toks["explicit"]
    assert r.token_source == str(setup["explicit"])


def test_precedence_rexec_token_env(setup: dict[str, Path]) -> None:
    tokens_at(setup, *ALL_LEVELS)
    other = generate_token()
    env = env_for(setup, REXEC_TOKEN=format_token(other), REXEC_TOKEN_FILE=str(setup["env_file"]))
    r = resolve_target("lab1", env=env)
    assert r.token == other
    assert r.token_source == "$REXEC_TOKEN"


def test_precedence_rexec_token_file_env(setup: dict[str, Path]) -> None:
    toks = tokens_at(setup, *ALL_LEVELS)
    env = env_for(setup, REXEC_TOKEN="", REXEC_TOKEN_FILE=str(setup["env_file"]))
    assert resolve_target("lab1", env=env).token == toks["env_file"]


def test_precedence_alias_token_file(setup: dict[str, Path]) -> None:
    toks = tokens_at(setup, "alias", "defaults", "xdg")
    r = resolve_target("lab1", env=env_for(setup))
    assert r.token == toks["alias"]
    assert Path(r.token_source).resolve() == setup["alias"].resolve()


def test_precedence_defaults_token_file(setup: dict[str, Path]) -> None:
    toks = tokens_at(setup, "alias", "defaults", "xdg")
    assert resolve_target("sock", env=env_for(setup)).token == toks["defaults"]
    assert resolve_target("10.1.1.1", env=env_for(setup)).token == toks["defaults"]


def test_precedence_xdg_default_token(setup: dict[str, Path]) -> None:
    toks = tokens_at(setup, "xdg")
    setup["config"].unlink()  # no config: only the default token file is left
    r = resolve_target("h", env=env_for(setup))
    assert r.token == toks["xdg"]
    assert r.token_source == str(setup["xdg"])


def test_home_config_default_token_without_xdg(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    tok = write_token(Path(env["HOME"]) / ".config/rexec/token")
    assert resolve_target("h", env=env).token == tok


def test_no_token_anywhere_says_how_to_provide_one(setup: dict[str, Path]) -> None:
    setup["config"].unlink()
    with pytest.raises(ConfigError) as info:
        resolve_target("h", env=env_for(setup))
    msg = str(info.value)
    for hint in ("--token-file", "$REXEC_TOKEN", "$REXEC_TOKEN_FILE", str(setup["xdg"])):
        assert hint in msg


def test_configured_token_file_missing_is_an_error(setup: dict[str, Path]) -> None:
    write_token(setup["xdg"])  # a fallback exists, but the alias names a file that does not
    with pytest.raises(ConfigError, match=r"token file not found: .*alias\.token"):
        resolve_target("lab1", env=env_for(setup))


def test_bad_rexec_token_env_names_the_variable(setup: dict[str, Path]) -> None:
    with pytest.raises(TokenError, match=r"^\$REXEC_TOKEN: malformed token"):
        resolve_target("lab1", env=env_for(setup, REXEC_TOKEN="rexec1:nope"))


def test_resolve_alias_endpoint_and_timeout(setup: dict[str, Path]) -> None:
    tokens_at(setup, "alias", "defaults")
    env = env_for(setup)
    r = resolve_target("lab1", env=env)
    assert (r.name, str(r.endpoint), r.connect_timeout) == ("lab1", "10.0.0.5:9000", 1.25)
    r = resolve_target("sock", env=env)
    assert (str(r.endpoint), r.connect_timeout) == ("unix:/run/rexec.sock", 3.5)
    r = resolve_target("rel", env=env)
    assert r.endpoint.path == str(setup["home"] / "rexec.sock")
    r = resolve_target("[::1]:1", env=env)
    assert (r.name, r.endpoint.host, r.endpoint.port) == ("[::1]:1", "::1", 1)


def test_default_connect_timeout_without_config(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    tok = write_token(tmp_path / "t")
    r = resolve_target("h:1", token_file=str(tmp_path / "t"), env=env)
    assert (r.token, r.connect_timeout) == (tok, DEFAULT_CONNECT_TIMEOUT)


def test_unknown_alias_and_bad_address(setup: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"no host alias 'lab 2' in .*client\.toml"):
        resolve_target("lab 2", env=env_for(setup))


def test_explicit_token_file_expands_home(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    tok = write_token(Path(env["HOME"]) / "my.token")
    assert resolve_target("h", token_file="~/my.token", env=env).token == tok


def test_import_stays_lean() -> None:
    code = (
        "import sys, rexec.client.target; "
        "bad = [m for m in ('pydantic', 'asyncio', 'structlog', 'tomllib', 'cryptography') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == ""
