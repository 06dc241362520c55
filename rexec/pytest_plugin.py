"""pytest plugin: run host checks once per remote host over rexec, and `rexec://` for testinfra.

    pytest --rexec-hosts 'lab1,lab2' --junitxml report.xml tests/hosts/

    def test_nginx(rexec_host):
        rexec_host.run("systemctl is-active nginx", check=True)

Registered through the `pytest11` entry point, so it is loaded wherever rexec is installed:
it stays inert unless used. Nothing is parametrized without `--rexec-hosts`, nothing
connects until a test asks for a host, and only the light `rexec` facade is imported here.
It builds on the public API only (`rexec.Client`, `rexec.Result`, `rexec.errors`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

import rexec
from rexec.errors import ExecError, RexecError
from rexec.result import CommandFailed, CommandTimeout, Result

if TYPE_CHECKING:  # types only: at run time everything comes through the `rexec` facade
    from rexec.client.blocking import Client

FIXTURE = "rexec_host"
PROPERTY = "rexec_host"  # the JUnit <property> that names the host of a testcase
STDERR_TAIL_LINES = 10
STDERR_TAIL_CHARS = 2000
COMMAND_CHARS = 200
TESTINFRA_BACKEND = "rexec.testinfra_backend.RexecBackend"

_HOSTS = pytest.StashKey[list[str]]()
_POOL = pytest.StashKey["HostPool"]()


def expand_hosts(spec: str) -> list[str]:
    """The hosts of a host set, in order.

    Takes `rexec.expand_hosts` (ranges such as `lab[01-03]`, `@group` from the client config)
    when this rexec has it; otherwise a comma list of targets.
    """
    expand = getattr(rexec, "expand_hosts", None)
    if expand is not None:
        return [str(host) for host in expand(spec)]
    return [host.strip() for host in spec.split(",") if host.strip()]


# ---- failures that say where and why ---------------------------------------------------


def describe_failure(host: str, result: Result) -> str:
    """`host: status: command` and the tail of stderr: what a CI log reader needs first."""
    if result.timed_out:
        how = f"timed out after {result.duration:.1f}s"
    elif result.exit_code is not None:
        how = f"exit status {result.exit_code}"
    else:
        how = f"killed by signal {result.signal}"
    command = result.command if isinstance(result.command, str) else shlex.join(result.command)
    if len(command) > COMMAND_CHARS:
        command = command[: COMMAND_CHARS - 3] + "..."
    lines = [f"{host}: {how}: {command}"]
    text = result.stderr.decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]
    tail = text.rstrip("\n").splitlines()[-STDERR_TAIL_LINES:]
    if tail:
        lines.append(f"stderr (last {len(tail)} lines):")
        lines.extend(f"  {line}" for line in tail)
    else:
        lines.append("stderr: (empty)")
    return "\n".join(lines)


class HostCommandFailed(CommandFailed):
    """A checked command failed on one host (non-zero exit status or a signal)."""

    def __init__(self, host: str, result: Result) -> None:
        # Exception's own constructor: the message does not depend on how CommandFailed builds its
        Exception.__init__(self, describe_failure(host, result))
        self.host = host
        self.result = result


class HostCommandTimeout(CommandTimeout):
    """A checked command on one host was killed at its deadline."""

    def __init__(self, host: str, result: Result) -> None:
        Exception.__init__(self, describe_failure(host, result))
        self.host = host
        self.result = result


def check_result(host: str, result: Result) -> Result:
    """The result when it succeeded; otherwise raise the error that names host and stderr."""
    __tracebackhide__ = True
    if result.timed_out:
        raise HostCommandTimeout(host, result)
    if not result.ok:
        raise HostCommandFailed(host, result)
    return result


# ---- connections: one per host for the whole session -----------------------------------


def _client_class() -> type[Client]:
    """`rexec.Client`, from the public facade wherever the sync client lives (the facade is
    lazy, so mypy sees no attribute there)."""
    client_class: type[Client] = getattr(rexec, "Client")  # noqa: B009
    return client_class


class HostPool:
    """One `rexec.Client` per host for a pytest session, shared by every test on that host.

    A host that cannot be reached is not tried again in the session: its later tests fail
    at once with the first error instead of each waiting out the connect timeout. A
    connection that fails during a command is dropped, so the next test on the host
    reconnects (the command that was running is never sent again).
    """

    def __init__(self, token_file: str | None = None, connect_timeout: float | None = None):
        self.token_file = token_file
        self.connect_timeout = connect_timeout
        self._clients: dict[str, Client] = {}
        self._failed: dict[str, RexecError] = {}

    def client(self, host: str, connect_timeout: float | None = None) -> Client:
        client = self._clients.get(host)
        if client is not None:
            return client
        failed = self._failed.get(host)
        if failed is not None:
            raise failed.with_traceback(None)
        try:
            client = _client_class()(
                host,
                token_file=self.token_file,
                connect_timeout=connect_timeout or self.connect_timeout,
            )
        except RexecError as exc:
            exc.add_note(f"rexec host {host}: not retried for the rest of this session")
            self._failed[host] = exc
            raise
        self._clients[host] = client
        return client

    def command_error(self, host: str, error: RexecError) -> None:
        """After a command's error: drop the host's connection unless it is surely intact
        (the command merely could not start), so the next command reconnects."""
        if not isinstance(error, ExecError):
            self.discard(host)

    def discard(self, host: str) -> None:
        client = self._clients.pop(host, None)
        if client is not None:
            with contextlib.suppress(RexecError, OSError):
                client.close()

    def close(self) -> None:
        for host in list(self._clients):
            self.discard(host)
        self._failed.clear()


_pools: list[HostPool] = []  # the running sessions' pools, innermost last (pytester nests)


def current_pool() -> HostPool:
    """The running pytest session's pool; a process-wide one outside pytest."""
    if not _pools:
        _pools.append(HostPool())
    return _pools[-1]


