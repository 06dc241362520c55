"""rexec's pytest plugin and testinfra backend, end to end: generated suites run by pytest in
a subprocess against three real servers on loopback, reached through client-config aliases
lab1..lab3 (each with its own token). lab2's environment makes the "service" check fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rexec
from rexec.pytest_plugin import STDERR_TAIL_LINES, HostCommandFailed, HostPool, RexecHost

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
PYTEST_TIMEOUT = 120.0
# plugins the generated suites do not need: hypothesis's alone costs ~1 s of start-up
NO_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
HOSTS = ("lab1", "lab2", "lab3")
SERVICE_STATE = {"lab1": "active", "lab2": "inactive", "lab3": "active"}

# logs 12 stderr lines, then fails with exit status 3 where SERVICE_STATE is not "active"
SERVICE_CHECK = (
    'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "log line $i" >&2; done; '
    'echo "nginx: $SERVICE_STATE" >&2; test "$SERVICE_STATE" = active || exit 3'
)

SUITE = f"""
import sys

SERVICE_CHECK = {SERVICE_CHECK!r}


def test_echo(rexec_host):
    assert rexec_host.check_output("echo hi") == "hi"


def test_service(rexec_host):
    rexec_host.run(SERVICE_CHECK, check=True)
"""


@dataclass
class Lab:
    """Three servers, a client config naming them, and the pytest runner over them."""

    dir: Path
    servers: dict[str, Any]
    config: Path
    e2e: Any

    def pytest(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`python -m pytest ARGS` in the lab dir with the lab's client config (no REXEC_TOKEN)."""
        return subprocess.run(
            [sys.executable, "-m", "pytest", *NO_PLUGINS, *args],
            cwd=cwd or self.dir,
            env=self.e2e.clean_env({"REXEC_CONFIG": str(self.config), **(env or {})}),
            capture_output=True,
            text=True,
            timeout=PYTEST_TIMEOUT,
            check=False,
        )

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(textwrap.dedent(text))
        return path


