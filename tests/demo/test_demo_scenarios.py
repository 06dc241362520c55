"""Each scenario, several runs: the naive pair breaks exactly so, the framed pair is exact."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from rexec.demo import framed, main, naive
from rexec.demo.codec import MAX_BODY
from rexec.demo.scenarios import (
    SEQ_OUTPUT,
    framed_empty,
    framed_sticky,
    framed_truncation,
    naive_empty,
    naive_sticky,
    naive_truncation,
    run_scenario,
)

RUNS = range(3)  # the same bytes every time, not just once


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("rexec-demo")]


def test_seq_output_is_what_the_lesson_counts_on() -> None:
    assert len(SEQ_OUTPUT) == 8893
    assert SEQ_OUTPUT[1020:1028] == b"283\n284\n"


@pytest.mark.parametrize("run", RUNS)
def test_naive_truncation_cuts_at_1024_and_shifts_the_next_answer(run: int) -> None:
    t = naive_truncation()
    assert t.server.received == [b"seq 1 2000", b"echo hello"]
    assert t.server.sent == [SEQ_OUTPUT, b"hello\n"]
    first, second = t.client_received
    assert first is not None and second is not None
    assert len(first) == 1024
    assert first == SEQ_OUTPUT[:1024]
    assert first.endswith(b"\n282\n283\n")
    # The "answer" to `echo hello` is the next slice of seq's output.
    assert second == SEQ_OUTPUT[1024:2048]
    assert second.startswith(b"284\n285\n")
    assert t.queued == 8893 + 6 - 2048 == 6851
    assert t.server.error is None


@pytest.mark.parametrize("run", RUNS)
def test_framed_truncation_is_byte_identical(run: int) -> None:
    t = framed_truncation()
    assert t.server.received == [b"seq 1 2000", b"echo hello"]
    assert t.client_received == [SEQ_OUTPUT, b"hello\n"]
    assert t.client_received[0] is not None
    assert hashlib.sha256(t.client_received[0]).digest() == hashlib.sha256(SEQ_OUTPUT).digest()
    assert [(r.route, r.frame.header) for r in t.frames] == [
        ("client -> server", b"\x00\x00\x00\x0a"),
        ("server -> client", b"\x00\x00\x22\xbd"),
        ("client -> server", b"\x00\x00\x00\x0a"),
        ("server -> client", b"\x00\x00\x00\x06"),
    ]
    probe = t.probe
    assert probe is not None and probe.server.refused is not None
    assert probe.server.refused.length == 0xFFFF_FFFF
    assert probe.server.refused.limit == MAX_BODY
    assert probe.server.body_buffered_at_refusal == 0
    assert probe.server.received == []
    assert probe.client_received == [b""]


@pytest.mark.parametrize("run", RUNS)
def test_naive_sticky_glues_two_sends_into_one_command(run: int) -> None:
    t = naive_sticky()
    assert t.send_returned == [8, 8]
    assert t.server.received == [b"echo oneecho two"]
    assert t.server.sent == [b"oneecho two\n"]
    assert t.client_received == [b"oneecho two\n", None]


@pytest.mark.parametrize("run", RUNS)
def test_framed_sticky_splits_glued_frames_exactly(run: int) -> None:
    t = framed_sticky()
    assert t.server.recv_chunks[0] == b"\x00\x00\x00\x08echo one\x00\x00\x00\x08echo two"
    assert t.server.received == [b"echo one", b"echo two"]
    assert t.client_chunks == [b"\x00\x00\x00\x04one\n\x00\x00\x00\x04two\n"]
    assert t.client_received == [b"one\n", b"two\n"]


@pytest.mark.parametrize("run", RUNS)
def test_naive_empty_line_leaves_both_sides_waiting(run: int) -> None:
    t = naive_empty()
    assert t.send_returned == [0]
    assert t.client_received == [None]  # timed out: shown, not hung
    assert t.server_waiting
    assert t.server.received == []
    assert t.server.saw_eof  # the hang-up is the first thing it ever read
    assert t.server.error is None


@pytest.mark.parametrize("run", RUNS)
def test_framed_empty_message_is_a_real_message(run: int) -> None:
    t = framed_empty()
    assert t.wire == [b"\x00\x00\x00\x00", b"\x00\x00\x00\x0aecho after"]
    assert t.server.received == [b"", b"echo after"]
    assert t.client_received == [b"", b"after\n"]
    assert t.server.saw_eof


def test_framing_does_not_care_about_the_buffer_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framed, "RECV_SIZE", 7)
    t = framed_truncation()
    assert t.client_received == [SEQ_OUTPUT, b"hello\n"]
    assert min(len(c) for c in t.client_chunks) >= 1
    assert max(len(c) for c in t.client_chunks) <= 7


@pytest.mark.parametrize("name", ["truncation", "sticky", "empty"])
def test_every_scenario_passes(name: str) -> None:
    result = run_scenario(name)
    assert result.error is None
    assert [h.kind for h in result.halves] == ["naive", "framed"]
    assert [c.label for h in result.halves for c in h.checks if not c.ok] == []
    assert result.ok


def test_a_naive_pair_that_does_not_break_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # With a buffer bigger than the reply, the naive pair gets lucky: the lesson did not
    # show, and the demo must say so rather than print a verdict it did not see.
    monkeypatch.setattr(naive, "RECV_SIZE", 65536)
    result = run_scenario("truncation")
    assert not result.ok
    failed = [c.label for c in result.halves[0].checks if not c.ok]
    assert "reply cut at exactly 65536 of 8893 bytes" in failed
    assert result.halves[1].ok
    assert main(["truncation"]) == 1
    assert "verdict truncation: FAIL" in capsys.readouterr().out