class RexecHost:
    """The `rexec_host` fixture's value: one host of `--rexec-hosts` and its connection."""

    def __init__(self, host: str, pool: HostPool) -> None:
        __tracebackhide__ = True
        self.host = host
        self._pool = pool
        try:
            self.client = pool.client(host)
        except RexecError as exc:  # a setup error that reads as one line, not rexec's insides
            pytest.fail("\n".join([f"{host}: {exc}", *getattr(exc, "__notes__", ())]), False)

    def __repr__(self) -> str:
        return f"RexecHost({self.host!r})"

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
    ) -> Result:
        """Run a command (a shell line, or an exact argv) on this host and collect it.

        check=True raises HostCommandFailed / HostCommandTimeout (subclasses of rexec's
        CommandFailed / CommandTimeout) whose message names the host, the command, the exit
        status and the last lines of stderr.
        """
        __tracebackhide__ = True
        try:
            result = self.client.run(command, timeout=timeout, env=env, cwd=cwd, stdin=stdin)
        except RexecError as exc:
            self._pool.command_error(self.host, exc)
            exc.add_note(f"rexec host: {self.host}")
            # the same error, its traceback cut here: the test's line, not rexec's insides
            raise exc.with_traceback(None)  # noqa: B904
        return check_result(self.host, result) if check else result

    def check_output(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
    ) -> str:
        """stdout of a command that must succeed, as text without its trailing newlines."""
        __tracebackhide__ = True
        result = self.run(command, check=True, timeout=timeout, env=env, cwd=cwd, stdin=stdin)
        return result.stdout.decode("utf-8", "replace").rstrip("\n")

    def start(self, command: str | Sequence[str], **kwargs: Any) -> Any:
        """A streaming process (`Client.start`), where this rexec's sync client has one."""
        start = getattr(self.client, "start", None)
        if start is None:
            raise NotImplementedError("this rexec's Client has no start(): upgrade rexec")
        return start(command, **kwargs)


# ---- pytest hooks ---------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rexec", "remote hosts over rexec")
    group.addoption(
        "--rexec-hosts",
        metavar="HOSTS",
        default=None,
        help="run each test that uses the rexec_host fixture once per host: targets or "
        "aliases separated by commas, or a host set (lab[01-03], @group) where rexec has "
        "host sets; write a group as --rexec-hosts=@group (pytest reads a lone @word as a "
        "file of arguments)",
    )
    group.addoption(
        "--rexec-token-file",
        metavar="FILE",
        default=None,
        help="token file for every host (default: $REXEC_TOKEN, $REXEC_TOKEN_FILE, then "
        "the client config, as for `rexec run`)",
    )
    group.addoption(
        "--rexec-connect-timeout",
        metavar="SECONDS",
        type=float,
        default=None,
        help="seconds to connect and authenticate to each host (default: the client config)",
    )


def pytest_configure(config: pytest.Config) -> None:
    timeout: float | None = config.getoption("rexec_connect_timeout")
    if timeout is not None and not timeout > 0:
        raise pytest.UsageError(f"--rexec-connect-timeout must be > 0, got {timeout}")
    spec: str | None = config.getoption("rexec_hosts")
    if spec is not None:
        try:
            hosts = expand_hosts(spec)
        except RexecError as exc:
            raise pytest.UsageError(f"--rexec-hosts: {exc}") from None
        if not hosts:
            raise pytest.UsageError(f"--rexec-hosts: no hosts in {spec!r}")
        config.stash[_HOSTS] = hosts
    pool = HostPool(config.getoption("rexec_token_file"), timeout)
    config.stash[_POOL] = pool
    _pools.append(pool)
    register_testinfra_backend()


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is not None:
        pool.close()
        if pool in _pools:
            _pools.remove(pool)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    hosts = metafunc.config.stash.get(_HOSTS, None)
    if not hosts or FIXTURE not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if FIXTURE in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test picks its own hosts
    metafunc.parametrize(FIXTURE, hosts, ids=hosts, indirect=True)


@pytest.fixture
def rexec_host(request: pytest.FixtureRequest) -> RexecHost:
    """One host of --rexec-hosts (the test runs once per host, the host in its id).

    Offers run(cmd, check=...) -> Result, check_output(cmd) -> str, start(...) and
    host; the connection is opened once per host and session. The host is also recorded as
    the JUnit property `rexec_host` of the testcase.
    """
    host: str | None = getattr(request, "param", None)
    if host is None:
        pytest.fail(f"the {FIXTURE} fixture needs --rexec-hosts HOSTS", pytrace=False)
    request.node.user_properties.append((PROPERTY, host))
    return RexecHost(host, request.config.stash[_POOL])


def register_testinfra_backend() -> None:
    """Make `rexec://HOST` a testinfra connection type, where testinfra is installed.

    testinfra has no plugin hook for backends: its connection types are the table
    testinfra.backend.BACKENDS (name -> dotted class path), read when a host is resolved.
    Adding a row by its path imports nothing of ours until a `rexec://` host is used.
    """
    if importlib.util.find_spec("testinfra") is None:
        return
    try:
        backends: Any = importlib.import_module("testinfra.backend")  # untyped third party
    except ImportError:
        return
    table = getattr(backends, "BACKENDS", None)
    if isinstance(table, dict):
        table.setdefault("rexec", TESTINFRA_BACKEND)
