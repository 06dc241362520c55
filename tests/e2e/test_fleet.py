"""`rexec run HOSTS` on a simulated fleet: real servers listening on many loopback addresses.

The fleet: lab01..lab08 are eight addresses (127.0.1.1-8, one port) of one server; lab09 is a
server whose commands see ROLE=fail, lab10 one with ROLE=slow, lab11 a server with another
token (authentication fails), lab12 an address nobody listens on. Client-config aliases
name them; [groups.NAME] give lab09 and lab10 their servers' tokens, the defaults the rest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROLE_CMD = (
    'case "$ROLE" in fail) echo bad; echo oops >&2; exit 2;; slow) sleep 30;; esac; echo hello'
)
SERVER_CONFIG = """
[limits]
max_connections = 4096
max_unauthenticated = 2048
max_unauthenticated_per_source = 2048  # every host is 127.0.0.1 to the server, and this
unauthenticated_drop_start = 2048  # measures speed, not admission control
auth_failures = 10000
[exec]
base_env = {{ PATH = "/usr/local/bin:/usr/bin:/bin", ROLE = "{role}" }}
"""
ALL = "lab[01-12]"
TIMEOUT = "2"  # lab10's deadline: the ok hosts finish long before


@dataclass
class Fleet:
    port: int
    config: Path
    token: str  # lab01..lab08's
    base: Path

    def env(self) -> dict[str, str]:
        return {"REXEC_CONFIG": str(self.config)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.1.1", 0))
        return int(s.getsockname()[1])


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # servers inherit it


def _start_fleet_servers(e2e: Any, base: Path, port: int) -> list[Any]:
    started: list[Any] = []
    try:
        layout = [
            ("ok", [f"127.0.1.{i}:{port}" for i in range(1, 9)]),
            ("fail", [f"127.0.2.1:{port}"]),
            ("slow", [f"127.0.2.2:{port}"]),
            ("other", [f"127.0.2.3:{port}"]),
        ]
        for role, listen in layout:
            config = SERVER_CONFIG.format(role=role)
            started.append(e2e.start_server(base / role, config=config, listen=listen))
    except BaseException:
        for srv in started:
            with contextlib.suppress(AssertionError):
                srv.stop()
        raise
    return started


@pytest.fixture(scope="module")
def fleet(e2e: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _raise_nofile()
    base = tmp_path_factory.mktemp("fleet")
    for attempt in range(3):  # the port is picked, then bound by the servers: retry a race
        port = _free_port()
        try:
            servers = _start_fleet_servers(e2e, base / f"try{attempt}", port)
            break
        except AssertionError:
            if attempt == 2:
                raise
    ok, fail, slow, _other = servers
    aliases = "".join(
        f'[hosts.lab{i:02d}]\naddress = "{addr}"\n'
        for i, addr in enumerate(
            [
                *(f"127.0.1.{n}:{port}" for n in range(1, 9)),
                *(f"127.0.2.{n}:{port}" for n in range(1, 5)),
            ],
            1,
        )
    )
    fail_token = _write_secret(base / "fail.token", fail.token)
    slow_token = _write_secret(base / "slow.token", slow.token)
    config = base / "client.toml"
    config.write_text(
        f'[defaults]\ntoken_file = "{_write_secret(base / "ok.token", ok.token)}"\n'
        f"{aliases}"
        '[groups]\nlab = "lab[01-12]"\ngood = ["lab[01-04]", "lab[05-08]"]\n'
        f'[groups.failing]\nhosts = "lab09"\ntoken_file = "{fail_token}"\n'
        f'[groups.slow]\nhosts = ["lab10"]\ntoken_file = "{slow_token}"\n'
    )
    yield Fleet(port, config, ok.token, base)
    for srv in servers:
        with contextlib.suppress(AssertionError):
            srv.stop()


def run(
    e2e: Any, fleet: Fleet, args: list[str], **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    return e2e.run_cli(["run", *args], env=fleet.env(), **kwargs)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def split_stderr(err: bytes) -> tuple[list[bytes], bytes]:
    """(the lines before the summary, the summary line): the summary is always last."""
    out = lines(err)
    assert out and out[-1].endswith(b"\n"), err
    return out[:-1], out[-1]


# ---- output modes --------------------------------------------------------------------------


def test_live_output_is_prefixed_line_by_line(e2e: Any, fleet: Fleet) -> None:
    hosts = f"127.0.1.[1-3]:{fleet.port}"
    cmd = "printf 'one\\ntwo\\n'; printf 'warn\\n' >&2; printf 'no newline'"
    proc = e2e.run_cli(["run", hosts, cmd], token=fleet.token)
    assert proc.returncode == 0, proc.stderr
    names = [f"127.0.1.{i}:{fleet.port}".encode() for i in (1, 2, 3)]
    got = lines(proc.stdout)
    assert sorted(got) == sorted(
        n + b": " + text for n in names for text in (b"one\n", b"two\n", b"no newline\n")
    )
    for name in names:  # each host's lines in its own order, never cut inside a line
        assert [line for line in got if line.startswith(name + b": ")] == [
            name + b": one\n",
            name + b": two\n",
            name + b": no newline\n",
        ]
    before, summary = split_stderr(proc.stderr)
    assert sorted(before) == sorted(n + b": warn\n" for n in names)
    assert summary == b"3 hosts: 3 ok\n"


def test_gather_folds_hosts_with_the_same_output(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["-b", "@lab", "--timeout", TIMEOUT, ROLE_CMD])
    assert proc.returncode == 255, proc.stderr
    assert proc.stdout == (
        b"---------------- lab[01-08] (8) exit 0\nhello\n"
        b"---------------- lab09 (1) exit 2\nbad\n"
        b"---------------- lab10 (1) timeout\n"
        b"---------------- lab11 (1) auth_failed\n"
        b"---------------- lab12 (1) unreachable\n"
    )
    before, summary = split_stderr(proc.stderr)
    assert summary == (
        b"12 hosts: 8 ok, 1 exit 2 (lab09), 1 timeout (lab10), 1 unreachable (lab12), "
        b"1 auth_failed (lab11)\n"
    )
    assert before[-2:] == [b"---------------- lab09 (1) exit 2\n", b"oops\n"]  # its stderr
    errors = sorted(before[:-2])
    assert len(errors) == 3
    assert errors[0] == b"lab10: rexec: command timed out after 2.0s (killed by the server)\n"
    assert errors[1].startswith(b"lab11: rexec: authentication failed")
    assert errors[2].startswith(
        f"lab12: rexec: cannot connect to 127.0.2.4:{fleet.port}: ".encode()
    )


def test_json_lines_one_object_per_host_as_it_finishes(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["--json", "@lab", "--timeout", TIMEOUT, ROLE_CMD])
    assert proc.returncode == 255, proc.stderr
    objects = [json.loads(line) for line in lines(proc.stdout)]
    assert len(objects) == 12
    assert objects[-1]["host"] == "lab10"  # the timeout finishes last
    by_host = {o["host"]: o for o in objects}
    assert sorted(by_host) == [f"lab{i:02d}" for i in range(1, 13)]
    for o in objects:
        assert list(o) == [
            "host",
            "status",
            "command",
            "exit_code",
            "signal",
            "timed_out",
            "duration",
            "stdout",
            "stdout_encoding",
            "stderr",
            "stderr_encoding",
            "exit_status",
            "error",
        ]
        assert isinstance(o["duration"], float) and o["duration"] >= 0
        assert o["command"] == ROLE_CMD
    common = {"signal": None, "stdout_encoding": "utf-8", "stderr_encoding": "utf-8"}
    out = {k: v for k, v in by_host["lab03"].items() if k not in ("duration", "command")}
    assert out == {**common, "host": "lab03", "status": "ok", "exit_code": 0, "timed_out": False,
                   "stdout": "hello\n", "stderr": "", "exit_status": 0, "error": None}  # fmt: skip
    out = {k: v for k, v in by_host["lab09"].items() if k not in ("duration", "command")}
    assert out == {**common, "host": "lab09", "status": "exit", "exit_code": 2,
                   "timed_out": False, "stdout": "bad\n", "stderr": "oops\n", "exit_status": 2,
                   "error": None}  # fmt: skip
    slow = by_host["lab10"]
    assert (slow["status"], slow["exit_code"], slow["timed_out"]) == ("timeout", None, True)
    assert slow["error"] == {
        "kind": "timeout",
        "message": "command timed out after 2.0s (killed by the server)",
    }
    assert slow["exit_status"] == 124
    lab11, lab12 = by_host["lab11"], by_host["lab12"]
    assert (lab11["status"], lab11["exit_code"], lab11["exit_status"]) == ("auth_failed", None, 255)
    assert lab11["error"]["kind"] == "auth"
    assert lab11["error"]["message"].startswith("authentication failed")
    assert (lab12["status"], lab12["exit_status"], lab12["error"]["kind"]) == (
        "unreachable",
        255,
        "connect",
    )
    assert lab12["error"]["message"].startswith(f"cannot connect to 127.0.2.4:{fleet.port}")
    _, summary = split_stderr(proc.stderr)
    assert summary.startswith(b"12 hosts: 8 ok, ")


def test_json_non_utf8_output_is_base64(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["--json", "lab[01-02]", "printf '\\377\\000ok'"])
    assert proc.returncode == 0, proc.stderr
    for line in lines(proc.stdout):
        o = json.loads(line)
        assert (o["stdout"], o["stdout_encoding"]) == (
            base64.b64encode(b"\xff\x00ok").decode(),
            "base64",
        )
        assert base64.b64decode(o["stdout"]) == b"\xff\x00ok"


def test_outdir_writes_out_err_and_status_per_host(e2e: Any, fleet: Fleet, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    proc = run(e2e, fleet, ["--outdir", str(outdir), "lab[07-09],lab12", ROLE_CMD])
    assert proc.returncode == 255, proc.stderr
    assert proc.stdout == b""
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        f"lab{n}.{ext}" for n in ("07", "08", "09", "12") for ext in ("out", "err", "status")
    )
    assert (outdir / "lab07.out").read_bytes() == b"hello\n"
    assert (outdir / "lab07.err").read_bytes() == b""
    assert (outdir / "lab07.status").read_bytes() == b"exit 0\n"
    assert (outdir / "lab09.out").read_bytes() == b"bad\n"
    assert (outdir / "lab09.err").read_bytes() == b"oops\n"
    assert (outdir / "lab09.status").read_bytes() == b"exit 2\n"
    assert (outdir / "lab12.out").read_bytes() == b""
    status = (outdir / "lab12.status").read_text()
    assert status.startswith(f"unreachable: cannot connect to 127.0.2.4:{fleet.port}: ")
    _, summary = split_stderr(proc.stderr)
    assert summary == b"4 hosts: 2 ok, 1 exit 2 (lab09), 1 unreachable (lab12)\n"


# ---- --max-output: kept output is bounded, live output is not ------------------------------

CHATTY = "yes | head -c 5000; echo err >&2"  # 5000 bytes of "y\n", then 4 on stderr
KEPT = b"y\n" * 500  # the first 1000


def test_max_output_json_keeps_the_head_and_counts_the_rest(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["--json", "--max-output", "1000", "lab[01-02]", CHATTY + "; exit 3"])
    assert proc.returncode == 3, proc.stderr  # the command's status: dropping is no failure
    objects = sorted((json.loads(line) for line in lines(proc.stdout)), key=lambda o: o["host"])
    assert [o["host"] for o in objects] == ["lab01", "lab02"]
    for o in objects:
        assert o["stdout"] == KEPT.decode()
        assert o["stderr"] == "err\n"
        assert (o["stdout_dropped"], "stderr_dropped" in o) == (4000, False)
        assert (o["exit_status"], o["error"]) == (3, None)
        assert list(o)[-3:] == ["exit_status", "error", "stdout_dropped"]
    before, _ = split_stderr(proc.stderr)
    assert before == []  # --json says it in the objects
    proc = run(e2e, fleet, ["--json", "--max-output", "1000", "lab[01-02]", "echo hi"])
    assert all("stdout_dropped" not in json.loads(line) for line in lines(proc.stdout))


def test_max_output_gather_notes_what_was_dropped(e2e: Any, fleet: Fleet) -> None:
    cmd = "yes | head -c 5000; yes e | head -c 3000 >&2"
    proc = run(e2e, fleet, ["-b", "--max-output=1000", "lab[01-02]", cmd])
    assert proc.returncode == 0, proc.stderr
    header = b"---------------- lab[01-02] (2) exit 0\n"
    assert proc.stdout == header + KEPT
    before, summary = split_stderr(proc.stderr)
    assert before == [
        header,
        *lines(b"e\n" * 500),
        b"lab01: rexec: output past 1000 bytes dropped "
        b"(4000 bytes of stdout, 2000 bytes of stderr)\n",
        b"lab02: rexec: output past 1000 bytes dropped "
        b"(4000 bytes of stdout, 2000 bytes of stderr)\n",
    ]
    assert summary == b"2 hosts: 2 ok\n"


def test_max_output_outdir_files_get_the_kept_bytes(e2e: Any, fleet: Fleet, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    proc = run(e2e, fleet, ["--outdir", str(outdir), "--max-output", "1K", "lab01,lab09", CHATTY])
    assert proc.returncode == 0, proc.stderr
    assert (outdir / "lab01.out").read_bytes() == b"y\n" * 512
    assert (outdir / "lab01.err").read_bytes() == b"err\n"
    assert (outdir / "lab01.status").read_bytes() == b"exit 0\n"
    before, _ = split_stderr(proc.stderr)
    assert sorted(before) == [
        b"lab01: rexec: output past 1 KiB dropped (3976 bytes of stdout)\n",
        b"lab09: rexec: output past 1 KiB dropped (3976 bytes of stdout)\n",
    ]


def test_max_output_far_past_the_cap_does_not_stall(e2e: Any, fleet: Fleet) -> None:
    """20 MB against a 1000-byte cap: the dropped output is still read (the server's window
    keeps opening), so the command runs to its end."""
    proc = run(
        e2e, fleet, ["-b", "--max-output", "1000", "lab[01-02]", "head -c 20000000 /dev/zero"]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"---------------- lab[01-02] (2) exit 0\n" + b"\0" * 1000 + b"\n"
    before, _ = split_stderr(proc.stderr)
    assert before == [
        f"lab0{i}: rexec: output past 1000 bytes dropped (19999000 bytes of stdout)\n".encode()
        for i in (1, 2)
    ]


def test_json_lines_use_the_single_host_error_kinds(e2e: Any, fleet: Fleet) -> None:
    """A command that cannot start (an argv), and an unreachable host: as `rexec run` on one."""
    proc = run(e2e, fleet, ["--json", "lab01,lab12", "no-such-cmd-e2e", "x"])
    assert proc.returncode == 255, proc.stderr
    by_host = {o["host"]: o for o in map(json.loads, lines(proc.stdout))}
    lab01, lab12 = by_host["lab01"], by_host["lab12"]
    assert (lab01["status"], lab01["exit_code"], lab01["exit_status"]) == ("exit", 127, 127)
    assert lab01["error"] == {"kind": "exec", "message": "command not found: no-such-cmd-e2e"}
    assert (lab12["status"], lab12["exit_status"], lab12["error"]["kind"]) == (
        "unreachable",
        255,
        "connect",
    )


def test_junit_one_testcase_per_host(e2e: Any, fleet: Fleet, tmp_path: Path) -> None:
    report = tmp_path / "fleet.xml"
    proc = run(e2e, fleet, ["--junit", str(report), "--timeout", TIMEOUT, "lab[07-12]", ROLE_CMD])
    assert proc.returncode == 255, proc.stderr
    assert sorted(lines(proc.stdout))[:3] == [b"lab07: hello\n", b"lab08: hello\n", b"lab09: bad\n"]
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("6", "4")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert list(cases) == [f"lab{n}" for n in ("07", "08", "09", "10", "11", "12")]
    assert {case.get("classname") for case in cases.values()} == {"rexec"}
    failures = {name: case.find("failure") for name, case in cases.items()}
    assert failures["lab07"] is None and failures["lab08"] is None
    assert cases["lab07"].findtext("system-out") == "hello\n"
    assert cases["lab07"].find("system-err") is None
    kinds = {name: f.get("type") for name, f in failures.items() if f is not None}
    assert kinds == {"lab09": "exit", "lab10": "timeout", "lab11": "auth", "lab12": "connect"}
    lab09 = failures["lab09"]
    assert lab09 is not None
    assert lab09.get("message", "").startswith("command failed with exit status 2 on lab09: ")
    assert lab09.get("message", "").endswith("\n  stderr: oops")
    assert cases["lab09"].findtext("system-err") == "oops\n"
    lab10 = failures["lab10"]
    assert lab10 is not None and lab10.get("message", "").startswith(
        "command timed out after 2.0s on lab10: "
    )
    lab12 = failures["lab12"]
    assert lab12 is not None and lab12.get("message", "").startswith(
        f"exit status 255, connect: cannot connect to 127.0.2.4:{fleet.port}: "
    )
    for case in cases.values():
        assert 0 <= float(case.get("time") or -1) < 20


# ---- exit status -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "command", "code", "summary"),
    [
        ("@good", "true", 0, "8 hosts: 8 ok"),
        ("@good,lab09", ROLE_CMD, 2, "9 hosts: 8 ok, 1 exit 2 (lab09)"),
        ("lab[01-02]", "exit 3", 3, "2 hosts: 2 exit 3 (lab[01-02])"),
        ("lab[01-02]", "kill -9 $$", 137, "2 hosts: 2 signal 9 (lab[01-02])"),
        (
            "lab[01-02],lab09",
            '[ "$ROLE" = ok ] && exit 4; kill -15 $$',
            143,
            "3 hosts: 2 exit 4 (lab[01-02]), 1 signal 15 (lab09)",
        ),
        ("lab01,lab10", ROLE_CMD, 124, "2 hosts: 1 ok, 1 timeout (lab10)"),
        ("lab01,lab11", "true", 255, "2 hosts: 1 ok, 1 auth_failed (lab11)"),
        ("lab01,lab12", "true", 255, "2 hosts: 1 ok, 1 unreachable (lab12)"),
        ("lab[01-02],lab09", "no-such-cmd-e2e", 127, "3 hosts: 3 exit 127 (lab[01-02,09])"),
    ],
)
def test_exit_status_is_the_highest_per_host_status(
    e2e: Any, fleet: Fleet, hosts: str, command: str, code: int, summary: str
) -> None:
    proc = run(e2e, fleet, ["--json", "--timeout", TIMEOUT, hosts, command])
    assert proc.returncode == code, proc.stderr
    assert split_stderr(proc.stderr)[1] == summary.encode() + b"\n"


def test_failed_to_then_hosts_from(e2e: Any, fleet: Fleet, tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    proc = run(
        e2e, fleet, ["--failed-to", str(failed), "-b", "--timeout", TIMEOUT, "@lab", ROLE_CMD]
    )
    assert proc.returncode == 255
    assert failed.read_text() == "lab[09-12]\n"
    again = run(
        e2e, fleet, ["--hosts-from", str(failed), "-b", "--failed-to", str(failed), "echo", "again"]
    )
    assert again.returncode == 255, again.stderr
    assert again.stdout == (
        b"---------------- lab[09-10] (2) exit 0\nagain\n"
        b"---------------- lab11 (1) auth_failed\n"
        b"---------------- lab12 (1) unreachable\n"
    )
    assert split_stderr(again.stderr)[1] == (
        b"4 hosts: 2 ok, 1 unreachable (lab12), 1 auth_failed (lab11)\n"
    )
    assert failed.read_text() == "lab[11-12]\n"
    ok = run(e2e, fleet, ["--hosts-from", str(failed), "-x", "lab[11-12]", "true"])
    assert ok.returncode == 2
    assert ok.stderr == b"rexec: no hosts: the set is empty once -x is applied\n"


def test_set_operators_without_brackets_name_a_host_set(e2e: Any, fleet: Fleet) -> None:
    """`a^b`, `a!b` and `a&b` are host-set algebra as in `lab[1-3]!lab2`, not one address."""
    xor = run(e2e, fleet, ["-b", "lab01^lab02", "echo hi"])
    assert (xor.returncode, xor.stdout) == (0, b"---------------- lab[01-02] (2) exit 0\nhi\n")
    minus = run(e2e, fleet, ["lab01,lab02!lab02", "echo", "hi"])
    assert (minus.returncode, minus.stdout, minus.stderr) == (0, b"hi\n", b"")
    both = run(e2e, fleet, ["lab01&lab02", "true"])
    assert both.returncode == 2
    assert both.stderr == b"rexec: no hosts: the host set 'lab01&lab02' is empty\n"
    none = run(e2e, fleet, ["--json", "lab01!lab01", "true"])
    assert none.returncode == 2
    assert json.loads(none.stdout)["error"] == {
        "kind": "usage",
        "message": "no hosts: the host set 'lab01!lab01' is empty",
    }


def test_a_unix_target_in_a_set_ends_at_the_comma(e2e: Any, fleet: Fleet, tmp_path: Path) -> None:
    """`unix:/path,host` is two hosts, as hosts.py reads it: a comma outside brackets always
    separates hosts (a socket path holding one needs an alias)."""
    sock = tmp_path / "none.sock"
    proc = run(e2e, fleet, [f"unix:{sock},lab01", "echo hi"])
    assert proc.returncode == 255, proc.stderr
    assert proc.stdout == b"lab01: hi\n"
    assert (
        proc.stderr
        == (
            f"unix:{sock}: rexec: cannot connect to unix:{sock}: No such file or directory\n"
            f"2 hosts: 1 ok, 1 unreachable (unix:{sock})\n"
        ).encode()
    )


def test_exclude_and_groups(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["-b", "@lab", "-x", "lab[09-12]", "-x", "@good!lab[01-06]", "echo hi"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"---------------- lab[01-06] (6) exit 0\nhi\n"
    assert proc.stderr == b"6 hosts: 6 ok\n"


def test_one_host_of_a_set_runs_as_a_single_host(e2e: Any, fleet: Fleet) -> None:
    """lab[03] names one host: today's single-host path (no prefix, no summary)."""
    proc = run(e2e, fleet, ["lab[03]", "echo hello; exit 3"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"hello\n", b"")
    proc = run(e2e, fleet, ["lab12", "true"])  # and its one-line error, exit 255
    assert proc.returncode == 255
    assert proc.stderr.startswith(b"rexec: ") and proc.stderr.count(b"\n") == 1
    proc = run(e2e, fleet, ["-b", "lab03", "echo hello"])  # a fleet option: the fleet path
    assert proc.stdout == b"---------------- lab03 (1) exit 0\nhello\n"
    assert proc.stderr == b"1 host: 1 ok\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lab[3-1]", "true"], b"rexec: invalid host set 'lab[3-1]': reversed range '3-1'\n"),
        (
            ["@nope", "true"],
            b"rexec: unknown group @nope in CONFIG (groups: failing, good, lab, slow)\n",
        ),
        (
            ["lab[1-200000]", "true"],
            b"rexec: host set 'lab[1-200000]' has more than 100000 hosts\n",
        ),
        (
            ["--json", "-b", "lab[1-2]", "true"],
            b"rexec: --json and -b/--gather do not go together\n",
        ),
        (["--fanout", "0", "lab[1-2]", "true"], b"rexec: --fanout must be at least 1, got 0\n"),
        (
            ["--timeout", "0", "lab[1-2]", "true"],
            b"rexec: --timeout must be a positive number of seconds, got 0\n",
        ),
        (["lab[1-2]"], b"rexec: no command given\n"),
        (
            ["--hosts-from", "/no/such/file", "true"],
            b"rexec: --hosts-from /no/such/file: No such file or directory\n",
        ),
        (["-e", "X", "lab[1-2]", "true"], b"rexec: -e expects K=V, got 'X'\n"),
        (  # a bad address in a set: one usage error before connecting, not one per host
            ["127.0.0.[1-2]:", "true"],
            b"rexec: host set '127.0.0.[1-2]:': invalid address '127.0.0.1:': port '' is not "
            b"a number (and no host alias '127.0.0.1:' in CONFIG)\n",
        ),
        (
            ["--json", "lab01,h[1-2]:notaport", "true"],
            b"rexec: host set 'lab01,h[1-2]:notaport': invalid address 'h1:notaport': port "
            b"'notaport' is not a number (and no host alias 'h1:notaport' in CONFIG)\n",
        ),
    ],
)
def test_usage_errors(e2e: Any, fleet: Fleet, args: list[str], message: bytes) -> None:
    proc = run(e2e, fleet, args)
    assert proc.returncode == 2
    message = message.replace(b"CONFIG", str(fleet.config).encode())
    assert proc.stderr == message
    if "--json" not in args:
        assert proc.stdout == b""
        return
    doc = json.loads(proc.stdout)  # --json: the error as one object too
    assert (doc["target"], doc["exit_status"]) == (args[-2], 2)
    assert doc["error"] == {"kind": "usage", "message": message[7:-1].decode()}


