"""Server config: defaults, derived paths, and errors that name the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rexec.address import Endpoint
from rexec.errors import ConfigError
from rexec.server.config import (
    ServerConfig,
    env_allowed,
    load_server_config,
    parse_server_config,
)

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`~` must never reach the real home directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path / "x.toml", text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg.removeprefix(f"{path}: ")


def test_defaults(fake_home: Path) -> None:
    cfg = load_server_config(None)
    assert cfg == ServerConfig.default()
    state = fake_home / ".local/state/rexec-server"
    assert cfg.server.state_dir == state
    assert cfg.server.tokens == state / "tokens.json"
    assert cfg.server.audit_log == state / "audit.jsonl"
    assert cfg.server.listen == ("127.0.0.1:8222",)
    assert cfg.server.endpoints == (Endpoint("127.0.0.1", 8222),)
    assert cfg.server.suites == ("AESGCM", "ChaChaPoly")
    assert cfg.limits.max_connections == 256
    assert cfg.limits.default_timeout == 0
    assert cfg.exec.shell == "/bin/sh"
    assert cfg.exec.keep_orphans is False


def test_example_server_config_is_the_defaults() -> None:
    """The example documents every key with its default value."""
    cfg = load_server_config(PROJECT / "configs/server.example.toml")
    assert cfg == ServerConfig.default()


def test_example_server_config_names_every_key() -> None:
    text = (PROJECT / "configs/server.example.toml").read_text()
    cfg = ServerConfig.default()
    for section in ("server", "limits", "exec"):
        for key in type(getattr(cfg, section)).model_fields:
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{section}.{key} not in example"


def test_default_with_state_dir(tmp_path: Path) -> None:
    cfg = ServerConfig.default(state_dir=tmp_path / "st")
    assert cfg.server.tokens == tmp_path / "st/tokens.json"
    assert cfg.server.audit_log == tmp_path / "st/audit.jsonl"


def test_paths_expand_home_and_anchor_at_config_dir(tmp_path: Path, fake_home: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(
        tmp_path / "etc/server.toml",
        '[server]\nstate_dir = "state"\naudit_log = "~/audit.jsonl"\nunix = ["r.sock"]\n',
    )
    cfg = load_server_config(path)
    assert cfg.server.state_dir == tmp_path / "etc/state"
    assert cfg.server.tokens == tmp_path / "etc/state/tokens.json"
    assert cfg.server.audit_log == fake_home / "audit.jsonl"
    assert cfg.server.unix == (tmp_path / "etc/r.sock",)
    assert cfg.server.endpoints[-1] == Endpoint(path=str(tmp_path / "etc/r.sock"))


def test_full_config(tmp_path: Path) -> None:
    path = write(
        tmp_path / "s.toml",
        """
