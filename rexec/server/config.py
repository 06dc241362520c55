"""Server configuration: TOML validated by pydantic, every mistake named by file and key.

The server is long-lived, so pydantic's import cost does not matter here (the client reads
its own config by hand in `rexec.client.target`). Models are frozen and refuse unknown keys: a
typo in a limit must fail loudly at start-up, never silently keep a default.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rexec.address import DEFAULT_PORT, Endpoint, parse_address
from rexec.errors import ConfigError
from rexec.tomlfile import parse_toml

if TYPE_CHECKING:
    from rexec.protocol.noise import Suite

DEFAULT_STATE_DIR = "~/.local/state/rexec-server"
UNIX_SOCKET_NAME = "rexec.sock"  # in $RUNTIME_DIRECTORY when systemd gives us one
_MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# TOML is typed, so take its types at their word: `true` is not 1 and "10" is not 10.
PosInt = Annotated[int, Strict(), Field(gt=0)]
PosFloat = Annotated[float, Strict(), Field(gt=0)]
Percent = Annotated[int, Strict(), Field(ge=0, le=100)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]


def _systemd_dir(name: str) -> str | None:
    """The first directory systemd passed in $STATE_DIRECTORY / $RUNTIME_DIRECTORY, if any."""
    first = os.environ.get(name, "").split(":")[0]
    return first if os.path.isabs(first) else None


def default_state_dir() -> str:
    """$STATE_DIRECTORY under systemd (StateDirectory=), else ~/.local/state/rexec-server."""
    return _systemd_dir("STATE_DIRECTORY") or DEFAULT_STATE_DIR


def default_unix() -> tuple[str, ...]:
    """$RUNTIME_DIRECTORY/rexec.sock under systemd (RuntimeDirectory=), else no unix socket."""
    runtime = _systemd_dir("RUNTIME_DIRECTORY")
    return (os.path.join(runtime, UNIX_SOCKET_NAME),) if runtime else ()


def _expand_path(value: Any, info: ValidationInfo) -> Any:
    """`~` expanded, relative paths anchored at the config file's directory, directories resolved.

    The last component is kept: it may be a symbolic link that the StrictModes checks must
    see and refuse (rexec.statefile), not one silently followed here.
    """
    if not isinstance(value, str | Path) or not str(value):
        return value  # let the Path type report the error
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute():
        ctx = info.context if isinstance(info.context, dict) else {}
        path = Path(ctx.get("base_dir") or Path.cwd()) / path
    if path.name in ("", ".", ".."):
        return path.resolve()
    return Path(os.path.realpath(path.parent)) / path.name


ConfigPath = Annotated[Path, BeforeValidator(_expand_path)]
Suite_ = Literal["AESGCM", "ChaChaPoly"]
SUITE_NAMES: tuple[Suite_, ...] = ("AESGCM", "ChaChaPoly")  # Suite.label of the protocol core
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Model):
    """`[server]`: where to listen, where state lives, which suites, how to log."""

    listen: tuple[StrictStr, ...] = ("127.0.0.1:8222",)
    unix: tuple[ConfigPath, ...]  # default: $RUNTIME_DIRECTORY/rexec.sock, else none
    unix_mode: Annotated[int, Strict()] = 0o600  # TOML octal: 0o660
    unix_group: StrictStr | None = None
    state_dir: ConfigPath  # default: $STATE_DIRECTORY, else ~/.local/state/rexec-server
    tokens: ConfigPath  # default derived from state_dir (see _derive_paths)
    audit_log: ConfigPath
    audit_failure: Literal["log", "refuse"] = "log"
    suites: tuple[Suite_, ...] = Field(default=SUITE_NAMES, min_length=1)
    log_level: LogLevel = "info"
    log_format: Literal["auto", "console", "json"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _derive_paths(cls, data: Any) -> Any:
        """state_dir and unix default to systemd's directories; tokens and audit_log to files
        inside state_dir."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.setdefault("unix", default_unix())
        state = data.setdefault("state_dir", default_state_dir())
        if isinstance(state, str | Path):
            data.setdefault("tokens", str(Path(state) / "tokens.json"))
            data.setdefault("audit_log", str(Path(state) / "audit.jsonl"))
        return data

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Normalise each address (parsed by the same code as the client's) and refuse dups."""
        out: list[str] = []
        for i, text in enumerate(value):
            try:
                ep = parse_address(text, DEFAULT_PORT, allow_zero_port=True)
            except ConfigError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
            if ep.is_unix:
                raise ValueError(f"[{i}]: {text!r}: put unix sockets in server.unix, not listen")
            if str(ep) in out and ep.port != 0:
                raise ValueError(f"[{i}]: {text!r} is listed twice")
            out.append(str(ep))
        return tuple(out)

    @field_validator("unix_mode")
    @classmethod
    def _file_mode(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError(
                f"expected permission bits in octal such as 0o660, got {value} (octal 0o{value:o})"
            )
        return value

    @field_validator("unix_group")
    @classmethod
    def _known_group(cls, value: str | None) -> str | None:
        if value is not None:
            unix_gid(value)  # refuses an unknown group now, not at bind time
        return value

    @field_validator("suites")
    @classmethod
    def _check_suites(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a suite is listed twice")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs_a_listener(self) -> ServerSection:
        if not self.listen and not self.unix:
            raise ValueError("no listener: set server.listen or server.unix")
        if len(set(self.unix)) != len(self.unix):
            raise ValueError("unix: a socket path is listed twice")
        for path in self.unix:
            if len(os.fsencode(path)) > _MAX_UNIX_PATH:  # bind() would fail much later
                raise ValueError(f"unix: {str(path)!r} is longer than {_MAX_UNIX_PATH} bytes")
        return self

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every listener: TCP addresses first, then unix sockets."""
        tcp = tuple(parse_address(a, allow_zero_port=True) for a in self.listen)
        return tcp + tuple(Endpoint(path=str(p)) for p in self.unix)

    def allowed_suites(self) -> tuple[Suite, ...]:
        """The suites as protocol enum values (imports the protocol core only when asked)."""
        from rexec.protocol.noise import Suite

        by_label = {s.label: s for s in Suite}
        return tuple(by_label[name] for name in self.suites)


class LimitsSection(_Model):
    """`[limits]`: resource and time bounds. 0 means "none" where the comment says so."""

    max_connections: PosInt = 256
    # Before authentication (as OpenSSH's MaxStartups start:rate:full, PerSourceMaxStartups):
    max_unauthenticated: PosInt = 64  # "full": every newcomer is refused
    unauthenticated_drop_start: PosInt = 32  # "start": from here newcomers are dropped ...
    unauthenticated_drop_rate: Percent = 30  # ... with this % chance, rising to 100 at full
    max_unauthenticated_per_source: PosInt = 16  # per IP address, or per uid on unix sockets
    hello_timeout: PosFloat = 5.0  # accept -> HELLO + message 1 in ("first flight")
    handshake_timeout: PosFloat = 10.0  # accept -> valid AUTH
    idle_timeout: NonNegFloat = 3600.0  # 0 disables
    keepalive: NonNegFloat = 30.0  # PING a client this silent while it has commands; 0 disables
    max_channels: PosInt = 256
    default_timeout: NonNegFloat = 0.0  # 0 = no deadline unless the client asks
    max_timeout: NonNegFloat = 0.0  # 0 = no cap
    kill_grace: NonNegFloat = 2.0
    shutdown_grace: NonNegFloat = 10.0
    auth_failures: PosInt = 10
    auth_window: PosFloat = 60.0

    @model_validator(mode="after")
    def _consistent(self) -> LimitsSection:
        if self.max_timeout and self.default_timeout > self.max_timeout:
            raise ValueError(
                f"default_timeout ({self.default_timeout:g}) must not exceed "
                f"max_timeout ({self.max_timeout:g})"
            )
        if self.max_unauthenticated > self.max_connections:
            raise ValueError(
                f"max_unauthenticated ({self.max_unauthenticated}) must not exceed "
                f"max_connections ({self.max_connections})"
            )
        # Set explicitly, these must fit under their ceiling; left at their defaults they
        # shrink to it (a config that only lowers max_unauthenticated stays valid).
        explicit = self.model_fields_set
        for key, ceiling in (
            ("unauthenticated_drop_start", "max_unauthenticated"),
            ("max_unauthenticated_per_source", "max_unauthenticated"),
            ("hello_timeout", "handshake_timeout"),
        ):
            value, top = getattr(self, key), getattr(self, ceiling)
            if key in explicit and value > top:
                raise ValueError(f"{key} ({value:g}) must not exceed {ceiling} ({top:g})")
        return self

    @property
    def drop_start(self) -> int:
        """unauthenticated_drop_start, at most max_unauthenticated."""
        return min(self.unauthenticated_drop_start, self.max_unauthenticated)

    @property
    def per_source(self) -> int:
        """max_unauthenticated_per_source, at most max_unauthenticated."""
        return min(self.max_unauthenticated_per_source, self.max_unauthenticated)

    @property
    def first_flight_timeout(self) -> float:
        """hello_timeout, at most handshake_timeout."""
        return min(self.hello_timeout, self.handshake_timeout)

    def effective_timeout(self, requested: float | None) -> float | None:
        """The deadline for one command: the client's (or the default), capped by max_timeout.

        None/0 from the client means "no deadline asked"; with a cap set, the cap applies.
        """
        timeout = requested if requested else (self.default_timeout or None)
        if self.max_timeout and (timeout is None or timeout > self.max_timeout):
            return self.max_timeout
        return timeout


class ExecSection(_Model):
    """`[exec]`: how commands are started and which client environment may reach them."""

    shell: StrictStr = "/bin/sh"
    env_allowlist: tuple[StrictStr, ...] = ("LANG", "LC_*", "TZ", "TERM", "REXEC_*")
    base_env: dict[StrictStr, StrictStr] = Field(
        default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    )
    keep_orphans: StrictBool = False
    cgroup: Literal["auto", "off", "require"] = "auto"

    @field_validator("shell")
    @classmethod
    def _absolute_shell(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return value

    @field_validator("env_allowlist")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(value):
            if not pattern or "=" in pattern or "\0" in pattern:
                raise ValueError(f"[{i}]: {pattern!r} is not an environment name pattern")
        return value

    @field_validator("base_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if "\0" in val:
                raise ValueError(f"{name}: value contains a NUL byte")
        return value


class ServerConfig(_Model):
    """The whole server config file."""

    server: ServerSection = Field(default_factory=lambda: ServerSection.model_validate({}))
    limits: LimitsSection = Field(default_factory=LimitsSection)
    exec: ExecSection = Field(default_factory=ExecSection)

    @classmethod
    def default(cls, state_dir: str | Path | None = None) -> ServerConfig:
        """Defaults, optionally with another state dir (tokens and audit log follow it)."""
        server: dict[str, Any] = {} if state_dir is None else {"state_dir": str(state_dir)}
        return cls.model_validate({"server": server})


def unix_gid(group: str) -> int:
    """A group name or number as a gid; ValueError names an unknown group."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"unknown group {group!r}") from None


def env_allowed(name: str, allowlist: Iterable[str]) -> bool:
    """May the client set variable `name`? Case-sensitive fnmatch, as env names are."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allowlist)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# What a key expects, in TOML words, by pydantic error type: one place for every message.
_EXPECTS = {
    "tuple_type": "a list",
    "list_type": "a list",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (a string)",
}


def _toml_value(value: Any) -> str:
    """How a TOML value reads to the person who wrote it: its type, and short scalars."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _plain(err: Any) -> str | None:
    """pydantic's error in plain words, or None to keep its (or our validator's) message."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _EXPECTS:
        return f"expected {_EXPECTS[kind]}, got {_toml_value(value)}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {_toml_value(value)}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {value!r}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {value!r}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, got {value!r}"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"must list at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        n = ctx.get("max_length")
        return f"must list at most {n} item{'s' if n != 1 else ''}"
    return None


def format_validation_error(where: str, exc: ValidationError) -> str:
    """One line: `file: key: problem; key: problem`, in plain words (no pydantic wording)."""
    errors = exc.errors(include_url=False)
    item_errors = {
        err["loc"][:-1] for err in errors if err["loc"] and isinstance(err["loc"][-1], int)
    }
    parts: list[str] = []
    for err in errors:
        loc = _loc(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "too_short" and err["loc"] in item_errors:
            continue  # a bad item was dropped: its own message says why
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"{loc}: missing key")
        elif (plain := _plain(err)) is not None:
            parts.append(f"{loc}: {plain}" if loc else plain)
        elif loc and msg.startswith("["):  # our list-item errors: "listen[0]: ..."
            parts.append(f"{loc}{msg}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def parse_server_config(doc: dict[str, Any], path: Path | None = None) -> ServerConfig:
    """Validate an already-parsed TOML document; relative paths anchor at path's dir."""
    where = str(path) if path is not None else "<config>"
    base = path.resolve().parent if path is not None else Path.cwd()
    try:
        return ServerConfig.model_validate(doc, context={"base_dir": base})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(where, exc)) from None


def load_server_config(
    path: Path | str | None, overrides: dict[str, Any] | None = None
) -> ServerConfig:
    """Load and validate a server config file; None gives the defaults.

    `overrides` are [server] keys from the command line (listen, unix, tokens, state_dir);
    they are merged before validation so derived paths and checks apply to them too.
    """
    if path is None:
        doc: dict[str, Any] = {}
        if overrides:
            doc["server"] = dict(overrides)
        return parse_server_config(doc, None) if overrides else ServerConfig.default()
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: server config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read server config: {exc.strerror}") from None
    doc = parse_toml(data, str(path))
    if overrides:
        server = doc.get("server", {})
        if not isinstance(server, dict):
            raise ConfigError(f"{path}: server: must be a table")
        doc["server"] = {**server, **overrides}
    return parse_server_config(doc, path)
