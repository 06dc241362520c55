"""Client side: turn what the user typed (alias or address) into an endpoint and a token.

This module sits on the `rexec run` start-up path, where every import is latency (DESIGN.md
2a), so it uses the standard library only (no pydantic: the client config is small and
validated by hand), no dataclasses, no regular expressions (str checks) and no pathlib (paths
are str inside; os.path does the work), and imports `tomllib` and `pathlib` only when a
config file actually exists. Every error is a `ConfigError` whose message names the file and
the key; no message ever holds a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from rexec._record import FrozenRecord, setfield
from rexec.address import Endpoint, is_alias, parse_address
from rexec.errors import ConfigError, TokenError
from rexec.protocol.token import Token, parse_token
from rexec.secretfile import read_secret_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from rexec.protocol.fleetkey import FleetToken

DEFAULT_CONNECT_TIMEOUT = 10.0
CONFIG_ENV = "REXEC_CONFIG"
TOKEN_ENV = "REXEC_TOKEN"  # noqa: S105 - a variable name, not a secret
TOKEN_FILE_ENV = "REXEC_TOKEN_FILE"  # noqa: S105
_MAX_TOKEN_FILE = 4096  # a token line is ~75 bytes; anything huge is not a token file


class HostEntry(FrozenRecord):
    """One `[hosts.NAME]` table of the client config."""

    __match_args__ = ("address", "token_file", "connect_timeout", "server_id")
    __slots__ = __match_args__
    address: Endpoint
    token_file: Path | None
    connect_timeout: float | None
    server_id: str | None  # the server's name for fleet-token key derivation

    def __init__(
        self,
        address: Endpoint,
        token_file: Path | None = None,
        connect_timeout: float | None = None,
        server_id: str | None = None,
    ) -> None:
        setfield(self, "address", address)
        setfield(self, "token_file", token_file)
        setfield(self, "connect_timeout", connect_timeout)
        setfield(self, "server_id", server_id)


_NO_HOSTS: Mapping[str, HostEntry] = MappingProxyType({})


class GroupEntry(FrozenRecord):
    """One `[groups]` entry: `lab = ["lab[01-40]", "gpu1"]`, or a `[groups.NAME]` table with
    `hosts` and a `token_file` for every host of the group (a host's own alias comes first)."""

    __match_args__ = ("hosts", "token_file")
    __slots__ = __match_args__
    hosts: tuple[str, ...]  # host-set strings, expanded by rexec.client.hosts when used
    token_file: Path | None

    def __init__(self, hosts: tuple[str, ...], token_file: Path | None = None) -> None:
        setfield(self, "hosts", hosts)
        setfield(self, "token_file", token_file)


_NO_GROUPS: Mapping[str, GroupEntry] = MappingProxyType({})


class ClientConfig(FrozenRecord):
    """The client config file, validated. `path` is None when no file was read."""

    __match_args__ = ("path", "token_file", "connect_timeout", "hosts", "groups")
    __slots__ = __match_args__
    path: Path | None
    token_file: Path | None
    connect_timeout: float
    hosts: Mapping[str, HostEntry]
    groups: Mapping[str, GroupEntry]

    def __init__(
        self,
        path: Path | None = None,
        token_file: Path | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        hosts: Mapping[str, HostEntry] = _NO_HOSTS,
        groups: Mapping[str, GroupEntry] = _NO_GROUPS,
    ) -> None:
        setfield(self, "path", path)
        setfield(self, "token_file", token_file)
        setfield(self, "connect_timeout", connect_timeout)
        setfield(self, "hosts", hosts)
        setfield(self, "groups", groups)


class ResolvedTarget(FrozenRecord):
    """Everything `rexec run` needs to connect: endpoint, token and deadline."""

    __match_args__ = ("name", "endpoint", "token", "connect_timeout", "token_source")
    __slots__ = __match_args__
    name: str
    endpoint: Endpoint
    token: Token
    connect_timeout: float
    token_source: str  # where the token came from, for error messages (never the secret)

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        token: Token,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        token_source: str = "",
    ) -> None:
        setfield(self, "name", name)
        setfield(self, "endpoint", endpoint)
        setfield(self, "token", token)
        setfield(self, "connect_timeout", connect_timeout)
        setfield(self, "token_source", token_source)


