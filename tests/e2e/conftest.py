"""End-to-end fixtures: a real `rexec serve` subprocess and the real `rexec` CLI.

Everything here is bounded: servers must publish their ready file within a deadline and
stop within one after SIGTERM; CLI runs carry a timeout (subprocess kills the client and
the test fails with TimeoutExpired rather than hanging).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rexec import Client, Token
from rexec.protocol.token import parse_token

PYTHON = sys.executable
REXEC = str(Path(sys.executable).parent / "rexec")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 30.0


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll pred until truthy (returned) or timeout (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment minus any REXEC_* and client config the developer has set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXEC_")}
    env["XDG_CONFIG_HOME"] = "/nonexistent/rexec-e2e-config"
    if extra:
        env.update(extra)
    return env


def cmdline_pids(marker: str) -> list[int]:
    """Live processes whose command line contains marker (zombies have an empty cmdline)."""
    me = os.getpid()
    found: list[int] = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in cmd.replace(b"\0", b" "):
            found.append(int(entry))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in (b"Z", b"X"):
            out.append(int(entry))
    return out


def run_cli(
    args: Sequence[str],
    *,
    token: str | None = None,
    input: bytes | None = None,
    stdin: Any = None,
    stdout: Any = subprocess.PIPE,
    timeout: float = CLI_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `rexec ARGS...` with REXEC_TOKEN=token; stdin is /dev/null unless given."""
    extra = dict(env or {})
    if token is not None:
        extra["REXEC_TOKEN"] = token
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    return subprocess.run(
        [REXEC, *args],
        input=input,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=clean_env(extra),
        timeout=timeout,
        check=False,
    )


def new_token(store: Path, name: str) -> str:
    """`rexec token new`: returns the client token line."""
    proc = subprocess.run(
        [REXEC, "token", "new", "--id", name, "--store", str(store)],
        capture_output=True,
        env=clean_env(),
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.decode().strip()
    assert line.startswith("rexec1:"), line
    return line


@dataclass
class ServerProc:
    """A running `rexec serve`: its addresses, token, state and logs."""

    proc: subprocess.Popen[bytes]
    base: Path
    state_dir: Path
    store: Path
    token: str
    addresses: list[str]
    log_path: Path
    unix_path: Path | None = None
    stopped_rc: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """The first TCP (or only) address, e.g. 127.0.0.1:40123."""
        return next((a for a in self.addresses if not a.startswith("unix:")), self.addresses[0])

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    @property
    def token_obj(self) -> Token:
        return parse_token(self.token)

    def audit_lines(self) -> list[bytes]:
        try:
            return self.audit_path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_lines()]

    def wait_audit(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The audit records once there are at least count (records land after EXIT)."""
        wait_until(lambda: len(self.audit_lines()) >= count, timeout)
        return self.audit_records()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == event]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def connect(self, address: str | None = None, token: str | None = None) -> Client:
        """A sync Client, connected and authenticated."""
        return Client(address or self.address, token=token or self.token, connect_timeout=10.0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait (bounded); SIGKILL and fail if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"server did not stop within {timeout}s of SIGTERM") from None
        self.stopped_rc = self.proc.returncode
        return self.proc.returncode


def start_server(
    base: Path,
    *,
    config: str | None = None,
    listen: Sequence[str] = ("127.0.0.1:0",),
    unix: Sequence[str] = (),
    token_name: str = "t",
    wrapper: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProc:
    """Create a token store with one token and start `rexec serve` on it (JSON logs).

    wrapper: a command prefix that execs the server (e.g. `nohup`); env: extra variables.
    """
    base.mkdir(parents=True, exist_ok=True)
    state = base / "state"
    store = base / "tokens.json"
    token = new_token(store, token_name)
    ready = base / "ready"
    log_path = base / "server.log"
    args = [
        *wrapper,
        REXEC,
        "serve",
        "--tokens",
        str(store),
        "--state-dir",
        str(state),
        "--ready-file",
        str(ready),
        "--log-format",
        "json",
    ]
    for addr in listen:
        args += ["--listen", addr]
    for path in unix:
        args += ["--unix", path]
    if config is not None:
        cfg = base / "server.toml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=clean_env(env)
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not (ready.exists() and ready.read_text().endswith("\n")):
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}: {log_path.read_text(errors='replace')}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"server not ready within {START_TIMEOUT}s")
        time.sleep(0.02)
    addresses = ready.read_text().split()
    return ServerProc(
        proc=proc,
        base=base,
        state_dir=state,
        store=store,
        token=token,
        addresses=addresses,
        log_path=log_path,
        unix_path=Path(unix[0]) if unix else None,
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One shared server (default limits) on 127.0.0.1:0 and a unix socket.

    Tests that make authentication fail must use `server_factory`: failures count towards
    the per-source rate limit, which would lock every later test out of this server.
    """
    base = tmp_path_factory.mktemp("srv")
    srv = start_server(base, unix=[str(base / "rexec.sock")])
    yield srv
    srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """Start servers with their own config; every one is stopped at teardown."""
    started: list[ServerProc] = []
    count = 0

    def make(config: str | None = None, **kwargs: Any) -> ServerProc:
        nonlocal count
        count += 1
        srv = start_server(tmp_path / f"srv{count}", config=config, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        with contextlib.suppress(AssertionError):
            srv.stop()


_markers = itertools.count(1)


def marker(base: str) -> str:
    """base + digits unique to this test process: concurrent test runs on the machine must
    never see (or kill) each other's processes. Numeric bases stay valid sleep durations."""
    return f"{base}{os.getpid()}{next(_markers):03d}"


class E2E:
    """The helpers above, for test modules (importlib mode: tests cannot import conftest)."""

    REXEC = REXEC
    PYTHON = PYTHON
    run_cli = staticmethod(run_cli)
    start_server = staticmethod(start_server)
    new_token = staticmethod(new_token)
    clean_env = staticmethod(clean_env)
    wait_until = staticmethod(wait_until)
    cmdline_pids = staticmethod(cmdline_pids)
    group_members = staticmethod(group_members)
    marker = staticmethod(marker)


@pytest.fixture(scope="session")
def e2e() -> E2E:
    return E2E()