[server]
listen = ["0.0.0.0:0", "[::1]:9000", "localhost"]
unix = ["/run/rexec.sock"]
suites = ["ChaChaPoly"]
log_level = "DEBUG"
log_format = "json"
[limits]
max_connections = 10
max_unauthenticated = 10
default_timeout = 30
max_timeout = 60.5
idle_timeout = 0
[exec]
env_allowlist = []
base_env = {}
keep_orphans = true
""",
    )
    cfg = load_server_config(path)
    assert cfg.server.listen == ("0.0.0.0:0", "[::1]:9000", "localhost:8222")
    assert [str(e) for e in cfg.server.endpoints] == [
        "0.0.0.0:0",
        "[::1]:9000",
        "localhost:8222",
        "unix:/run/rexec.sock",
    ]
    assert cfg.server.log_level == "debug"
    assert cfg.limits.max_timeout == 60.5
    assert isinstance(cfg.limits.default_timeout, float)
    assert cfg.exec.base_env == {}
    assert [s.label for s in cfg.server.allowed_suites()] == ["ChaChaPoly"]


def test_models_are_frozen() -> None:
    cfg = ServerConfig.default()
    with pytest.raises(ValueError, match="frozen"):
        cfg.limits.max_connections = 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_conections = 3\n", "unknown key 'limits.max_conections'"),
        ("[limit]\n", "unknown key 'limit'"),
        ("[server]\nport = 1\n", "unknown key 'server.port'"),
        (
            "[limits]\nmax_connections = 'lots'\n",
            "limits.max_connections: expected an integer, got the string 'lots'",
        ),
        (
            "[limits]\nmax_connections = true\n",
            "max_connections: expected an integer, got the boolean",
        ),
        (
            "[limits]\nmax_connections = 1.5\n",
            "max_connections: expected an integer, got the number",
        ),
        ("[limits]\nmax_channels = 0\n", "limits.max_channels: must be greater than 0, got 0"),
        ("[limits]\nhandshake_timeout = 0\n", "limits.handshake_timeout: must be greater than 0"),
        ("[limits]\nidle_timeout = -1\n", "limits.idle_timeout: must be at least 0.0, got -1"),
        (
            "[limits]\nkill_grace = '2'\n",
            "limits.kill_grace: expected a number, got the string '2'",
        ),
        (
            "[limits]\ndefault_timeout = 120\nmax_timeout = 60\n",
            "limits: default_timeout (120) must not exceed max_timeout (60)",
        ),
        (
            "[limits]\nmax_unauthenticated = 500\n",
            "limits: max_unauthenticated (500) must not exceed max_connections (256)",
        ),
        (
            "[server]\nsuites = ['AES']\n",
            "server.suites[0]: expected one of 'AESGCM' or 'ChaChaPoly', got the string 'AES'",
        ),
        ("[server]\nsuites = []\n", "server.suites: must list at least 1 item"),
        ("[server]\nsuites = ['AESGCM', 'AESGCM']\n", "server.suites: a suite is listed twice"),
        ("[server]\nlisten = ['h:99999']\n", "server.listen[0]: invalid address 'h:99999'"),
        ("[server]\nlisten = ['a:1', '::1']\n", "server.listen[1]: invalid address '::1'"),
        ("[server]\nlisten = ['unix:/x']\n", "server.listen[0]: 'unix:/x': put unix sockets"),
        ("[server]\nlisten = ['a:1', 'a:1']\n", "server.listen[1]: 'a:1' is listed twice"),
        ("[server]\nlisten = 'a:1'\n", "server.listen: expected a list, got the string 'a:1'"),
        ("[server]\nlisten = []\n", "server: no listener: set server.listen or server.unix"),
        ("[server]\nunix = ['/' , '/']\n", "server: unix: a socket path is listed twice"),
        ("[server]\nunix = ['/" + "x" * 120 + "']\n", "is longer than 107 bytes"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level: expected one of 'debug', 'info'"),
        ("[server]\nlog_format = 'xml'\n", "server.log_format: expected one of 'auto', 'console'"),
        ("[server]\ntokens = 5\n", "server.tokens: expected a path (a string), got the integer 5"),
        ("[exec]\nshell = 'sh'\n", "exec.shell: must be an absolute path, got 'sh'"),
        (
            "[exec]\nkeep_orphans = 1\n",
            "exec.keep_orphans: expected true or false, got the integer 1",
        ),
        ("[exec]\nbase_env = { 'A B' = 'x' }\n", "exec.base_env: 'A B' is not a valid environment"),
        ("[exec]\nbase_env = { A = 1 }\n", "exec.base_env.A: expected a string, got the integer 1"),
        (
            "[server]\nunix_mode = 660\n",
            "server.unix_mode: expected permission bits in octal such as 0o660, got 660 (octal",
        ),
        (
            "[server]\nunix_group = 'no-such-group-x'\n",
            "server.unix_group: unknown group 'no-such-group-x'",
        ),
        (
            "[server]\naudit_failure = 'ignore'\n",
            "server.audit_failure: expected one of 'log' or 'refuse', got the string 'ignore'",
        ),
        (
            "[exec]\ncgroup = true\n",
            "exec.cgroup: expected one of 'auto', 'off' or 'require', got the boolean true",
        ),
        ("limits = 3\n", "limits: expected a table, got the integer 3"),
        ("[exec]\nenv_allowlist = ['A=*']\n", "exec.env_allowlist[0]: 'A=*' is not an environment"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert message in error
    for pydantic_words in ("Input should", "valid tuple", "Tuple should", "after validation"):
        assert pydantic_words not in error


def test_several_errors_on_one_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[limits]\nmax_channels = 0\nmax_conections = 1\n")
    assert "\n" not in msg
    assert "limits.max_channels" in msg
    assert "unknown key 'limits.max_conections'" in msg


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[server]\nlisten = [\n\n[limits]\nx = = 1\n")
    assert msg.startswith("invalid TOML: ")
    assert re.search(r"line \d+", msg)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: server config file not found"):
        load_server_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read server config"):
        load_server_config(tmp_path)  # a directory
    write(tmp_path / "bin.toml", "")
    (tmp_path / "bin.toml").write_bytes(b"\xff = 1")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_server_config(tmp_path / "bin.toml")


def test_parse_server_config_without_file() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: unknown key 'x'$"):
        parse_server_config({"x": 1})


@pytest.mark.parametrize(
    ("default", "cap", "requested", "expected"),
    [
        (0, 0, None, None),
        (0, 0, 5, 5),
        (30, 0, None, 30),
        (30, 0, 0, 30),
        (30, 0, 100, 100),
        (0, 60, None, 60),  # a command asking no deadline still meets the cap
        (0, 60, 100, 60),
        (30, 60, None, 30),
        (30, 60, 45, 45),
    ],
)
def test_effective_timeout(
    default: float, cap: float, requested: float | None, expected: float | None
) -> None:
    doc = {"limits": {"default_timeout": float(default), "max_timeout": float(cap)}}
    assert parse_server_config(doc).limits.effective_timeout(requested) == expected


def test_env_allowed() -> None:
    allow = ServerConfig.default().exec.env_allowlist
    for name in ("LANG", "LC_ALL", "LC_", "TZ", "TERM", "REXEC_X"):
        assert env_allowed(name, allow), name
    for name in ("PATH", "LD_PRELOAD", "lang", "LANGUAGE", "XLANG", "TERMCAP", "HOME"):
        assert not env_allowed(name, allow), name
    assert not env_allowed("LANG", [])


def test_systemd_directories_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """StateDirectory=/RuntimeDirectory= reach us as $STATE_DIRECTORY/$RUNTIME_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/rexec:/var/lib/other")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/rexec")
    cfg = parse_server_config({})
    assert cfg.server.state_dir == Path("/var/lib/rexec")
    assert cfg.server.tokens == Path("/var/lib/rexec/tokens.json")
    assert cfg.server.audit_log == Path("/var/lib/rexec/audit.jsonl")
    assert cfg.server.unix == (Path("/run/rexec/rexec.sock"),)
    explicit = parse_server_config({"server": {"state_dir": "/srv/st", "unix": []}})
    assert (explicit.server.state_dir, explicit.server.unix) == (Path("/srv/st"), ())
    monkeypatch.setenv("STATE_DIRECTORY", "relative/ignored")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    cfg = parse_server_config({})
    assert cfg.server.state_dir == Path("~/.local/state/rexec-server").expanduser()
    assert cfg.server.unix == ()


def test_last_path_component_is_not_resolved(tmp_path: Path) -> None:
    """A symlinked audit log must reach the StrictModes check as the link, not its target."""
    (tmp_path / "target").write_text("")
    (tmp_path / "audit.jsonl").symlink_to(tmp_path / "target")
    cfg = parse_server_config({"server": {"audit_log": str(tmp_path / "audit.jsonl")}})
    assert cfg.server.audit_log == tmp_path / "audit.jsonl"