def _norm(text: str) -> str:
    """The path spelled as str(pathlib.PurePosixPath(text)) spells it, without pathlib."""
    root = ""
    if text.startswith("/"):
        root = "//" if text.startswith("//") and not text.startswith("///") else "/"
    parts = [part for part in text.split("/") if part and part != "."]
    return root + "/".join(parts) if root or parts else "."


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _expand(text: str, env: Mapping[str, str], base: str | None = None) -> str:
    """Expand a leading `~` (using env's HOME) and anchor relative paths at `base`."""
    if text == "~" or text.startswith("~/"):
        path = os.path.join(_home(env), text[2:])
    else:
        path = os.path.expanduser(text)
    if not path.startswith("/") and base is not None:
        path = os.path.join(base, path)
    return _norm(path)


def _config_dir(env: Mapping[str, str]) -> str:
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return _norm(xdg + "/rexec")
    return _norm(_home(env) + "/.config/rexec")


def config_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_CONFIG_HOME/rexec`, else `~/.config/rexec`."""
    from pathlib import Path

    return Path(_config_dir(env))


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    from pathlib import Path

    return Path(_config_dir(os.environ if env is None else env) + "/client.toml")


def _check_keys(
    where: str, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str
) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'")


def _timeout(where: str, key: str, value: object) -> float:
    # bool is an int subclass; `true` is not a number of seconds.
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"{where}: {key}: must be a positive number of seconds, got {value!r}")


def _path_value(where: str, key: str, value: object, env: Mapping[str, str], base: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key}: must be a non-empty string path")
    from pathlib import Path  # only when a config exists

    return Path(_expand(value, env, base))


def load_client_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> ClientConfig:
    """Load the client config: `path`, else `$REXEC_CONFIG`, else the XDG default.

    A missing default file means "no config"; a missing file the user named is an error.
    Relative paths inside the file are relative to the file's directory.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get(CONFIG_ENV))
    if path is not None:
        where = _norm(os.fspath(path))
    elif env.get(CONFIG_ENV):
        where = _expand(env[CONFIG_ENV], env)
    else:
        where = _config_dir(env) + "/client.toml"
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{where}: client config file not found") from None
        return ClientConfig()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read client config: {exc.strerror}") from None
    # only when a config exists: ~10 ms we do not pay otherwise
    from pathlib import Path

    from rexec.tomlfile import parse_toml

    doc = parse_toml(data, where)
    return _validate_client_config(doc, Path(where), env)


def _validate_client_config(
    doc: dict[str, Any], path: Path, env: Mapping[str, str]
) -> ClientConfig:
    where, base = str(path), str(path.parent)
    _check_keys(where, doc, ("defaults", "hosts", "groups"), "")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults: must be a table")
    _check_keys(where, defaults, ("token_file", "connect_timeout"), "defaults.")
    token_file = None
    if "token_file" in defaults:
        token_file = _path_value(where, "defaults.token_file", defaults["token_file"], env, base)
    timeout = DEFAULT_CONNECT_TIMEOUT
    if "connect_timeout" in defaults:
        timeout = _timeout(where, "defaults.connect_timeout", defaults["connect_timeout"])
    hosts_doc = doc.get("hosts", {})
    if not isinstance(hosts_doc, dict):
        raise ConfigError(f"{where}: hosts: must be a table of [hosts.NAME] tables")
    hosts: dict[str, HostEntry] = {}
    for name, table in hosts_doc.items():
        key = f"hosts.{name}"
        if not is_alias(name):
            raise ConfigError(f"{where}: {key}: alias names may use only A-Z a-z 0-9 . _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {key}: must be a table")
        _check_keys(
            where, table, ("address", "token_file", "connect_timeout", "server_id"), f"{key}."
        )
        if "address" not in table:
            raise ConfigError(f"{where}: {key}.address: missing key")
        address = table["address"]
        if not isinstance(address, str):
            raise ConfigError(f"{where}: {key}.address: must be a string")
        try:
            endpoint = parse_address(address)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {key}.address: {exc}") from None
        if endpoint.path is not None:
            endpoint = Endpoint(path=_expand(endpoint.path, env, base))
        host_token = None
        if "token_file" in table:
            host_token = _path_value(where, f"{key}.token_file", table["token_file"], env, base)
        host_timeout = None
        if "connect_timeout" in table:
            host_timeout = _timeout(where, f"{key}.connect_timeout", table["connect_timeout"])
        server_id = table.get("server_id")
        if server_id is not None and (not isinstance(server_id, str) or not server_id):
            raise ConfigError(f"{where}: {key}.server_id: must be a non-empty string")
        hosts[name] = HostEntry(endpoint, host_token, host_timeout, server_id)
    groups = _validate_groups(where, doc.get("groups", {}), env, base)
    return ClientConfig(path, token_file, timeout, MappingProxyType(hosts), groups)


def _host_sets(where: str, key: str, value: object) -> tuple[str, ...]:
    """A host-set string or a non-empty list of them (their syntax is checked when used)."""
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(item, str) and item.strip() for item in items)
    ):
        raise ConfigError(
            f"{where}: {key}: must be a host set string or a non-empty list of them, "
            f'e.g. ["lab[01-40]", "gpu1"]'
        )
    return tuple(items)


def _validate_groups(
    where: str, doc: object, env: Mapping[str, str], base: str
) -> Mapping[str, GroupEntry]:
    """`[groups]`: NAME = host sets, or a [groups.NAME] table with hosts and token_file."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: groups: must be a table of NAME = [host sets]")
    groups: dict[str, GroupEntry] = {}
    for name, value in doc.items():
        key = f"groups.{name}"
        if not is_alias(name):
            raise ConfigError(f"{where}: {key}: group names may use only A-Z a-z 0-9 . _ -")
        if not isinstance(value, dict):
            groups[name] = GroupEntry(_host_sets(where, key, value))
            continue
        _check_keys(where, value, ("hosts", "token_file"), f"{key}.")
        if "hosts" not in value:
            raise ConfigError(f"{where}: {key}.hosts: missing key")
        token_file = None
        if "token_file" in value:
            token_file = _path_value(where, f"{key}.token_file", value["token_file"], env, base)
        groups[name] = GroupEntry(_host_sets(where, f"{key}.hosts", value["hosts"]), token_file)
    return MappingProxyType(groups)


def read_token_file(path: str | os.PathLike[str]) -> Token:
    """Read a token file, refusing one that group or others could read or write.

    The mode is checked on the opened descriptor (fstat), so there is no window between
    the check and the read.
    """
    token = read_credential(path)
    if not isinstance(token, Token):
        raise TokenError(f"token file {os.fspath(path)}: a fleet token, not a server's token")
    return token


def parse_credential(text: str) -> Token | FleetToken:
    """A token line: an ordinary token, or a fleet token (`rexec1fleet:`, PROTOCOL.md 3.1)."""
    if text.lstrip().startswith("rexec1fleet:"):
        from rexec.protocol.fleetkey import parse_fleet_token

        return parse_fleet_token(text)
    return parse_token(text)


def read_credential(path: str | os.PathLike[str]) -> Token | FleetToken:
    """read_token_file, accepting a fleet token too (the caller derives the server's key)."""
    shown = os.fspath(path)
    found = read_secret_file(shown, "token file", _MAX_TOKEN_FILE)
    if found is None:
        raise ConfigError(f"token file not found: {shown}")
    data = found[0]
    if len(data) > _MAX_TOKEN_FILE:
        raise ConfigError(f"token file {shown}: too large to be a token file")
    try:
        return parse_credential(data.decode("ascii"))
    except UnicodeDecodeError:
        raise ConfigError(f"token file {shown}: malformed token: not ASCII text") from None
    except TokenError as exc:
        raise TokenError(f"token file {shown}: {exc}") from None


def resolve_target(
    target: str,
    *,
    token: str | Token | None = None,
    token_file: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedTarget:
    """Resolve an alias or address to (endpoint, token, connect timeout).

    Token precedence: `token` argument (a Token or its text) > `token_file` argument >
    $REXEC_TOKEN (the token text) > $REXEC_TOKEN_FILE > the alias's token_file >
    [defaults].token_file > `<config dir>/token` if it exists.
    """
    env = os.environ if env is None else env
    config = load_client_config(config_path, env)
    host = config.hosts.get(target)
    endpoint = target_endpoint(target, config)
    cred: Token | FleetToken
    if isinstance(token, Token):
        cred, source = token, "the token argument"
    elif token is not None:
        try:
            cred, source = parse_credential(token), "the token argument"
        except TokenError as exc:
            raise TokenError(f"the token argument: {exc}") from None
    else:
        cred, source = _resolve_token(target, token_file, config, host, env)
    tok, source = _server_token(cred, source, target, host, endpoint)
    timeout = config.connect_timeout
    if host is not None and host.connect_timeout is not None:
        timeout = host.connect_timeout
    return ResolvedTarget(target, endpoint, tok, timeout, source)


def target_endpoint(target: str, config: ClientConfig) -> Endpoint:
    """Where `target` (an alias, else an address) is: no connection, so a host set can
    check every host's address before it connects to any."""
    host = config.hosts.get(target)
    if host is not None:
        return host.address
    try:
        return parse_address(target)
    except ConfigError as exc:
        where = f" in {config.path}" if config.path else ""
        raise ConfigError(f"{exc} (and no host alias {target!r}{where})") from None


def fleet_server_name(target: str, host: HostEntry | None, endpoint: Endpoint) -> str:
    """The name a fleet token's key is derived from: the alias's server_id, else the alias,
    else the host part of the address (normalised by rexec.protocol.fleetkey)."""
    from rexec.protocol.fleetkey import normalize_server_name

    if host is not None:
        name = host.server_id or target
    elif endpoint.host is not None:
        name = endpoint.host
    else:
        raise ConfigError(
            f"{target}: a fleet token needs a server name, and a unix socket has none: use an "
            "alias in the client config (its name, or its server_id, is the server name)"
        )
    return normalize_server_name(name)


def resolve_host_token(
    name: str,
    *,
    token_file: str | None = None,
    group_token_file: Path | None = None,
    config: ClientConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Token, str]:
    """The token for one host of a set, and where it came from: resolve_target's precedence,
    with `group_token_file` (that of a `[groups.NAME]` holding the host) after the alias's."""
    env = os.environ if env is None else env
    config = load_client_config(None, env) if config is None else config
    host = config.hosts.get(name)
    cred, source = _resolve_token(name, token_file, config, host, env, group_token_file)
    if isinstance(cred, Token):
        return cred, source
    endpoint = host.address if host is not None else parse_address(name)
    return _server_token(cred, source, name, host, endpoint)


def _server_token(
    cred: Token | FleetToken, source: str, target: str, host: HostEntry | None, endpoint: Endpoint
) -> tuple[Token, str]:
    """The token to use with this server: `cred` itself, or a fleet token's per-server key."""
    if isinstance(cred, Token):
        return cred, source
    name = fleet_server_name(target, host, endpoint)
    return cred.derive(name), f"{source} (fleet {cred.name}, server {name})"


def _resolve_token(
    target: str,
    token_file: str | None,
    config: ClientConfig,
    host: HostEntry | None,
    env: Mapping[str, str],
    group_token_file: Path | None = None,
) -> tuple[Token | FleetToken, str]:
    if token_file:
        path = _expand(token_file, env)
        return read_credential(path), path
    if env.get(TOKEN_ENV):
        try:
            return parse_credential(env[TOKEN_ENV]), f"${TOKEN_ENV}"
        except TokenError as exc:
            raise TokenError(f"${TOKEN_ENV}: {exc}") from None
    if env.get(TOKEN_FILE_ENV):
        path = _expand(env[TOKEN_FILE_ENV], env)
        return read_credential(path), path
    if host is not None and host.token_file is not None:
        return read_credential(host.token_file), str(host.token_file)
    if group_token_file is not None:
        return read_credential(group_token_file), str(group_token_file)
    if config.token_file is not None:
        return read_credential(config.token_file), str(config.token_file)
    default = _config_dir(env) + "/token"
    if os.path.exists(default):
        return read_credential(default), default
    where = config.path or _config_dir(env) + "/client.toml"
    raise ConfigError(
        f"no token for {target!r}: use --token-file FILE, set ${TOKEN_ENV} or "
        f"${TOKEN_FILE_ENV}, set token_file for the host in {where}, "
        f"or save the token to {default} (chmod 600)"
    )
