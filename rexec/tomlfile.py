"""TOML documents for both config files, with errors that name the file.

tomllib is imported on first use: the client reads a config only when one exists, and its
start-up should not pay for the parser otherwise.
"""

from __future__ import annotations

from typing import Any

from rexec.errors import ConfigError


def parse_toml(data: bytes, where: str) -> dict[str, Any]:
    """Decode and parse; any problem is a ConfigError naming `where` (and the line)."""
    import tomllib

    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
