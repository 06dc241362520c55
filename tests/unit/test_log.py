"""Logging set-up, secret redaction, and audit records that never tear."""

from __future__ import annotations

import io
import json
import multiprocessing
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from rexec.errors import ConfigError
from rexec.log import REDACTED, AuditLog, AuditRecord, configure_logging, get_logger

TOKEN_TEXT = "rexec1:00112233445566ff:" + "S" * 43


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


# --- configure_logging ---------------------------------------------------------------------


def test_json_when_not_a_tty_with_bound_fields_and_utc_time() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", out)
    get_logger(conn="c1", peer="10.0.0.1:5555", key_id="00ff").info("accepted", n=3)
    [rec] = json_lines(out.getvalue())
    assert rec["event"] == "accepted"
    assert (rec["conn"], rec["peer"], rec["key_id"], rec["n"]) == ("c1", "10.0.0.1:5555", "00ff", 3)
    assert rec["level"] == "info"
    assert isinstance(rec["timestamp"], str) and rec["timestamp"].endswith("Z")


def test_console_on_a_tty_and_when_asked() -> None:
    tty = TTY()
    configure_logging("info", "auto", tty)
    get_logger(conn="c1").info("hello")
    assert "hello" in tty.getvalue() and "conn" in tty.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue())
    out = io.StringIO()
    configure_logging("info", "console", out)
    get_logger().info("plain")
    assert "plain" in out.getvalue()
    assert "\x1b[" not in out.getvalue()  # no colour codes when not a TTY


def test_json_forced_on_a_tty() -> None:
    tty = TTY()
    configure_logging("info", "json", tty)
    get_logger().info("x")
    assert json_lines(tty.getvalue())[0]["event"] == "x"


def test_level_filtering() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", out)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["event"] for r in json_lines(out.getvalue())] == ["w", "e"]


def test_bad_level_or_format() -> None:
    with pytest.raises(ConfigError, match="unknown log level 'loud'"):
        configure_logging("loud", "json", io.StringIO())
    with pytest.raises(ConfigError, match="unknown log format 'xml'"):
        configure_logging("info", "xml", io.StringIO())


# --- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["secret", "token", "psk", "password", "passwd", "client_secret", "Token", "PSK_hex"]
)
def test_sensitive_keys_are_redacted(key: str) -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger().info("x", **{key: "hunter2"})
    assert "hunter2" not in out.getvalue()
    assert json_lines(out.getvalue())[0][key] == REDACTED


def test_redaction_in_bound_context_nested_values_and_text() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = get_logger(secret=b"\x01" * 32)
    log.info(
        f"got {TOKEN_TEXT}",
        nested={"auth": {"password": "hunter2", "user": "bob"}},
        items=[f"t={TOKEN_TEXT}"],
    )
    text = out.getvalue()
    assert "hunter2" not in text
    assert "S" * 43 not in text
    [rec] = json_lines(text)
    assert rec["secret"] == REDACTED
    assert rec["nested"] == {"auth": {"password": REDACTED, "user": "bob"}}
    assert rec["event"] == f"got rexec1:00112233445566ff:{REDACTED}"


