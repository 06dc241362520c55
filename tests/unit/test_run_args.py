"""`rexec run`'s own option parser (argparse costs start-up time: DESIGN.md 2a).

It keeps argparse's rules and messages (unique long prefixes, `--opt=value`, `-Cvalue`,
flag clusters, exit status 2), and reads options after TARGET too, as the usage documents:
`rexec run TARGET [options] CMD...`.
"""

from __future__ import annotations

from typing import Any

import pytest

from rexec.cli.main import main
from rexec.cli.run import RUN_HELP, UsageError, names_many_hosts, parse_run_args

DEFAULTS: dict[str, Any] = {
    "target": "h",
    "command": ["t"],
    "token_file": None,
    "env": [],
    "cwd": None,
    "timeout": None,
    "connect_timeout": None,
    "no_stdin": False,
    "tty": False,
    "json": False,
    "trace": False,
    "suite": "aesgcm",
    "fanout": None,
    "exclude": [],
    "hosts_from": None,
    "gather": False,
    "outdir": None,
    "failed_to": None,
}


def parsed(argv: list[str]) -> dict[str, Any]:
    args = parse_run_args(argv)
    assert not args.help
    return {key: getattr(args, key) for key in DEFAULTS}


@pytest.mark.parametrize(
    ("argv", "changes"),
    [
        (["h", "t"], {}),
        (["h", "ls", "-l"], {"command": ["ls", "-l"]}),
        (["h", "printf", "%s", "a b"], {"command": ["printf", "%s", "a b"]}),
        (["-n", "h", "t"], {"no_stdin": True}),
        (["h", "-n", "t"], {"no_stdin": True}),
        (["h", "t", "-n"], {"command": ["t", "-n"]}),  # CMD started: the rest is CMD
        (["-n", "h", "-n", "t"], {"no_stdin": True}),
        (
            ["h", "-n", "-e", "A=B", "-C", "/", "t", "-n"],
            {"no_stdin": True, "env": ["A=B"], "cwd": "/", "command": ["t", "-n"]},
        ),
        (["h", "--timeout", "30", "make", "test"], {"timeout": 30.0, "command": ["make", "test"]}),
        (["--", "h", "t"], {}),
        (["h", "--", "-n"], {"command": ["-n"]}),
        (["h", "--", "--", "t"], {"command": ["--", "t"]}),
        (["-n", "--", "h", "t"], {"no_stdin": True}),
        (["h", "t", "--", "x"], {"command": ["t", "--", "x"]}),
        (["--", "--", "h"], {"target": "--", "command": ["h"]}),
        (["h"], {"command": []}),
        (["h", "--"], {"command": []}),
        (["-", "t"], {"target": "-"}),
        (["h", "-"], {"command": ["-"]}),
        (["h", "-1"], {"command": ["-1"]}),
        (["--token-file", "f", "h", "t"], {"token_file": "f"}),
        (["--token-file=f", "h", "t"], {"token_file": "f"}),
        (["--token-file", "", "h", "t"], {"token_file": ""}),
        (["-e", "A=1", "-e", "B=2", "h", "t"], {"env": ["A=1", "B=2"]}),
        (["-eA=1", "h", "t"], {"env": ["A=1"]}),
        (["-e=A=1", "h", "t"], {"env": ["A=1"]}),
        (["--env", "A=1", "h", "t"], {"env": ["A=1"]}),
        (["--env=A=1", "h", "t"], {"env": ["A=1"]}),
        (["-e", "-1", "h", "t"], {"env": ["-1"]}),
        (["-e", "-x y", "h", "t"], {"env": ["-x y"]}),
        (["-e", "", "h", "t"], {"env": [""]}),
        (["-C", "/tmp", "h", "t"], {"cwd": "/tmp"}),
        (["-C/tmp", "h", "t"], {"cwd": "/tmp"}),
        (["-C=/tmp", "h", "t"], {"cwd": "/tmp"}),
        (["-C", "-", "h", "t"], {"cwd": "-"}),
        (["--cwd=/tmp", "h", "t"], {"cwd": "/tmp"}),
        (["-nC", "/tmp", "h", "t"], {"no_stdin": True, "cwd": "/tmp"}),
        (["-nC/tmp", "h", "t"], {"no_stdin": True, "cwd": "/tmp"}),
        (["-Cn", "h", "t"], {"cwd": "n"}),
        (["-nn", "h", "t"], {"no_stdin": True}),
        (["--timeout", "5", "h", "t"], {"timeout": 5.0}),
        (["--timeout=1e3", "h", "t"], {"timeout": 1000.0}),
        (["--timeout", "-1", "h", "t"], {"timeout": -1.0}),  # refused later, by the client
        (["--timeout", "-.5", "h", "t"], {"timeout": -0.5}),
        (["--timeout", "5", "--timeout", "6", "h", "t"], {"timeout": 6.0}),
        (["--connect-timeout", "2.5", "h", "t"], {"connect_timeout": 2.5}),
        (
            ["--json", "--trace", "--no-stdin", "h", "t"],
            {"json": True, "trace": True, "no_stdin": True},
        ),
        (["--suite", "chachapoly", "h", "t"], {"suite": "chachapoly"}),
        (["--suite=aesgcm", "h", "t"], {}),
        # unique prefixes of long options, as argparse allows
        (["--no", "h", "t"], {"no_stdin": True}),
        # -t forces a pty, -T forbids it; the last one wins
        (["-t", "h", "t"], {"tty": True}),
        (["--tty", "h", "t"], {"tty": True}),
        (["h", "-tn", "t"], {"tty": True, "no_stdin": True}),
        (["-t", "-T", "h", "t"], {}),
        (["-T", "-t", "h", "t"], {"tty": True}),
        (["--js", "h", "t"], {"json": True}),
        (["--tr", "h", "t"], {"trace": True}),
        (["--ti", "5", "h", "t"], {"timeout": 5.0}),
        (["--to", "f", "h", "t"], {"token_file": "f"}),
        (["--co", "3", "h", "t"], {"connect_timeout": 3.0}),
        (["--su=chachapoly", "h", "t"], {"suite": "chachapoly"}),
        # many hosts (rexec.cli.fleet)
        (["--fanout", "8", "h", "t"], {"fanout": 8}),
        (["-x", "a", "-xb", "--exclude=c", "h", "t"], {"exclude": ["a", "b", "c"]}),
        (["-b", "h", "t"], {"gather": True}),
        (["h", "--gather", "t"], {"gather": True}),
        (["-nb", "h", "t"], {"no_stdin": True, "gather": True}),
        (["--outdir", "d", "--failed-to", "f", "h", "t"], {"outdir": "d", "failed_to": "f"}),
        (["--fan", "2", "h", "t"], {"fanout": 2}),
        # --hosts-from: no TARGET, the first positional starts CMD
        (
            ["--hosts-from", "f", "ls", "-l"],
            {"target": None, "hosts_from": "f", "command": ["ls", "-l"]},
        ),
        (
            ["--hosts-from=f", "-b", "--", "-x"],
            {"target": None, "hosts_from": "f", "gather": True, "command": ["-x"]},
        ),
    ],
)
def test_parse(argv: list[str], changes: dict[str, Any]) -> None:
    assert parsed(argv) == {**DEFAULTS, **changes}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: target, command"),
        (["-n"], "the following arguments are required: target, command"),
        (["--"], "the following arguments are required: target, command"),
        (["--bogus", "h", "t"], "unrecognized arguments: --bogus"),
        (["h", "--bogus", "t"], "unrecognized arguments: --bogus"),
        (["-y", "h", "t"], "unrecognized arguments: -y"),
        (["---x", "h", "t"], "unrecognized arguments: ---x"),
        (["--timeout", "x", "h", "t"], "argument --timeout: invalid float value: 'x'"),
        (["--connect-timeout=", "h", "t"], "argument --connect-timeout: invalid float value: ''"),
        (["--timeout"], "argument --timeout: expected one argument"),
        (["h", "--timeout"], "argument --timeout: expected one argument"),
        (["--timeout", "--json", "h", "t"], "argument --timeout: expected one argument"),
        (["--timeout", "-x", "h", "t"], "argument --timeout: expected one argument"),
        (["-e", "-x", "h", "t"], "argument -e/--env: expected one argument"),
        (["-e"], "argument -e/--env: expected one argument"),
        (["-C", "--", "h", "t"], "argument -C/--cwd: expected one argument"),
        (["--token-file", "--json", "h", "t"], "argument --token-file: expected one argument"),
        (["-n=1", "h", "t"], "argument -n/--no-stdin: ignored explicit argument '1'"),
        (["-ny", "h", "t"], "argument -n/--no-stdin: ignored explicit argument 'y'"),
        (["--json=1", "h", "t"], "argument --json: ignored explicit argument '1'"),
        (
            ["--suite", "x", "h", "t"],
            "argument --suite: invalid choice: 'x' (choose from 'aesgcm', 'chachapoly')",
        ),
        (
            ["--t", "h", "t"],
            "ambiguous option: --t could match --token-file, --timeout, --tty, --trace",
        ),
        (["--c", "3", "h", "t"], "ambiguous option: --c could match --cwd, --connect-timeout"),
        (["--fanout", "x", "h", "t"], "argument --fanout: invalid int value: 'x'"),
        (["-x"], "argument -x/--exclude: expected one argument"),
        (["--f", "1", "h", "t"], "ambiguous option: --f could match --fanout, --failed-to"),
        (["--hosts-from"], "argument --hosts-from: expected one argument"),
    ],
)
def test_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_run_args(argv)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "argv", [["-h"], ["--help"], ["--he"], ["-n", "-h", "h"], ["h", "-h"], ["-nh"]]
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_run_args(argv).help
    assert main(["run", *argv]) == 0
    out, err = capsys.readouterr()
    assert out == RUN_HELP and err == ""
    for option in ("--token-file", "-e K=V", "-C DIR", "--timeout", "--connect-timeout"):
        assert option in RUN_HELP
    for option in ("--no-stdin", "--json", "--trace", "--suite {aesgcm,chachapoly}"):
        assert option in RUN_HELP


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--timeout", "soon", "h", "t"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "rexec run: error: argument --timeout: invalid float value: 'soon'\n"
    assert main(["run", "h"]) == 2
    assert capsys.readouterr().err.startswith("rexec: no command given")
    assert main(["run", "-e", "NOEQUALS", "h", "t"]) == 2
    assert capsys.readouterr().err == "rexec: -e expects K=V, got 'NOEQUALS'\n"


