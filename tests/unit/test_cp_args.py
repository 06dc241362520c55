"""`rexec cp`'s command line: scp operands, the options it shares with `rexec run`, the
errors (exact text), the --json objects and the exit statuses of its outcomes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rexec.cli.cp import (
    CP_HELP,
    CP_OPTIONS,
    check_cp_args,
    make_plan,
    parse_cp_args,
    split_operand,
)
from rexec.cli.cpmany import summary
from rexec.cli.cpreport import CpArgs, Plan, Report, file_json, host_json
from rexec.cli.main import main
from rexec.cli.outcome import UsageError, of_error
from rexec.errors import AuthError, ConnectionLost, ErrorCode, PolicyError, ServerRefused
from rexec.protocol.token import generate_token
from rexec.result import error_kind
from rexec.transfer import FileResult, FileStatus, TransferError, TransferResult


@pytest.mark.parametrize(
    ("text", "split"),
    [
        ("lab1:/srv/app", ("lab1", "/srv/app")),
        ("lab1:rel/path", ("lab1", "rel/path")),
        ("lab1:", ("lab1", "")),
        ("lab1:a:b", ("lab1", "a:b")),  # the first colon ends HOST, as scp
        ("lab1:8300", ("lab1", "8300")),  # digits alone are a PATH, as scp
        ("lab1:8300:", ("lab1:8300", "")),
        ("lab1:8300:/tmp/x", ("lab1:8300", "/tmp/x")),
        ("127.0.0.1:41000:x", ("127.0.0.1:41000", "x")),
        ("[::1]:/tmp/x", ("[::1]", "/tmp/x")),
        ("[::1]:8300:/tmp/x", ("[::1]:8300", "/tmp/x")),
        ("[::1]:", ("[::1]", "")),
        ("[fe80::1%eth0]:9:y", ("[fe80::1%eth0]:9", "y")),
        ("lab[01-03]:/etc/hosts", ("lab[01-03]", "/etc/hosts")),
        ("127.0.1.[1-3]:9000:/tmp/x", ("127.0.1.[1-3]:9000", "/tmp/x")),
        ("a:1,b:2:/x", ("a:1,b:2", "/x")),
        ("a,b:/x", ("a,b", "/x")),
        ("@lab!lab07:x", ("@lab!lab07", "x")),
        ("alias_1:~x", ("alias_1", "~x")),
        # local: no colon, a slash before it, a leading colon, an unclosed bracket
        ("file.txt", (None, "file.txt")),
        ("./a:b", (None, "./a:b")),
        ("dir/x:y", (None, "dir/x:y")),
        ("/abs/p:q", (None, "/abs/p:q")),
        (":leading", (None, ":leading")),
        ("f[1].txt", (None, "f[1].txt")),
        ("x[1:2]", (None, "x[1:2]")),
        ("[::1", (None, "[::1")),
        ("", (None, "")),
    ],
)
def test_split_operand(text: str, split: tuple[str | None, str]) -> None:
    assert split_operand(text) == split


@pytest.mark.parametrize(
    ("operands", "plan"),
    [
        (["a", "h:/d/"], Plan("put", "h", ("a",), "/d/")),
        (
            ["a", "b/", "h:"],
            Plan(
                "put",
                "h",
                (
                    "a",
                    "b/",
                ),
                ".",
            ),
        ),
        (["h:x", "."], Plan("get", "h", ("x",), ".")),
        (
            ["h:x", "h:", "out"],
            Plan(
                "get",
                "h",
                (
                    "x",
                    ".",
                ),
                "out",
            ),
        ),
        (
            ["lab[1-2]:/var/log/syslog", "logs"],
            Plan("get", "lab[1-2]", ("/var/log/syslog",), "logs"),
        ),
        (["./a:b", "[::1]:7:c"], Plan("put", "[::1]:7", ("./a:b",), "c")),
    ],
)
def test_make_plan(operands: list[str], plan: Plan) -> None:
    assert make_plan(operands) == plan


@pytest.mark.parametrize(
    ("operands", "message", "parse"),
    [
        ([], "the following arguments are required: SRC, DST", True),
        (["a"], "missing destination after 'a' (SRC... DST)", True),
        (
            ["a", "b"],
            "no remote operand: name the remote side HOST:PATH (a local name with a ':' "
            "needs a '/' before it: ./a:b)",
            False,
        ),
        (
            ["h:a", "g:b"],
            "cannot copy between two remote operands ('h:a' and 'g:b'): copy to a local "
            "directory first",
            False,
        ),
        (
            ["a", "h:b", "c"],
            "the sources mix local and remote operands ('a' and 'h:b'): one side is remote, "
            "the other local",
            False,
        ),
        (
            ["h:a", "g:b", "c"],
            "the sources name different hosts ('h' and 'g'): give one HOST (a host set "
            "copies from each of its hosts)",
            False,
        ),
        (
            ["unix:/run/r.sock", "x"],
            "unix:/run/r.sock: a unix-socket server takes an alias here (client config: "
            '[hosts.NAME] address = "unix:/path"), then NAME:PATH',
            False,
        ),
        (  # a tree needs a name to land under (put()'s ValueError, said before connecting)
            ["a", "/", "h:"],
            "/: cannot copy the root directory itself (name what is in it)",
            False,
        ),
    ],
)
def test_make_plan_errors(operands: list[str], message: str, parse: bool) -> None:
    with pytest.raises(UsageError) as info:
        make_plan(operands)
    assert (str(info.value), info.value.parse) == (message, parse)


def test_options_anywhere_shared_with_run() -> None:
    args = parse_cp_args(
        ["-rp", "src", "--resume", "-q", "h:dst", "--json", "--connect-timeout=5", "-x", "b"]
    )
    assert args.operands == ["src", "h:dst"]
    assert (args.recursive, args.preserve, args.resume, args.quiet, args.json) == (
        True,
        True,
        True,
        True,
        True,
    )
    assert (args.connect_timeout, args.exclude) == (5.0, ["b"])
    args = parse_cp_args(
        ["--token-file", "t", "--retry", "2", "--suite", "chachapoly", "--", "-a", "h:"]
    )
    assert (args.token_file, args.retry, args.suite, args.operands) == (
        "t",
        2,
        "chachapoly",
        ["-a", "h:"],
    )
    assert parse_cp_args(["--rec", "a", "h:"]).recursive  # a unique prefix, as run's


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-z", "a", "h:"], "unrecognized arguments: -z"),
        (
            ["--re", "a", "h:"],
            "ambiguous option: --re could match --recursive, --resume, --retry, --retry-delay",
        ),
        (["--retry", "x", "a", "h:"], "argument --retry: invalid int value: 'x'"),
        (["-C", "/", "a", "h:"], "unrecognized arguments: -C"),  # run's, not cp's
        (["-r=1", "a", "h:"], "argument -r/--recursive: ignored explicit argument '1'"),
        (["a", "h:", "--token-file"], "argument --token-file: expected one argument"),
    ],
)
def test_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_cp_args(argv)
    assert str(info.value) == message
    assert isinstance(info.value.parsed, CpArgs)


def test_run_checks_apply() -> None:
    args = parse_cp_args(["--fanout", "0", "a", "h:"])
    with pytest.raises(UsageError, match=r"^--fanout must be at least 1, got 0$"):
        check_cp_args(args)
    args = parse_cp_args(["a", "lab[1-2]:/x"])
    assert check_cp_args(args) == Plan("put", "lab[1-2]", ("a",), "/x")
    assert args.target == "lab[1-2]"


def _result(*files: FileResult) -> TransferResult:
    return TransferResult("h", "put", files, 10, 0.5)


OK = FileResult("a/b.txt", "file", 10, 10, "ab" * 32, FileStatus.OK)
FULL = FileResult("c", "file", 5, 3, None, FileStatus.FAILED, "No space left on device")


def test_json_objects() -> None:
    assert file_json("lab1", "put", OK) == {
        "host": "lab1",
        "direction": "put",
        "path": "a/b.txt",
        "kind": "file",
        "size": 10,
        "sent": 10,
        "sha256": "ab" * 32,
        "status": "ok",
        "error": None,
    }
    assert file_json("lab1", "get", FULL)["error"] == {
        "kind": "file",
        "message": "No space left on device",
    }
    assert host_json("lab2", "put", "connect", "refused") == {
        "host": "lab2",
        "direction": "put",
        "path": None,
        "kind": None,
        "size": 0,
        "sent": 0,
        "sha256": None,
        "status": "failed",
        "error": {"kind": "connect", "message": "refused"},
    }


def test_report_lines_json_and_status(capfd: pytest.CaptureFixture[str]) -> None:
    args = parse_cp_args(["--json", "a", "h:"])
    report = Report(args, make_plan(args.operands), ["lab1", "lab2", "lab3"], size=None)
    assert report.progress is None  # capfd: stderr is no terminal
    report.transferred("lab1", _result(OK))
    assert report.status == 0
    report.transferred("lab2", _result(OK, FULL))
    assert report.status == 1
    report.failed("lab3", ConnectionLost("cannot connect to lab3:8222: Connection refused"))
    assert report.close() == 255
    out, err = capfd.readouterr()
    assert err == (
        "rexec cp: lab2:c: No space left on device\n"
        "rexec cp: lab3: cannot connect to lab3:8222: Connection refused\n"
    )
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["host"], o["path"], o["status"]) for o in objects] == [
        ("lab1", "a/b.txt", "ok"),
        ("lab2", "a/b.txt", "ok"),
        ("lab2", "c", "failed"),
        ("lab3", None, "failed"),
    ]
    assert objects[3]["error"]["kind"] == "connect"


def test_transfer_error_maps_to_exit_1() -> None:
    exc = TransferError(_result(OK, FULL))
    assert error_kind(exc) == "transfer"
    outcome = of_error(exc)
    assert (outcome.exit_status, outcome.kind) == (1, "transfer")
    assert outcome.message == "h: 1 of 2 files failed; c: No space left on device"


def test_report_takes_a_transfer_error_as_its_files(capfd: pytest.CaptureFixture[str]) -> None:
    args = parse_cp_args(["a", "h:"])
    report = Report(args, make_plan(args.operands), ["h"], size=None)
    report.failed("h", TransferError(_result(OK, FULL)), started=True)
    assert report.close() == 1
    assert capfd.readouterr().err == "rexec cp: h:c: No space left on device\n"


def test_usage_errors_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cp", "a", "b"]) == 2
    assert capsys.readouterr().err.startswith("rexec cp: no remote operand: ")
    assert main(["cp", "--bogus", "a", "h:"]) == 2
    assert capsys.readouterr().err == "rexec cp: error: unrecognized arguments: --bogus\n"
    assert main(["cp", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: rexec cp [-h] [-r] [-p] [--resume]")


def test_help_names_every_option_and_its_examples_parse() -> None:
    """--help cannot drift from the parser: each option is in it, each example parses."""
    for long, short, _ in CP_OPTIONS:
        assert f"  {short or long}" in CP_HELP and f" {long}" in CP_HELP, long
    examples = CP_HELP.split("\nexamples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) == 5
    for line in examples:
        argv = shlex.split(line.partition("   ")[0])
        assert argv[:2] == ["rexec", "cp"], line
        check_cp_args(parse_cp_args(argv[2:]))


def test_one_host_stays_off_asyncio(tmp_path: Path) -> None:
    """`rexec cp` to one host runs on the sync client: no asyncio, no fleet modules."""
    probe = (
        "import json, sys\n"
        "from rexec.cli.main import main\n"
        "code = main(['cp', '--connect-timeout', '5', sys.argv[1], '127.0.0.1:1:/tmp/x'])\n"
        "assert code == 255, code\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXEC_")}
    env.update(
        HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), REXEC_TOKEN=generate_token().format()
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "f")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "rexec.cli.cp" in loaded
    fleet = {"rexec.cli.cpmany", "rexec.client.fanout", "rexec.client.fleet"}
    bad = ({"asyncio", "pydantic", "argparse"} | fleet) & loaded
    assert bad == set()
    assert "rexec cp: 127.0.0.1:1: cannot connect to 127.0.0.1:1" in out.stderr


def _failed(path: str, *, at_source: bool) -> FileResult:
    return FileResult(path, "file", 1, 0, None, FileStatus.FAILED, "boom", at_source)


@pytest.mark.parametrize(
    ("plan", "wire", "shown"),
    [
        (Plan("get", "h", ("/var/log/syslog",), "."), "syslog", "/var/log/syslog"),
        (Plan("get", "h", ("/var/log/",), "."), "log/app/x", "/var/log/app/x"),
        (Plan("get", "h", ("rel/f", "g"), "."), "g", "g"),
        (Plan("get", "h", ("/f",), "."), "f", "/f"),
        (Plan("put", "h", ("a", "b"), "mixed"), "b", "mixed/b"),
        (Plan("put", "h", ("a",), "."), "a/b", "a/b"),
        (Plan("put", "h", ("a",), "/srv/"), "a/b", "/srv/a/b"),
        (Plan("put", "h", ("tree",), "dst"), "tree/sub/x", "dst/sub/x"),
        (Plan("put", "h", ("f",), "new.txt"), "f", "new.txt"),
    ],
)
def test_failed_files_are_named_by_their_remote_path(plan: Plan, wire: str, shown: str) -> None:
    """A failure where the remote side reads (get) or writes (put) names HOST:PATH."""
    f = _failed(wire, at_source=plan.direction == "get")
    assert plan.failed_name("h", f) == f"h:{shown}"


@pytest.mark.parametrize(
    ("plan", "wire", "at_source", "dest", "shown"),
    [
        # put: the local source could not be read (missing, a directory without -r)
        (Plan("put", "h", ("src/a.txt",), "x"), "a.txt", True, None, "src/a.txt"),
        (Plan("put", "h", ("/abs/tree",), "x"), "tree/sub/f", True, None, "/abs/tree/sub/f"),
        (Plan("put", "h", ("nonexist",), "/tmp/x"), "nonexist", True, None, "nonexist"),
        # get: the local destination could not be written
        (Plan("get", "h", ("/etc/f",), "back"), "f", False, None, "back"),
        (Plan("get", "h", ("/src",), "out/"), "src/a", False, None, "out/src/a"),
        (Plan("get", "h", ("/src",), "out"), "src/a", False, "out/h/", "out/h/src/a"),
        # get: the local destination itself could not be opened (FileResult.path "")
        (Plan("get", "h", ("/f",), "/no/dir/"), "", False, None, "/no/dir"),
        (Plan("get", "h", ("/f",), "no/new"), "", False, None, "no/new"),
        (Plan("get", "h", ("/f",), "out"), "", False, "out/h/", "out/h"),
    ],
)
def test_local_failures_are_named_by_their_local_path(
    plan: Plan, wire: str, at_source: bool, dest: str | None, shown: str
) -> None:
    assert plan.failed_name("h", _failed(wire, at_source=at_source), dest) == shown


def test_ctrl_c_is_130_with_its_line(capfd: pytest.CaptureFixture[str]) -> None:
    args = parse_cp_args(["a", "h:"])
    report = Report(args, make_plan(args.operands), ["h"], size=None)
    report.failed("h", KeyboardInterrupt(), started=True)
    assert report.close() == 130
    many = Report(args, make_plan(args.operands), ["a", "b"], size=None)
    assert many.interrupted() == 130
    line = "interrupted: closing the connection (partial files are kept for --resume)"
    assert capfd.readouterr().err == f"rexec cp: h: {line}\nrexec cp: {line}\n"


def test_a_host_set_summary_counts_hosts_as_rexec_run_does(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """ok, failed (some file), then a host failed as a whole as `rexec run` words it: before
    its transfer started (unreachable, auth_failed, refused) or after (truncated, policy)."""
    args = parse_cp_args(["a", "h:"])
    report = Report(args, make_plan(args.operands), ["h"], size=None)
    good = (FileResult("a", "file", 1, 1, "00", FileStatus.OK),)
    for host in ("h01", "h02"):
        report.transferred(host, TransferResult(host, "put", good, 1, 0.0))
    report.failed(
        "h03", TransferError(TransferResult("h03", "put", (_failed("a", at_source=True),), 0, 0.0))
    )
    report.failed("h04", ConnectionLost("cannot connect to h04: Connection refused"))
    report.failed("h05", AuthError("authentication failed"))
    report.failed("h06", ServerRefused(1, 0, "server busy"))
    report.failed("h07", ConnectionLost("connection lost"), started=True)
    report.failed("h08", ConnectionLost("connection lost"), started=True)
    report.failed("h09", PolicyError(ErrorCode.POLICY, "transfers are not allowed"), started=True)
    assert summary(report, 11) == (
        "11 hosts: 2 ok, 1 failed (h03), 1 unreachable (h04), 1 auth_failed (h05), "
        "1 policy (h09), 1 refused (h06), 2 truncated (h[07-08]) (2 not finished: interrupted)"
    )
    assert report.close(summary(report, 9)) == 255
    assert capfd.readouterr().err.endswith("2 truncated (h[07-08])\n")
    nothing = Report(args, make_plan(args.operands), ["a", "b"], size=None)
    assert nothing.interrupted(summary(nothing, 2)) == 130  # Ctrl-C before any host ended
    assert capfd.readouterr().err.endswith("\n2 hosts: (2 not finished: interrupted)\n")
