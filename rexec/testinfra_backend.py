"""A testinfra backend: `pytest --hosts='rexec://lab1'` runs testinfra suites over rexec.

    pytest --hosts='rexec://lab1,rexec://@lab' test_infra.py   # host.file, host.service, ...

The pytest plugin (rexec.pytest_plugin) registers it as connection type `rexec` when
testinfra is installed; outside pytest, call `rexec.pytest_plugin.register_testinfra_backend()`
before `testinfra.get_host("rexec://lab1")`. Commands share the plugin's connections (one per
host and session); tokens and connect timeouts come from `--rexec-token-file` /
`--rexec-connect-timeout`, else as for `rexec run`. A `?timeout=SECONDS` in the host spec sets
that host's connect timeout, as it does for testinfra's ssh backends.

Host specs go through urllib first, which rejects brackets outside IPv6 literals: write a
range as `rexec://lab%5B01-03%5D`, or name a group (`rexec://@lab`). testinfra splits
`--hosts` on commas, so each host (or set) needs its own `rexec://`.
"""

from __future__ import annotations

import importlib
import urllib.parse
from typing import Any

from rexec.errors import ExecError, RexecError
from rexec.pytest_plugin import current_pool, expand_hosts

# testinfra ships no type information for its backend base class: keep it behind Any.
_base: Any = importlib.import_module("testinfra.backend.base")


class RexecBackend(_base.BaseBackend):  # type: ignore[misc]  # subclassing an untyped base
    """testinfra's view of one rexec host: commands run as `/bin/sh -c` lines on it."""

    NAME = "rexec"

    def __init__(self, hostname: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(urllib.parse.unquote(hostname), *args, **kwargs)
        timeout = kwargs.get("timeout")
        self.connect_timeout = float(timeout) if timeout else None

    @classmethod
    def get_hosts(cls, host: str | None, **kwargs: Any) -> list[str]:
        """A host spec may name a host set: one backend per host it expands to."""
        if not host:
            raise RuntimeError("rexec:// needs a host: rexec://lab1 or rexec://@group")
        return expand_hosts(urllib.parse.unquote(host))

    def run(self, command: str, *args: str, **kwargs: Any) -> Any:
        """testinfra's one primitive: run a shell line, return its CommandResult."""
        line = self.get_command(command, *args)
        pool = current_pool()
        client = pool.client(self.hostname, self.connect_timeout)
        try:
            result = client.run(line)
        except ExecError as exc:  # the server could not start its shell: say it as sh would
            status = exc.exit_code if exc.exit_code is not None else 127
            return self.result(status, self.encode(line), b"", f"{exc}\n".encode())
        except RexecError as exc:
            pool.command_error(self.hostname, exc)  # the next command reconnects
            raise
        return self.result(result.shell_status, self.encode(line), result.stdout, result.stderr)
