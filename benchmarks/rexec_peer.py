"""rexec under test, driven only through its documented contract.

Server: `rexec token new --id bench --store STORE` prints the client token; `rexec serve
--listen 127.0.0.1:0 --tokens STORE --state-dir DIR --ready-file READY` writes its bound
address to READY; SIGTERM stops it. Clients: the CLI (`REXEC_TOKEN=... rexec run ADDR CMD`),
the async API (`rexec.connect`) and the sync API (`rexec.Client`).

Anything missing or broken (import error, no server within 10 s, a wrong result) makes the
rexec rows "unavailable: <reason>"; the peers and floors run regardless.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.model import Unavailable, log
from benchmarks.peers import CHUNK, ZEROS
from benchmarks.runtime import REXEC_BIN, Loop, tail, wait_file

START_TIMEOUT = 10.0

# Like the private sshd (MaxStartups/MaxSessions 1000, LogLevel ERROR): limits high enough
# for the concurrency measure, and no per-connection log lines. Tried first; if the server
# refuses it (the schema may change), it runs with its defaults and the JSON says so.
SERVER_CONFIG = """\
[server]
log_level = "warning"

[limits]
max_connections = 1024
max_unauthenticated = 1024
max_unauthenticated_per_source = 1024
unauthenticated_drop_start = 1024
max_channels = 1024
"""


def _first_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _token_line(data: bytes) -> str:
    for line in data.decode(errors="replace").splitlines():
        if line.strip().startswith("rexec1:"):
            return line.strip()
    return ""


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _exit_code(result: Any) -> Any:
    return getattr(result, "exit_code", None)


class Rexec:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.dir = procs.tempdir("rexec-bench-rexec-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.token = ""
        self.server_error: str | None = None
        self.api_error: str | None = None
        self.sync_error: str | None = None
        self.cli_error: str | None = None
        self.mod: Any = None
        self.version = ""
        self.note = ""

    # ---- server -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server and probe the CLI and both APIs; never raises."""
        try:
            self._start_server()
        except Exception as exc:
            self.server_error = _short(exc)
            self.api_error = self.sync_error = self.cli_error = self.server_error
            log(f"rexec unavailable: {self.server_error}")
            return
        self._probe()

    def _start_server(self) -> None:
        if not REXEC_BIN.exists():
            raise Unavailable(f"no rexec console script at {REXEC_BIN}")
        store = self.dir / "tokens"
        try:
            res = subprocess.run(
                [str(REXEC_BIN), "token", "new", "--id", "bench", "--store", str(store)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable("`rexec token new` timed out") from exc
        token = _token_line(res.stdout)
        if res.returncode != 0 or not token:
            err = _first_line(res.stderr) or _first_line(res.stdout)
            raise Unavailable(f"`rexec token new` exit {res.returncode}: {err}"[:160])
        self.token = token
        procs.on_cleanup("rexec server", self.stop)
        config = self.dir / "server.toml"
        config.write_text(SERVER_CONFIG)
        try:
            text = self._serve(store, ["--config", str(config)])
            self.note = "limits raised to 1024 (as sshd's MaxStartups/MaxSessions), log warning"
        except Unavailable as exc:
            log(f"rexec serve --config failed ({exc}); retrying with the default limits")
            self.stop()
            text = self._serve(store, [])
            self.note = "default server limits (--config was refused)"
        addrs = [a.strip() for a in text.splitlines() if a.strip().startswith("127.0.0.1:")]
        if not addrs:
            raise Unavailable(f"`rexec serve` ready file holds no 127.0.0.1 address: {text!r}")
        self.addr = addrs[0]

    def _serve(self, store: Path, extra: list[str]) -> str:
        ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        logf = (self.dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(REXEC_BIN),
                "serve",
                *extra,
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                str(store),
                "--state-dir",
                str(self.dir / "state"),
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
        logf.close()
        try:
            return wait_file(ready, self.proc, START_TIMEOUT, "`rexec serve`")
        except Unavailable as exc:
            raise Unavailable(f"{exc}: {tail(self.dir / 'server.log', 1)}") from exc

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_popen(self.proc)
            self.proc = None

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, REXEC_TOKEN=self.token)

    # ---- probes -------------------------------------------------------------------------
    def _probe(self) -> None:
        try:
            import rexec

            self.mod = rexec
            self.version = str(getattr(rexec, "__version__", "?"))
            if not hasattr(rexec, "connect"):
                raise Unavailable("rexec.connect is missing")
            self.loop.run(self.cold_api(), timeout=START_TIMEOUT)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self.api_error = _short(exc, "rexec.connect: ")
        try:
            if self.mod is None or not hasattr(self.mod, "Client"):
                raise Unavailable("rexec.Client is missing")
            with self.mod.Client(self.addr, token=self.token) as c:
                self._check(c.run(["true"]), b"")
        except Exception as exc:
            self.sync_error = _short(exc, "rexec.Client: ")
        try:
            self.cli_run("true", timeout=START_TIMEOUT)
        except Exception as exc:
            self.cli_error = _short(exc, "rexec run: ")
        for what, err in (("API", self.api_error), ("Client", self.sync_error)):
            if err:
                log(f"rexec {what} unavailable: {err}")
        if self.cli_error:
            log(f"rexec CLI unavailable: {self.cli_error}")

    @staticmethod
    def _check(result: Any, stdout: bytes | None) -> None:
        code = _exit_code(result)
        if code != 0:
            raise RuntimeError(f"exit code {code!r}")
        if stdout is not None and stdout and _as_bytes(result.stdout) != stdout:
            raise RuntimeError(f"stdout {_as_bytes(result.stdout)[:40]!r} != {stdout[:40]!r}")

    # ---- CLI ----------------------------------------------------------------------------
    def cli_run(
        self, command: str, timeout: float = 60.0, stdout: Any = subprocess.PIPE
    ) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(
            [str(REXEC_BIN), "run", self.addr, command],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"exit {res.returncode}: {_first_line(res.stderr)}"[:160])
        return res

    # ---- async API ----------------------------------------------------------------------
    def connect(self) -> Any:
        return self.mod.connect(self.addr, token=self.token)

    async def cold_api(self) -> None:
        async with self.connect() as conn:
            self._check(await conn.run(["true"]), b"")

    async def run(self, conn: Any, argv: list[str], expect: bytes | None = None) -> None:
        self._check(await conn.run(argv), expect)

    async def download(self, conn: Any, nbytes: int) -> None:
        proc = await conn.start(["head", "-c", str(nbytes), "/dev/zero"])
        got = 0
        async for chunk in proc.stdout:
            got += len(chunk)
        result = await proc.wait()
        if got != nbytes or _exit_code(result) != 0:
            raise RuntimeError(f"download: {got} of {nbytes} bytes, exit {_exit_code(result)}")

    async def upload(self, conn: Any, nbytes: int) -> None:
        proc = await conn.start(["wc", "-c"], stdin=True)
        for _ in range(nbytes // CHUNK):
            await proc.write(ZEROS)
        await proc.close_stdin()
        out = b""
        async for chunk in proc.stdout:
            out += _as_bytes(chunk)
        result = await proc.wait()
        out = out or _as_bytes(getattr(result, "stdout", b""))
        if _exit_code(result) != 0:
            raise RuntimeError(f"upload: exit {_exit_code(result)}")
        with contextlib.suppress(ValueError):
            if int(out) == nbytes:
                return
        raise RuntimeError(f"upload: remote counted {out[:40]!r}, sent {nbytes}")


def _short(exc: BaseException, prefix: str = "") -> str:
    if isinstance(exc, Unavailable):
        return prefix + str(exc)
    if isinstance(exc, TimeoutError):
        return f"{prefix}timed out after {START_TIMEOUT:.0f}s"
    lines = str(exc).strip().splitlines()
    return f"{prefix}{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")[:160]