@pytest.mark.parametrize(
    ("argv", "many"),
    [
        (["h", "t"], False),
        (["h:8300", "t"], False),
        (["10.0.0.7:8300", "t"], False),
        (["[::1]:8222", "t"], False),
        (["[fe80::1%eth0]", "t"], False),
        (["unix:/run/b[1].sock", "t"], False),
        (["unix:/run/a.sock,h", "t"], True),  # a comma separates hosts, as in hosts.py
        (["unix:/run/a.sock!unix:/run/a.sock", "t"], True),
        (["a,b", "t"], True),
        (["lab[01-40]", "t"], True),
        (["lab[7]", "t"], True),  # a set (of one): the fleet code hands lab7 back
        (["[1-3]x", "t"], True),
        (["@lab", "t"], True),
        (["a[1-9]!a5", "t"], True),
        (["a!b", "t"], True),  # set algebra without brackets: a host set too
        (["a&b", "t"], True),
        (["a^b", "t"], True),
        (["bad host!", "t"], True),  # a malformed host set (exit 2), not an address
        (["-x", "h", "h", "t"], True),
        (["--fanout", "1", "h", "t"], True),
        (["-b", "h", "t"], True),
        (["--outdir", "d", "h", "t"], True),
        (["--failed-to", "f", "h", "t"], True),
        (["--hosts-from", "f", "t"], True),
    ],
)
def test_many_hosts_dispatch(argv: list[str], many: bool) -> None:
    """Only host sets and fleet options leave the single-host path (and its lean imports)."""
    assert names_many_hosts(parse_run_args(argv)) is many