def test_harmless_names_are_kept() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger().info("x", token_file="/p", token_name="ci", key_id="00ff", token_count=2)
    [rec] = json_lines(out.getvalue())
    assert (rec["token_file"], rec["token_name"], rec["key_id"], rec["token_count"]) == (
        "/p",
        "ci",
        "00ff",
        2,
    )


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_are_redacted_and_carry_no_locals(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("info", fmt, out)

    def fail() -> None:
        psk_local = "hunter2-local"  # a local variable must never reach the log
        raise ValueError(f"bad {TOKEN_TEXT} {len(psk_local)}")

    try:
        fail()
    except ValueError:
        get_logger().exception("boom")
    text = out.getvalue()
    assert "boom" in text and "ValueError" in text
    assert "hunter2-local" not in text
    assert "S" * 43 not in text


# --- audit log -----------------------------------------------------------------------------


def record(i: int = 0, **over: object) -> AuditRecord:
    fields: dict[str, object] = {
        "conn": "c1",
        "peer": "10.0.0.1:4242",
        "key_id": "00112233445566ff",
        "key_name": "laptop",
        "channel": i,
        "argv": ["echo", str(i)],
        "cwd": "/tmp",
        "env": {"LANG": "C", "REXEC_SECRET_VALUE": "v"},
        "start": 1_700_000_000.25,
        "duration": 0.1234567,
        "exit_code": 0,
        "bytes_out": 2,
    }
    fields.update(over)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def test_audit_record_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit/audit.jsonl"
    with AuditLog(path) as audit:
        audit.write(record(7))
        audit.write(record(8, argv=None, command="ls | wc -l", exit_code=None, signal=9))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first, second = json_lines(path.read_text())
    assert set(first) == {
        "ts",
        "conn",
        "peer",
        "key_id",
        "key_name",
        "channel",
        "argv",
        "cwd",
        "env",
        "start",
        "duration",
        "exit_code",
        "signal",
        "timed_out",
        "bytes_out",
        "bytes_err",
    }
    assert first["argv"] == ["echo", "7"]
    assert first["env"] == ["LANG", "REXEC_SECRET_VALUE"]  # names only
    assert "v" not in json.dumps(first["env"])
    assert first["start"] == "2023-11-14T22:13:20.250Z"
    assert first["duration"] == 0.123457
    assert str(first["ts"]).endswith("Z")
    assert "argv" not in second
    assert (second["command"], second["exit_code"], second["signal"]) == ("ls | wc -l", None, 9)


def test_audit_appends_across_opens_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    for i in range(3):
        audit = AuditLog(path)
        audit.write(record(i))
        audit.close()
        audit.close()  # idempotent
    assert [r["channel"] for r in json_lines(path.read_text())] == [0, 1, 2]
    assert audit.closed
    with pytest.raises(ValueError, match="closed"):
        audit.write(record())


def test_audit_records_are_visible_before_close(tmp_path: Path) -> None:
    """No user-space buffering: a crash after write() loses nothing."""
    path = tmp_path / "a.jsonl"
    audit = AuditLog(path)
    audit.write(record(1))
    assert json_lines(path.read_text())[0]["channel"] == 1
    audit.close()


def test_audit_non_utf8_and_unicode_are_safe(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    weird = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    with AuditLog(path) as audit:
        audit.write(record(argv=["printf", weird, "ünï €", "a\nb"], cwd=weird))
    raw = path.read_bytes()
    assert raw.isascii()
    assert raw.count(b"\n") == 1
    [rec] = json_lines(raw.decode("ascii"))
    assert rec["argv"] == ["printf", weird, "ünï €", "a\nb"]


def test_audit_dict_records(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync=True) as audit:
        audit.write({"ts": "x", "event": "server-start"})
    assert json_lines(path.read_text()) == [{"ts": "x", "event": "server-start"}]


def test_audit_open_error_names_path(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"cannot open audit log .*dir"):
        AuditLog(tmp_path / "dir")


BIG = "x" * 200_000  # far above PIPE_BUF: atomicity comes from O_APPEND, not luck


def test_audit_concurrent_threads_never_tear(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    audit = AuditLog(path)
    n_threads, per_thread = 16, 40

    def worker(t: int) -> None:
        for i in range(per_thread):
            size = BIG[: (t * 7919 + i * 104729) % len(BIG)]
            audit.write(record(t * 1000 + i, argv=["echo", size], conn=f"t{t}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    audit.close()
    recs = json_lines(path.read_text())
    assert len(recs) == n_threads * per_thread
    assert sorted(int(str(r["channel"])) for r in recs) == sorted(
        t * 1000 + i for t in range(n_threads) for i in range(per_thread)
    )


def _process_writer(path: str, p: int) -> None:
    audit = AuditLog(path)
    for i in range(30):
        audit.write(record(p * 1000 + i, argv=["echo", BIG[: (p * 31 + i * 977) % 150_000]]))
    audit.close()


def test_audit_concurrent_processes_never_tear(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_writer, args=(str(path), p)) for p in range(6)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    recs = json_lines(path.read_text())
    assert len(recs) == 6 * 30
    assert len({r["channel"] for r in recs}) == 6 * 30