def _secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _closed_port() -> int:
    """A loopback port with (almost certainly) no listener: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, e2e: Any) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("lab")
    servers: dict[str, Any] = {}
    lines: list[str] = []
    try:
        for name in HOSTS:
            config = (
                '[exec]\nbase_env = { PATH = "/usr/local/bin:/usr/bin:/bin", '
                f'SERVICE_STATE = "{SERVICE_STATE[name]}" }}\n'
            )
            srv = e2e.start_server(base / name, config=config)
            servers[name] = srv
            _secret(base / f"{name}.token", srv.token)
            lines += [f"[hosts.{name}]", f'address = "{srv.address}"']
            lines += [f'token_file = "{base / name}.token"', ""]
        lines += ["[hosts.down]", f'address = "127.0.0.1:{_closed_port()}"']
        lines += [f'token_file = "{base / "lab1"}.token"', ""]
        config_path = base / "client.toml"
        config_path.write_text("\n".join(lines))
        work = base / "work"
        work.mkdir()
        (work / "pytest.ini").write_text("[pytest]\n")  # the rootdir: not this repository
        yield Lab(work, servers, config_path, e2e)
    finally:
        for srv in servers.values():
            with contextlib.suppress(AssertionError):
                srv.stop()


def _testcases(xml_path: Path) -> dict[str, ET.Element]:
    root = ET.parse(xml_path).getroot()
    return {case.attrib["name"]: case for case in root.iter("testcase")}


def _outcome(case: ET.Element) -> str:
    for kind in ("failure", "error", "skipped"):
        if case.find(kind) is not None:
            return kind
    return "passed"


def _properties(case: ET.Element) -> list[tuple[str, str]]:
    return [(p.attrib["name"], p.attrib["value"]) for p in case.iter("property")]


def test_one_testcase_per_test_and_host_in_junit(lab: Lab) -> None:
    lab.write("test_suite.py", SUITE)
    before = {name: len(srv.log_events("authenticated")) for name, srv in lab.servers.items()}
    proc = lab.pytest("--rexec-hosts", ",".join(HOSTS), "--junitxml", "out.xml", "test_suite.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr

    cases = _testcases(lab.dir / "out.xml")
    expected = {f"test_echo[{h}]": "passed" for h in HOSTS}
    expected |= {f"test_service[{h}]": "passed" for h in HOSTS}
    expected["test_service[lab2]"] = "failure"
    assert {name: _outcome(case) for name, case in cases.items()} == expected
    for name, case in cases.items():
        host = name[name.index("[") + 1 : -1]
        assert case.attrib["classname"] == "test_suite"
        assert _properties(case) == [("rexec_host", host)]

    failure = cases["test_service[lab2]"].find("failure")
    assert failure is not None
    message = failure.attrib["message"]
    assert f"lab2: exit status 3: {SERVICE_CHECK}\n" in message
    assert f"stderr (last {STDERR_TAIL_LINES} lines):\n" in message
    assert "  log line 4\n" in message
    assert "  log line 3\n" not in message  # only the tail
    assert message.endswith("  log line 12\n  nginx: inactive")
    assert "HostCommandFailed" in message
    assert "lab2: exit status 3" in proc.stdout  # the terminal report says it too

    # one connection per host for the whole session, closed at its end
    for name, srv in lab.servers.items():
        assert len(srv.log_events("authenticated")) == before[name] + 1, name
        assert lab.e2e.wait_until(
            lambda srv=srv, n=before[name]: len(srv.log_events("connection closed")) > n, 5.0
        ), name


def test_unreachable_host_errors_each_test_fast(lab: Lab) -> None:
    lab.write("test_down.py", SUITE)
    proc = lab.pytest("--rexec-hosts", "down,lab1", "--junitxml", "down.xml", "test_down.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cases = _testcases(lab.dir / "down.xml")
    assert {n: _outcome(c) for n, c in cases.items()} == {
        "test_echo[down]": "error",
        "test_echo[lab1]": "passed",
        "test_service[down]": "error",
        "test_service[lab1]": "passed",
    }
    for name in ("test_echo[down]", "test_service[down]"):
        error = cases[name].find("error")
        assert error is not None
        message = error.attrib["message"]
        assert message.startswith(
            'failed on setup with "Failed: down: cannot connect to 127.0.0.1:'
        )
        assert message.endswith('\nrexec host down: not retried for the rest of this session"')
        assert "rexec/client" not in (error.text or "")  # one line, not rexec's traceback


def test_a_test_can_pin_its_own_hosts(lab: Lab) -> None:
    lab.write(
        "test_pinned.py",
        """
        import pytest


        @pytest.mark.parametrize("rexec_host", ["lab3"], indirect=True)
        def test_pinned(rexec_host):
            assert rexec_host.check_output("echo $SERVICE_STATE") == "active"


        def test_every(rexec_host):
            pass
        """,
    )
    proc = lab.pytest("-v", "--rexec-hosts", "lab1,lab2", "test_pinned.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines() if " PASSED " in line] == [
        "test_pinned.py::test_pinned[lab3]",
        "test_pinned.py::test_every[lab1]",
        "test_pinned.py::test_every[lab2]",
    ]


def test_plugin_is_inert_when_not_used(lab: Lab) -> None:
    lab.write(
        "test_plain.py",
        """
        import sys

        import pytest


        @pytest.mark.parametrize("n", [1, 2])
        def test_plain(n):
            assert n in (1, 2)


        def test_rexec_loaded_but_idle(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("rexec")
            assert "rexec.client.blocking" not in sys.modules
            assert "rexec.testinfra_backend" not in sys.modules
        """,
    )
    proc = lab.pytest("-v", "test_plain.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines() if " PASSED " in line] == [
        "test_plain.py::test_plain[1]",
        "test_plain.py::test_plain[2]",
        "test_plain.py::test_rexec_loaded_but_idle",
    ]
    assert "3 passed in" in proc.stdout


def test_rexec_host_without_hosts_says_what_is_missing(lab: Lab) -> None:
    lab.write("test_needs.py", "def test_x(rexec_host):\n    pass\n")
    proc = lab.pytest("-q", "test_needs.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the rexec_host fixture needs --rexec-hosts HOSTS" in proc.stdout
    assert "1 error" in proc.stdout


def test_example_suite_in_docs_passes(lab: Lab) -> None:
    shutil.copy(EXAMPLES / "test_smoke.py", lab.dir / "test_smoke.py")
    proc = lab.pytest("-v", "--rexec-hosts", "lab1,lab3", "test_smoke.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "12 passed" in proc.stdout
    assert "test_smoke.py::test_tool_installed[lab3-python3] PASSED" in proc.stdout


# ---- testinfra ---------------------------------------------------------------------------


def _need_testinfra() -> None:
    pytest.importorskip(
        "testinfra", reason="pytest-testinfra is not installed (it is in the dev extra)"
    )


INFRA_SUITE = """
def test_exit_status(host):
    assert host.run("exit 3").rc == 3


def test_killed_by_signal_is_128_plus_n(host):
    assert host.run("kill -9 $$").rc == 137


def test_output_is_separate_and_exact(host):
    out = host.run("printf 'a b\\\\n'; printf err >&2")
    assert (out.stdout, out.stderr, out.rc) == ("a b\\n", "err", 0)


def test_quoting_and_check_output(host):
    assert host.check_output("printf %%s %s", "it's; not run") == "it's; not run"


def test_the_host_behind_it(host):
    assert host.backend.get_connection_type() == "rexec"
    assert host.check_output("echo $SERVICE_STATE") in ("active", "inactive")
"""


def test_testinfra_suite_over_rexec(lab: Lab) -> None:
    _need_testinfra()
    shutil.copy(EXAMPLES / "test_infra.py", lab.dir / "test_infra.py")
    lab.write("test_infra_more.py", INFRA_SUITE)
    proc = lab.pytest(
        "-v",
        "--hosts=rexec://lab1,rexec://lab2",
        "--junitxml",
        "infra.xml",
        "test_infra.py",
        "test_infra_more.py",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = _testcases(lab.dir / "infra.xml")
    assert len(cases) == 2 * 9
    assert all(_outcome(c) == "passed" for c in cases.values())
    assert "test_infra.py::test_root_user[rexec://lab2] PASSED" in proc.stdout
    assert "test_infra.py::test_hostname_file[rexec://lab1] PASSED" in proc.stdout


def test_testinfra_reports_an_unreachable_host(lab: Lab) -> None:
    _need_testinfra()
    lab.write("test_reach.py", "def test_id(host):\n    assert host.run('id').rc == 0\n")
    proc = lab.pytest("-q", "--hosts=rexec://down?timeout=5", "test_reach.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ConnectionLost" in proc.stdout
    assert "rexec host down" in proc.stdout


def test_testinfra_connection_option_and_api(lab: Lab) -> None:
    """testinfra's own `--connection=rexec` form names the backend too."""
    _need_testinfra()
    lab.write("test_conn.py", "def test_uid(host):\n    assert host.check_output('id -u') == '0'\n")
    proc = lab.pytest("-v", "--connection=rexec", "--hosts=lab1,lab3", "test_conn.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_conn.py::test_uid[rexec://lab1] PASSED" in proc.stdout
    assert "test_conn.py::test_uid[rexec://lab3] PASSED" in proc.stdout


def test_testinfra_get_host_outside_pytest_hosts(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`testinfra.get_host("rexec://...")` from Python, once the backend is registered."""
    _need_testinfra()
    import testinfra

    from rexec.pytest_plugin import register_testinfra_backend

    monkeypatch.setenv("REXEC_TOKEN", server.token)
    register_testinfra_backend()
    host = testinfra.get_host(f"rexec://{server.address}")
    out = host.run("printf %s; exit 5", "a'b")
    assert (out.rc, out.stdout, out.stderr) == (5, "a'b", "")
    assert host.backend.get_pytest_id() == f"rexec://{server.address}"


STAND_IN = """
import rexec

def expand_hosts(spec):
    return ["lab3", "lab1"] if spec == "@lab" else spec.split(",")

rexec.expand_hosts = expand_hosts  # a stand-in for rexec's host sets
"""


def test_host_sets_are_expanded_by_rexec(lab: Lab, tmp_path: Path) -> None:
    """Both `--rexec-hosts` and `rexec://` specs go through `rexec.expand_hosts` when it exists
    (here a stand-in set by a conftest, so the plumbing is tested without the config)."""
    _need_testinfra()
    work = tmp_path / "sets"
    work.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "conftest.py").write_text(STAND_IN)
    (work / "test_sets.py").write_text(
        "def test_rexec(rexec_host):\n    assert rexec_host.check_output('echo ok') == 'ok'\n\n"
        "def test_infra(host):\n    assert host.run('true').rc == 0\n"
    )
    # `--rexec-hosts=@lab` in one word: pytest reads a lone `@lab` argument as a file of args
    proc = lab.pytest("-v", "--rexec-hosts=@lab", "--hosts=rexec://@lab", "test_sets.py", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = [line.split()[0] for line in proc.stdout.splitlines() if " PASSED " in line]
    assert passed == [
        "test_sets.py::test_rexec[lab3]",
        "test_sets.py::test_rexec[lab1]",
        "test_sets.py::test_infra[rexec://lab1]",
        "test_sets.py::test_infra[rexec://lab3]",
    ]


def test_rexec_hosts_group(lab: Lab) -> None:
    """`--rexec-hosts @lab` expands a client-config group, where this rexec has host sets."""
    import rexec as api

    if getattr(api, "expand_hosts", None) is None:
        pytest.skip("this rexec has no host sets (rexec.expand_hosts) for @groups")
    config = lab.dir / "group.toml"
    groups = ", ".join(f'"{h}"' for h in HOSTS)
    config.write_text(lab.config.read_text() + f"\n[groups]\nlab = [{groups}]\n")
    lab.write("test_rgroup.py", SUITE)
    env = {"REXEC_CONFIG": str(config)}
    proc = lab.pytest("-v", "--rexec-hosts=@lab", "test_rgroup.py", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "test_rgroup.py::test_service[lab2] FAILED" in proc.stdout
    assert "test_rgroup.py::test_service[lab3] PASSED" in proc.stdout


def test_testinfra_group(lab: Lab) -> None:
    """`rexec://@lab` expands a client-config group, where this rexec has host sets."""
    _need_testinfra()
    import rexec

    if getattr(rexec, "expand_hosts", None) is None:
        pytest.skip("this rexec has no host sets (rexec.expand_hosts) for @groups")
    config = lab.dir / "group.toml"
    groups = ", ".join(f'"{h}"' for h in HOSTS)
    config.write_text(lab.config.read_text() + f"\n[groups]\nlab = [{groups}]\n")
    lab.write("test_group.py", "def test_id(host):\n    assert host.run('id -u').rc == 0\n")
    env = {"REXEC_CONFIG": str(config)}
    proc = lab.pytest("-v", "--hosts=rexec://@lab", "test_group.py", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in HOSTS:
        assert f"test_group.py::test_id[rexec://{host}] PASSED" in proc.stdout


# ---- the fixture's object and the connection pool, in process ---------------------------


@pytest.fixture
def pool(server: Any, monkeypatch: pytest.MonkeyPatch, e2e: Any) -> Iterator[HostPool]:
    for name in [n for n in os.environ if n.startswith("REXEC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent/rexec-e2e-config")
    monkeypatch.setenv("REXEC_TOKEN", server.token)
    hosts = HostPool(connect_timeout=10.0)
    yield hosts
    hosts.close()


def test_rexec_host_runs_checks_and_says_where(pool: HostPool, server: Any) -> None:
    host = RexecHost(server.address, pool)
    result = host.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert host.check_output(["printf", "%s\n\n", "a b"]) == "a b"
    with pytest.raises(rexec.CommandFailed) as info:
        host.run("echo nope >&2; exit 4", check=True)
    assert str(info.value) == (
        f"{server.address}: exit status 4: echo nope >&2; exit 4\nstderr (last 1 lines):\n  nope"
    )
    assert isinstance(info.value, HostCommandFailed)
    assert (info.value.host, info.value.result.exit_code) == (server.address, 4)
    with pytest.raises(rexec.CommandTimeout, match=r": timed out after 0\.\d+s: sleep 5\n"):
        host.check_output("sleep 5", timeout=0.3)


def test_rexec_host_errors_keep_their_type_and_name_the_host(pool: HostPool, server: Any) -> None:
    host = RexecHost(server.address, pool)
    with pytest.raises(rexec.ExecError, match="command not found: nosuchcmd") as info:
        host.run(["nosuchcmd"])
    assert info.value.__notes__ == [f"rexec host: {server.address}"]
    frames = [entry.frame.code.name for entry in info.traceback]
    assert frames[-1] == "run"  # cut at RexecHost.run (hidden from pytest's report)
    assert info.traceback[-1].frame.code.path == Path(rexec.pytest_plugin.__file__)


def test_one_connection_per_host_and_reconnect_after_loss(
    server_factory: Any, pool: HostPool, monkeypatch: pytest.MonkeyPatch, e2e: Any
) -> None:
    srv = server_factory("[limits]\nidle_timeout = 0.5\n")
    monkeypatch.setenv("REXEC_TOKEN", srv.token)
    first = RexecHost(srv.address, pool)
    second = RexecHost(srv.address, pool)
    assert first.client is second.client
    assert first.check_output("echo one") == "one"
    assert e2e.wait_until(lambda: srv.log_events("idle timeout; closing connection"), 10.0)
    with pytest.raises(rexec.RexecError) as info:  # the server dropped the connection
        first.run(f"echo lost >> {srv.base / 'marker'}")
    assert info.value.__notes__[-1] == f"rexec host: {srv.address}"
    third = RexecHost(srv.address, pool)
    assert third.client is not first.client
    assert third.check_output("echo back") == "back"
    assert not (srv.base / "marker").exists()  # never run, never resent
    assert len(srv.log_events("authenticated")) == 2


def test_unreachable_host_is_tried_once(pool: HostPool) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(rexec.ConnectionLost) as first:
        pool.client(address)
    with pytest.raises(rexec.ConnectionLost) as again:
        pool.client(address)
    assert again.value is first.value  # the first error, without a second attempt
    with pytest.raises(pytest.fail.Exception, match=f"^{address}: cannot connect"):
        RexecHost(address, pool)


def test_start_streams_where_the_client_can(pool: HostPool, server: Any) -> None:
    host = RexecHost(server.address, pool)
    if getattr(host.client, "start", None) is None:
        with pytest.raises(NotImplementedError, match="no start"):
            host.start("echo hi")
    else:
        proc = host.start("echo hi")
        assert proc.wait().exit_code == 0