def test_shell_help_names_its_arguments_as_run_does(capsys: pytest.CaptureFixture[str]) -> None:
    """`rexec shell --help` spells TARGET and --token-file FILE as `rexec run --help` does."""
    with pytest.raises(SystemExit) as done:  # argparse's own --help exit
        main(["shell", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "[--token-file FILE]" in text and "TARGET" in text.split("\n")[2]
    assert "token_file" not in text.lower().replace("--token-file", "")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1000", 1000),
        ("0", 0),
        ("64K", 64 * 1024),
        ("8m", 8 * 1024**2),
        ("8MiB", 8 * 1024**2),
        ("1G", 1024**3),
        ("2kb", 2048),
    ],
)
def test_max_output_sizes(value: str, size: int) -> None:
    assert parse_run_args(["--max-output", value, "h", "t"]).max_output == size
    assert parse_run_args(["h", f"--max-output={value}", "t"]).max_output == size


def test_max_output_default_and_bad_values() -> None:
    from rexec.result import MAX_OUTPUT

    assert parse_run_args(["h", "t"]).max_output == MAX_OUTPUT == 64 * 1024 * 1024
    for bad in ("", "-1", "1.5M", "M", "12T", "1 0", "١٢"):
        with pytest.raises(UsageError) as info:
            parse_run_args([f"--max-output={bad}", "h", "t"])
        assert str(info.value) == (
            f"argument --max-output: invalid size: {bad!r} (bytes, or 64K, 8M, 1G)"
        )