# ---- stdin ---------------------------------------------------------------------------------------


def test_stdin_goes_to_every_host(e2e: Any, fleet: Fleet) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = hashlib.md5(data).hexdigest()  # a checksum, not security
    proc = run(e2e, fleet, ["-b", "@good", "md5sum"], input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"---------------- lab[01-08] (8) exit 0\n{digest}  -\n".encode()
    proc = run(e2e, fleet, ["-n", "-b", "@good", "wc -c"], input=data)  # -n: none at all
    assert proc.stdout == b"---------------- lab[01-08] (8) exit 0\n0\n"


def test_stdin_left_open_does_not_hold_back_the_run(e2e: Any, fleet: Fleet) -> None:
    """stdin is a pipe nobody writes to or closes (a CI runner's, a parent's): commands that do
    not read it run and the run ends, as `ssh HOST CMD` and one-host `rexec run` do."""
    read_end, write_end = os.pipe()
    try:
        cli = subprocess.Popen(
            [e2e.REXEC, "run", "lab[01-02]", "echo", "hi"],
            stdin=read_end,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=e2e.clean_env(fleet.env()),
        )
        try:
            out, err = cli.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.communicate()
            raise
    finally:
        os.close(read_end)
        os.close(write_end)
    assert cli.returncode == 0, err
    assert sorted(lines(out)) == [b"lab01: hi\n", b"lab02: hi\n"]
    assert err == b"2 hosts: 2 ok\n"


def test_stdin_over_the_bound_is_refused(e2e: Any, fleet: Fleet) -> None:
    proc = run(e2e, fleet, ["@good", "cat"], input=b"x" * (64 * 1024 * 1024 + 1))
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr == (
        b"rexec: stdin is larger than 64 MiB: every host gets the same stdin, read into memory "
        b"once (copy the file to the hosts, or use -n)\n"
    )


# ---- Ctrl-C --------------------------------------------------------------------------------------


def _start(e2e: Any, fleet: Fleet, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [e2e.REXEC, "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env(fleet.env()),
    )


def _sleepers(marker: str) -> list[int]:
    """The remote `sleep MARKER` processes themselves (not the CLI, whose argv holds it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv[:2] == [b"sleep", marker.encode()]:
                found.append(int(entry))
    return found


def _interrupt(
    cli: subprocess.Popen[bytes], times: int, pause: float = 0.5, signum: int = signal.SIGINT
) -> tuple[bytes, bytes]:
    try:
        for i in range(times):
            if i:
                with pytest.raises(subprocess.TimeoutExpired):
                    cli.wait(pause)  # still running: the first Ctrl-C was ignored remotely
            cli.send_signal(signum)
        return cli.communicate(timeout=15)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)


def test_ctrl_c_interrupts_every_running_host(e2e: Any, fleet: Fleet) -> None:
    marker = e2e.marker("1000.")
    cli = _start(e2e, fleet, ["@good", f"echo started; sleep {marker}; echo after"])
    assert e2e.wait_until(lambda: len(_sleepers(marker)) == 8, 15), "the 8 sleeps never ran"
    time.sleep(0.1)
    out, err = _interrupt(cli, 1)
    assert cli.returncode == 130, err
    assert sorted(lines(out)) == [f"lab{i:02d}: started\n".encode() for i in range(1, 9)]
    assert err == (
        b"rexec: SIGINT sent; 8 host(s) still running: lab[01-08] (Ctrl-C again: SIGKILL)\n"
        b"8 hosts: 8 signal 2 (lab[01-08])\n"
    )
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote sleep survived"


def test_second_ctrl_c_kills_hosts_that_ignore_sigint(e2e: Any, fleet: Fleet) -> None:
    marker = e2e.marker("1000.")
    cli = _start(e2e, fleet, ["@good", f"trap '' INT; sleep {marker}"])
    assert e2e.wait_until(lambda: len(_sleepers(marker)) == 8, 15), "the 8 sleeps never ran"
    time.sleep(0.1)
    out, err = _interrupt(cli, 2)
    assert cli.returncode == 137, err
    assert out == b""
    assert err == (
        b"rexec: SIGINT sent; 8 host(s) still running: lab[01-08] (Ctrl-C again: SIGKILL)\n"
        b"rexec: SIGKILL sent; 8 host(s) still running: lab[01-08] "
        b"(Ctrl-C again: closes every connection)\n"
        b"8 hosts: 8 signal 9 (lab[01-08])\n"
    )
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote sleep survived"


def test_ctrl_c_starts_no_more_hosts(e2e: Any, fleet: Fleet) -> None:
    marker = e2e.marker("1000.")
    cli = _start(e2e, fleet, ["--fanout", "2", "--json", "@good", f"sleep {marker}"])
    assert e2e.wait_until(lambda: len(_sleepers(marker)) == 2, 15), "the 2 sleeps never ran"
    time.sleep(0.1)
    out, err = _interrupt(cli, 1)
    assert cli.returncode == 255, err
    by_host = {o["host"]: o for o in map(json.loads, lines(out))}
    assert [by_host[h]["status"] for h in sorted(by_host)] == ["signal"] * 2 + ["error"] * 6
    assert by_host["lab08"]["error"] == {
        "kind": "interrupted",
        "message": "not started: the run was stopped first",
    }
    assert err.endswith(b"8 hosts: 2 signal 2 (lab[01-02]), 6 interrupted (lab[03-08])\n")


def test_ctrl_c_abandons_hosts_still_connecting(e2e: Any, fleet: Fleet) -> None:
    """A host whose server never answers the handshake is not waited for after Ctrl-C: it
    ends at once as not started, rather than after its whole connect timeout."""
    marker = e2e.marker("1000.")
    with socket.socket() as silent:  # accepts (the kernel's backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        args = ["--connect-timeout", "60", f"lab01,{mute}", f"sleep {marker}"]
        cli = _start(e2e, fleet, args)
        assert e2e.wait_until(lambda: len(_sleepers(marker)) == 1, 15), "the sleep never ran"
        time.sleep(0.2)
        out, err = _interrupt(cli, 1)
    assert cli.returncode == 255, err
    assert out == b""
    assert err == (
        b"rexec: SIGINT sent; 1 host(s) still running: lab01 (Ctrl-C again: SIGKILL)\n"
        + f"{mute}: rexec: not started: the run was stopped first\n".encode()
        + f"2 hosts: 1 signal 2 (lab01), 1 interrupted ({mute})\n".encode()
    )
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote sleep survived"


def test_sigterm_closes_every_connection_and_still_reports(
    e2e: Any, fleet: Fleet, tmp_path: Path
) -> None:
    """A CI job cancelled (SIGTERM): every command is ended, and the summary and the --junit
    report are still written; the exit status is 128 + 15."""
    marker = e2e.marker("1000.")
    report = tmp_path / "report.xml"
    cli = _start(e2e, fleet, ["--junit", str(report), "lab[01-02]", f"echo hi; sleep {marker}"])
    assert e2e.wait_until(lambda: len(_sleepers(marker)) == 2, 15), "the 2 sleeps never ran"
    time.sleep(0.1)
    out, err = _interrupt(cli, 1, signum=signal.SIGTERM)
    assert cli.returncode == 143, err
    assert sorted(lines(out)) == [b"lab01: hi\n", b"lab02: hi\n"]
    assert err == (
        b"rexec: ended by signal 15: closing every connection\n"
        b"2 hosts: (2 not finished: interrupted)\n"
    )
    failures = [c.find("failure") for c in ET.parse(report).getroot().iter("testcase")]
    assert [(f.get("type"), f.get("message")) for f in failures if f is not None] == [
        ("interrupted", "exit status 143, interrupted: not finished: interrupted")
    ] * 2
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote sleep survived"


def test_third_ctrl_c_closes_every_connection(e2e: Any, fleet: Fleet) -> None:
    marker = e2e.marker("1000.")
    cli = _start(e2e, fleet, ["lab[01-04]", f"trap '' INT TERM; sleep {marker} || sleep {marker}"])
    assert e2e.wait_until(lambda: len(_sleepers(marker)) == 4, 15), "the 4 sleeps never ran"
    time.sleep(0.1)
    try:
        cli.send_signal(signal.SIGINT)
        time.sleep(0.3)
        os.kill(cli.pid, signal.SIGSTOP)  # hold the CLI so two signals arrive together
        cli.send_signal(signal.SIGINT)
        cli.send_signal(signal.SIGINT)
        os.kill(cli.pid, signal.SIGCONT)
        _, err = cli.communicate(timeout=15)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    assert cli.returncode in (130, 137), err  # the SIGKILL may win the race with the third
    assert b"Traceback" not in err
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote sleep survived"


# ---- 1000 hosts ----------------------------------------------------------------------------


def _measured_run(
    e2e: Any, args: list[str], env: dict[str, str], base: Path
) -> tuple[int, bytes, bytes, str]:
    """Run the CLI; its exit status, output, and "wall, CPU, peak RSS" (GNU time's rusage: a
    child forked straight from pytest would report pytest's own RSS as its peak)."""
    out_path, err_path, usage = (base.with_suffix(s) for s in (".out", ".err", ".usage"))
    argv = [e2e.REXEC, "run", *args]
    timed = os.path.exists("/usr/bin/time")
    if timed:
        argv = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        cli = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=e2e.clean_env(env),
            timeout=120,
        )
    figures = f"wall {time.monotonic() - t0:.2f} s"
    if timed:
        user, system, rss_kb = usage.read_text().split()[-3:]
        cpu, rss = float(user) + float(system), int(rss_kb) / 1024
        figures += f", client CPU {cpu:.2f} s, client peak RSS {rss:.0f} MiB"
    return cli.returncode, out_path.read_bytes(), err_path.read_bytes(), figures


@pytest.mark.slow
def test_a_thousand_hosts_in_one_run(e2e: Any, tmp_path: Path) -> None:
    """One server on 1000 loopback addresses; prints the client's wall time, CPU and peak RSS."""
    _raise_nofile()
    port = _free_port()
    addresses = [f"127.0.{a}.{b}:{port}" for a in range(1, 5) for b in range(1, 251)]
    srv = e2e.start_server(
        tmp_path / "srv", config=SERVER_CONFIG.format(role="ok"), listen=addresses
    )
    hosts = f"127.0.[1-4].[1-250]:{port}"
    env = {"REXEC_TOKEN": srv.token}
    try:
        code, out, err, figures = _measured_run(
            e2e, ["-b", hosts, "true"], env, tmp_path / "gather"
        )
        assert code == 0, err[-2000:]
        assert out == f"---------------- {hosts} (1000) exit 0\n".encode()
        assert err == b"1000 hosts: 1000 ok\n"
        print(f"\n1000 hosts, -b true: {figures}")
        code, out, err, figures = _measured_run(e2e, [hosts, "uname -a"], env, tmp_path / "live")
        assert code == 0, err[-2000:]
        assert err == b"1000 hosts: 1000 ok\n"
        uname = os.uname()
        got = lines(out)
        assert len(got) == 1000
        pattern = re.compile(
            rb"127\.0\.[1-4]\.[0-9]+:[0-9]+: Linux " + uname.nodename.encode() + rb" .*\n"
        )
        assert all(pattern.fullmatch(line) for line in got), got[:3]  # no line cut by another
        assert sorted(line.partition(b": ")[0] for line in got) == sorted(
            a.encode() for a in addresses
        )
        print(f"1000 hosts, uname -a (live lines): {figures}")
    finally:
        srv.stop()


# ---- the Python API --------------------------------------------------------------------------


@pytest.fixture
def fleet_env(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """The fleet's client config for this process (rexec.connect reads it for the aliases)."""
    for name in list(os.environ):
        if name.startswith("REXEC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REXEC_CONFIG", str(fleet.config))
    return fleet


def test_run_many_yields_results_as_they_finish(fleet_env: Fleet) -> None:
    import asyncio

    import rexec

    seen: list[tuple[str, int, bytes]] = []

    async def main() -> list[rexec.HostResult]:
        run = rexec.run_many(
            "lab[01-03],lab[09-12]",
            ROLE_CMD,
            timeout=2,
            on_line=lambda host, fd, line: seen.append((host, fd, line)),
        )
        return [result async for result in run]

    results = asyncio.run(main())
    assert results[-1].host == "lab10" and results[-1].status == "timeout"
    by_host = {r.host: r for r in results}
    assert sorted(by_host) == ["lab01", "lab02", "lab03", "lab09", "lab10", "lab11", "lab12"]
    ok = by_host["lab02"]
    assert (ok.status, ok.exit_code, ok.signal, ok.stdout, ok.stderr, ok.error) == (
        "ok",
        0,
        None,
        b"hello\n",
        b"",
        None,
    )
    assert (ok.ok, ok.shell_status, ok.label) == (True, 0, "exit 0")
    fail = by_host["lab09"]
    assert (fail.status, fail.exit_code, fail.stdout, fail.stderr) == (
        "exit",
        2,
        b"bad\n",
        b"oops\n",
    )
    assert (fail.shell_status, fail.label) == (2, "exit 2")
    assert by_host["lab10"].shell_status == 124
    assert (by_host["lab11"].status, by_host["lab11"].shell_status) == ("auth_failed", 255)
    assert (by_host["lab12"].status, by_host["lab12"].shell_status) == ("unreachable", 255)
    assert sorted(seen) == sorted(
        [(f"lab0{i}", 1, b"hello\n") for i in (1, 2, 3)]
        + [("lab09", 1, b"bad\n"), ("lab09", 2, b"oops\n")]
    )


def test_run_many_sync_stdin_and_the_token_hook(fleet_env: Fleet) -> None:
    import rexec

    results = list(rexec.run_many_sync(["lab01", "lab02"], "cat; echo", stdin=b"in"))
    assert [(r.host, r.status, r.stdout) for r in sorted(results, key=lambda r: r.host)] == [
        ("lab01", "ok", b"in\n"),
        ("lab02", "ok", b"in\n"),
    ]
    # token_for(host) is the hook for per-host fleet tokens: here one token for every host,
    # so lab09 (another server, whose group token the config names) fails to authenticate
    tokens: list[str] = []

    def token_for(host: str) -> str:
        tokens.append(host)
        return fleet_env.token

    results = list(rexec.run_many_sync("lab[01-02],lab09", "true", token_for=token_for))
    assert sorted(tokens) == ["lab01", "lab02", "lab09"]
    assert {r.host: r.status for r in results} == {
        "lab01": "ok",
        "lab02": "ok",
        "lab09": "auth_failed",
    }
    # leaving early closes the rest
    first = next(iter(rexec.run_many_sync("lab[01-08]", "true", fanout=2)))
    assert first.status == "ok"


def test_a_reader_that_leaves_ends_the_run_quietly(e2e: Any, fleet: Fleet) -> None:
    """`rexec run @good CMD | head -1`: exit 141, no traceback, no summary; commands stopped."""
    marker = e2e.marker("0.01")  # a valid sleep duration that names this test's processes
    command = f"echo started; while :; do sleep {marker}; echo more; done"
    shell = f"{e2e.REXEC} run @good '{command}' | head -1; echo \"${{PIPESTATUS[0]}}\" >&2"
    proc = subprocess.run(
        ["bash", "-c", shell],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=e2e.clean_env(fleet.env()),
        timeout=30,
    )
    assert re.fullmatch(rb"lab0[1-8]: started\n", proc.stdout), proc.stdout
    assert proc.stderr == b"141\n"
    assert e2e.wait_until(lambda: not _sleepers(marker), 5), "a remote loop survived"


def test_run_many_max_output(fleet_env: Fleet) -> None:
    import rexec

    results = sorted(
        rexec.run_many_sync("lab[01-02]", CHATTY, max_output=1000), key=lambda r: r.host
    )
    assert [(r.host, r.status, r.stdout, r.stderr) for r in results] == [
        (host, "ok", KEPT, b"err\n") for host in ("lab01", "lab02")
    ]
    assert [(r.stdout_dropped, r.stderr_dropped) for r in results] == [(4000, 0), (4000, 0)]
    (whole,) = rexec.run_many_sync(["lab01"], CHATTY, max_output=None)
    assert (len(whole.stdout), whole.stdout_dropped) == (5000, 0)
    (default,) = rexec.run_many_sync(["lab01"], CHATTY)
    assert (len(default.stdout), default.stdout_dropped) == (5000, 0)
    with pytest.raises(ValueError, match="max_output must be 0 or more, got -1"):
        rexec.run_many("lab01", "true", max_output=-1)
