"""The transfer engines back to back, without a network: what the receiver does with the
files (verification, symlinks in the destination, resume) when the sender misbehaves or
the destination is hostile."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rexec.errors import RemoteProtocolError
from rexec.protocol import xfer as x
from rexec.protocol.frames import HEADROOM
from rexec.xferengine import Outcome, Receiver, Sender
from rexec.xferfs import NAME_MAX, DirCache, Incoming, Listing, part_name

DIR = os.O_RDONLY | os.O_DIRECTORY


def send(
    src: Path, dst: Path, *, resume: bool = False, into: bool = True, name: str = ""
) -> tuple[list[Outcome], Sender]:
    listing = Listing()
    listing.add(os.open(src.parent, DIR), src.name, src.name, recursive=True, follow=True)
    sender = Sender(listing, resume=resume)
    receiver = Receiver(os.open(dst, DIR), into=into, name=name, preserve=True, resume=resume)
    for _ in range(10_000):
        if sender.finished:
            break
        rec = sender.next_record(1 << 20)
        if rec is not None:
            receiver.on_record(bytes(rec[HEADROOM:]))
        while receiver.replies:
            sender.on_record(bytes(receiver.replies.popleft()[HEADROOM:]))
    receiver.close()
    assert sender.finished and receiver.finished
    return sender.outcomes, sender


def results(outcomes: list[Outcome]) -> dict[str, tuple[str, str | None]]:
    return {o.result.path: (o.result.status, o.result.error) for o in outcomes}


def test_a_symlink_in_the_destination_is_never_followed(tmp_path: Path) -> None:
    src, dst, outside = tmp_path / "d", tmp_path / "dst", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    dst.mkdir()
    outside.mkdir()
    (dst / "d").mkdir()
    os.symlink(outside, dst / "d" / "sub")  # the destination's "sub" leads out
    outcomes, _ = send(src, dst)
    assert results(outcomes) == {
        "d": ("ok", None),
        "d/sub": ("failed", "exists and is not a directory"),
        "d/sub/f": ("failed", "refusing to follow a symlink"),
    }
    assert os.listdir(outside) == []


def test_a_hash_mismatch_keeps_the_old_file(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "f").write_bytes(b"old")
    receiver = Receiver(os.open(dst, DIR), into=True, name="", preserve=False, resume=False)
    for rec in (
        x.tree(1, 3),
        x.entry(x.Entry("f", "file", 3, 0o644, 0)),
        bytearray(HEADROOM) + b"\x03new",
        x.end(hashlib.sha256(b"not new").digest()),
        x.done(),
    ):
        receiver.on_record(bytes(rec[HEADROOM:]))
    receiver.close()
    mismatch = "SHA-256 mismatch: the received bytes differ from the source"
    assert [(o.result.status, o.result.error) for o in receiver.outcomes] == [("failed", mismatch)]
    assert (dst / "f").read_bytes() == b"old" and os.listdir(dst) == ["f"]


def test_resume_restarts_when_the_prefix_differs(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = os.urandom(300_000)
    (src / "f").write_bytes(data)
    part = dst / ".f.rexec-part"
    part.write_bytes(data[:1000])
    outcomes, sender = send(src / "f", dst, resume=True, into=False, name="f")
    assert [o.bytes for o in outcomes] == [len(data) - 1000] and sender.bytes == len(data) - 1000
    part.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:5000])  # not the source's prefix
    (dst / "f").unlink()
    outcomes, _ = send(src / "f", dst, resume=True, into=False, name="f")
    assert [o.bytes for o in outcomes] == [len(data)]
    assert (dst / "f").read_bytes() == data and not part.exists()


def test_a_bad_record_is_a_typed_error(tmp_path: Path) -> None:
    receiver = Receiver(os.open(tmp_path, DIR), into=True, name="", preserve=False, resume=False)
    receiver.on_record(bytes(x.tree(1, 1)[HEADROOM:]))
    with pytest.raises(RemoteProtocolError, match="path"):
        receiver.on_record(b'\x02{"path":"../x","kind":"dir","mode":0,"mtime_ns":0}')
    receiver.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("resume", [False, True])
def test_a_planted_temporary_file_is_never_written_through(tmp_path: Path, resume: bool) -> None:
    src, dst = tmp_path / "f", tmp_path / "dst"
    src.write_bytes(b"payload")
    dst.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.link(victim, dst / ".f.rexec-part")  # a hard link where the temporary file goes
    os.symlink(victim, dst / ".g.rexec-part")
    outcomes, _ = send(src, dst, resume=resume)
    assert [o.result.status for o in outcomes] == ["ok"]
    assert victim.read_bytes() == b"precious" and (dst / "f").read_bytes() == b"payload"


def test_a_temporary_file_another_transfer_writes_is_not_shared(tmp_path: Path) -> None:
    """Two transfers to one destination at once (a resume started while the interrupted
    transfer still winds down): the second gets EBUSY, fresh or resuming, instead of
    writing (or hashing a prefix of) the same temporary file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"new contents\n")
    dst = tmp_path / "dst"
    dst.mkdir()
    dirfd = os.open(dst, DIR)
    try:
        first = Incoming(dirfd, "f", 13)
        first.start()
        first.write(memoryview(b"new "))
        busy = "another transfer is writing it; retry later"
        with pytest.raises(OSError, match=busy):
            Incoming(dirfd, "f", 13).start()
        with pytest.raises(OSError, match=busy):
            Incoming(dirfd, "f", 13).offer()
        with pytest.raises(OSError, match=busy):
            Incoming.open(dirfd, ["f"], 13, DirCache()).start()
        first.drop()  # the first one ended: its partial data is there to resume from
        outcomes, _ = send(src / "f", dst, resume=True, into=False, name="f")
        assert [(o.result.status, o.bytes) for o in outcomes] == [("ok", 9)]
    finally:
        os.close(dirfd)
    assert (dst / "f").read_bytes() == b"new contents\n"
    assert not (dst / ".f.rexec-part").exists()


def test_a_temporary_name_fits_beside_the_longest_name() -> None:
    """`.NAME.rexec-part` while it fits in NAME_MAX bytes; past that a shortened name that
    still fits, is the same each time (resume finds it) and differs between long names
    that share their first bytes."""
    assert part_name("a.txt") == ".a.txt.rexec-part"
    assert part_name("n" * 243) == "." + "n" * 243 + ".rexec-part"
    bad = b"\xff" * 250
    longs = ["n" * 244, "n" * 255, "n" * 254 + "m", "é" * 127, os.fsdecode(bad)]
    parts = [part_name(name) for name in longs]
    assert len(set(parts)) == len(longs)
    for name, part in zip(longs, parts, strict=True):
        assert len(os.fsencode(part)) <= NAME_MAX
        assert part == part_name(name) and part.startswith(".") and part.endswith(".rexec-part")
