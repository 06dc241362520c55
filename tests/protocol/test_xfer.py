"""The transfer channel's codec (docs/PROTOCOL.md section 17): XFER bodies and the record
streams, fed bytes (valid, garbage, oversized, out of order) and checked for typed errors."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol import xfer as x
from rexec.protocol.events import ExecRejected, StdinReceived, XferReceived
from rexec.protocol.frames import HEADROOM, MAX_PAYLOAD, FrameType

SHA = hashlib.sha256(b"hello").digest()


def body(rec: bytearray) -> bytes:
    """A record as the peer receives it (the frame's payload)."""
    return bytes(rec[HEADROOM:])


def raw(kind: int, obj: Any) -> bytes:
    return bytes([kind]) + (json.dumps(obj).encode() if not isinstance(obj, bytes) else obj)


# ---- XFER --------------------------------------------------------------------------


def test_request_round_trips() -> None:
    req = x.XferRequest("get", ("a", "/b"), recursive=True, preserve=True, resume=True, window=7)
    assert x.XferRequest.from_json(req.to_json()) == req
    assert req.to_json() == (
        b'{"op":"get","paths":["a","/b"],"recursive":true,"preserve":true,"resume":true,"window":7}'
    )
    put = x.XferRequest("put", ("dst/",), into=True, window=0)
    assert x.XferRequest.from_json(put.to_json()) == put


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ({"op": "put", "paths": ["a"]}, "missing"),
        ({"op": "put", "paths": ["a"], "window": 1, "extra": 1}, "unknown"),
        ({"op": "copy", "paths": ["a"], "window": 1}, "op must be"),
        ({"op": "put", "paths": ["a", "b"], "window": 1}, "exactly 1 path"),
        ({"op": "get", "paths": [], "window": 1}, "1..4096 paths"),
        ({"op": "get", "paths": "a", "window": 1}, "array of strings"),
        ({"op": "get", "paths": [1], "window": 1}, "array of strings"),
        ({"op": "get", "paths": ["a\0b"], "window": 1}, "NUL"),
        ({"op": "get", "paths": ["a" * 5000], "window": 1}, "too long"),
        ({"op": "get", "paths": ["a"], "window": True}, "window must be"),
        ({"op": "get", "paths": ["a"], "window": 2**32}, "window must be"),
        ({"op": "get", "paths": ["a"], "window": 1, "recursive": 1}, "boolean"),
        ({"op": "get", "paths": ["a"], "window": 1, "into": True}, "put only"),
    ],
)
def test_invalid_requests_are_refused(obj: dict[str, Any], why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        x.XferRequest.from_json(json.dumps(obj).encode())


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[1]", b"nul", b'"x"'])
def test_request_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        x.XferRequest.from_json(data)


def test_xfer_frame_opens_a_channel_and_a_bad_body_is_refused_not_fatal(pair: Any) -> None:
    req = x.XferRequest("put", ("dst",), window=1024)
    ch = pair.client.send_xfer(req)
    assert pair.c2s() == [XferReceived(ch, req)]
    pair.client.send_stdin(ch, body(x.done()))
    assert pair.c2s() == [StdinReceived(ch, bytes([x.Rec.DONE]))]
    # a bad body: ERROR + EXIT territory for the server, the connection goes on
    pair.client._queue_frame(FrameType.XFER, ch + 1, b'{"op":"put"}')
    pair.client.last_channel = ch + 1
    events = pair.c2s()
    assert isinstance(events[0], ExecRejected) and "missing" in events[0].reason


# ---- the sender's stream, as the receiver checks it -------------------------------


def file_entry(path: str = "d/a", size: int = 5) -> bytes:
    return body(x.entry(x.Entry(path, "file", size, 0o644, 1)))


def test_a_whole_stream_decodes() -> None:
    rs = x.ReceiverStream(resume=False)
    assert rs.feed(body(x.tree(2, 5))) == ("tree", (2, 5))
    what, e = rs.feed(body(x.entry(x.Entry("d", "dir", 0, 0o755, 9))))
    assert (what, e.kind, e.path, e.mode) == ("entry", "dir", "d", 0o755)
    assert rs.feed(file_entry())[0] == "entry"
    what, view = rs.feed(b"\x03hel")
    assert (what, bytes(view)) == ("data", b"hel")
    assert bytes(rs.feed(b"\x03lo")[1]) == b"lo"
    assert rs.feed(body(x.end(SHA))) == ("end", SHA)
    link = x.Entry("d/l", "symlink", 0, 0o777, 1, "../x")
    assert rs.feed(body(x.entry(link)))[1].target == "../x"
    assert rs.feed(body(x.fail("d/f", "file", "not a\nregular file"))) == (
        "fail",
        ("d/f", "file", "not a regular file"),
    )
    assert rs.feed(body(x.done())) == ("done", None)
    assert rs.finished


def start(resume: bool = False) -> x.ReceiverStream:
    rs = x.ReceiverStream(resume)
    rs.feed(body(x.tree(1, 5)))
    return rs


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([b""], "empty"),
        ([b"\x00"], "out of order"),
        ([b"\xff"], "out of order"),
        ([b"\x03abc"], "DATA"),  # data before any ENTRY
        ([body(x.end(SHA))], "END"),
        ([body(x.tree(1, 1))], "TREE"),  # a second TREE
        ([file_entry(), b"\x03123456"], "beyond"),  # more than size
        ([file_entry(), b"\x03123", body(x.end(SHA))], "not sent"),  # END early
        ([file_entry(), b"\x03"], "beyond"),  # an empty DATA
        ([file_entry(), file_entry()], "out of order"),  # ENTRY inside a file
        ([file_entry(), body(x.offset(0))], "OFFSET"),  # OFFSET without resume
        ([raw(0x02, b"{not json")], "not valid JSON"),
        ([raw(0x02, [1])], "JSON object"),
        ([raw(0x02, {"path": "a", "kind": "fifo", "mode": 0, "mtime_ns": 0})], "kind"),
        ([raw(0x02, {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0})], "missing"),
        ([raw(0x02, {"path": "a", "kind": "dir", "mode": 0, "mtime_ns": 0, "x": 1})], "unknown"),
        ([raw(0x02, {"path": "a", "kind": "dir", "mode": 0o10000, "mtime_ns": 0})], "mode"),
        ([raw(0x02, {"path": "a", "kind": "file", "mode": 0, "mtime_ns": 0, "size": -1})], "size"),
        (
            [raw(0x02, {"path": "a", "kind": "symlink", "mode": 0, "mtime_ns": 0, "target": ""})],
            "target",
        ),
        ([raw(0x06, {"path": "a", "kind": "dev", "error": "x"})], "FAIL kind"),
        ([body(x.done()) + b"x"], "out of order"),
    ],
)
def test_bad_sender_records_are_typed_errors(records: list[bytes], match: str) -> None:
    rs = start()
    with pytest.raises(RemoteProtocolError, match=match):
        for rec in records:
            rs.feed(rec)


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a/.", "", "a\0b", "x" * 5000]
)
def test_escaping_wire_paths_are_refused(path: str) -> None:
    rs = start()
    entry = {"path": path, "kind": "dir", "mode": 0, "mtime_ns": 0}
    with pytest.raises(RemoteProtocolError, match="path"):
        rs.feed(raw(0x02, entry))


def test_resume_needs_an_offset_within_the_size() -> None:
    rs = start(resume=True)
    rs.feed(file_entry(size=5))
    with pytest.raises(RemoteProtocolError, match="DATA"):
        x.ReceiverStream.feed(rs, b"\x03abc")  # data before OFFSET
    rs = start(resume=True)
    rs.feed(file_entry(size=5))
    with pytest.raises(RemoteProtocolError, match="beyond"):
        rs.feed(body(x.offset(6)))
    rs = start(resume=True)
    rs.feed(file_entry(size=5))
    assert rs.feed(body(x.offset(3))) == ("offset", 3)
    rs.feed(b"\x03lo")
    assert rs.feed(body(x.end(SHA)))[0] == "end"


# ---- the receiver's stream, as the sender checks it -------------------------------


def test_results_must_come_in_order_and_haves_only_when_asked() -> None:
    ss = x.SenderStream()
    with pytest.raises(RemoteProtocolError):
        ss.feed(body(x.result(x.Result("a", "ok", None, None))))  # nothing sent yet
    ss.sent("a")
    ss.sent("b", want_have=True)
    with pytest.raises(RemoteProtocolError, match="out of order"):
        ss.feed(body(x.result(x.Result("b", "ok", None, None))))  # a's RESULT is due first
    ok = ss.feed(body(x.result(x.Result("a", "ok", SHA.hex(), None))))  # (b awaits its HAVE)
    assert ok == ("result", x.Result("a", "ok", SHA.hex(), None))
    with pytest.raises(RemoteProtocolError, match="out of order"):
        ss.feed(body(x.result(x.Result("b", "ok", None, None))))  # b's HAVE is due first
    assert ss.feed(body(x.have(3, SHA))) == ("have", (3, SHA))
    assert ss.outstanding == 1
    assert ss.feed(body(x.result(x.Result("b", "ok", None, None))))[0] == "result"
    assert ss.outstanding == 0


def test_a_result_for_an_earlier_file_may_come_while_a_have_is_due() -> None:
    """With resume the sender sends the next ENTRY right after a file's END: the receiver
    answers that END (RESULT) before the new ENTRY (HAVE), as PROTOCOL.md 17.3 orders it."""
    ss = x.SenderStream()
    ss.sent("a", want_have=True)
    assert ss.feed(body(x.have(0, SHA)))[0] == "have"
    ss.sent("b", want_have=True)  # after a's OFFSET, DATA and END
    assert ss.feed(body(x.result(x.Result("a", "ok", SHA.hex(), None))))[0] == "result"
    assert ss.awaiting_have
    with pytest.raises(RemoteProtocolError):  # b's own RESULT never before its HAVE
        ss.feed(body(x.result(x.Result("b", "ok", SHA.hex(), None))))
    assert ss.feed(body(x.have(0, SHA)))[0] == "have"
    assert ss.feed(body(x.result(x.Result("b", "ok", SHA.hex(), None))))[0] == "result"
    assert ss.outstanding == 0


@pytest.mark.parametrize(
    "rec",
    [
        raw(0x12, {"path": "a", "status": "great"}),
        raw(0x12, {"path": "a", "status": "ok", "sha256": "zz"}),
        raw(0x12, {"path": "a", "status": "ok", "sha256": "00" * 31}),
        raw(0x12, {"path": "a", "status": "failed", "error": 5}),
        raw(0x12, {"path": "a"}),
        raw(0x11, {"offset": 0, "sha256": SHA.hex()}),  # a HAVE nobody asked for
        b"\x12",
        b"",
    ],
)
def test_bad_receiver_records_are_typed_errors(rec: bytes) -> None:
    ss = x.SenderStream()
    ss.sent("a")
    with pytest.raises(RemoteProtocolError):
        ss.feed(rec)


# ---- building records ----------------------------------------------------------------


def test_records_are_built_behind_headroom_and_capped() -> None:
    rec = x.end(SHA)
    assert rec[:HEADROOM] == bytes(HEADROOM) and rec[HEADROOM] == x.Rec.END
    buf = x.data_buffer(x.MAX_DATA)
    assert len(buf) - HEADROOM == MAX_PAYLOAD and buf[HEADROOM] == x.Rec.DATA
    with pytest.raises(LocalProtocolError):
        x.record(x.Rec.ABORT, bytes(MAX_PAYLOAD))
    with pytest.raises(LocalProtocolError):
        x.end(b"short")
    assert len(x.one_line("é" * 2000).encode()) <= x.MAX_ERROR


def compact(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("path", ["d/a", 'q"uo\\te/ü', "ctl\x01\n\u2028/x", "d/" + "é" * 2000])
def test_entry_and_result_json_is_compact_json(path: str) -> None:
    """ENTRY and RESULT bodies are written by hand (one per file): the very bytes of the
    compact json.dumps the document shows, and they decode back to what was sent."""
    e = x.Entry(path, "file", 5, 0o644, 1_700_000_000_000_000_000)
    want = {"path": path, "kind": "file", "mode": 0o644, "mtime_ns": e.mtime_ns, "size": 5}
    assert body(x.entry(e))[1:] == compact(want)
    link = x.Entry(path, "symlink", 0, 0o777, 1, target='../t"\\')
    want = {"path": path, "kind": "symlink", "mode": 0o777, "mtime_ns": 1, "target": link.target}
    assert body(x.entry(link))[1:] == compact(want)
    d = x.Entry(path, "dir", 0, 0o755, 2)
    assert body(x.entry(d))[1:] == compact(
        {"path": path, "kind": "dir", "mode": 493, "mtime_ns": 2}
    )
    stream = x.ReceiverStream(resume=False)
    stream.feed(body(x.tree(3, 5)))
    assert stream.feed(body(x.entry(d))) == ("entry", d)
    assert stream.feed(body(x.entry(link))) == ("entry", link)
    ok = x.Result(path, "ok", SHA.hex(), None)
    bad = x.Result(path, "failed", None, "no\nroom")
    assert body(x.result(ok))[1:] == compact({"path": path, "status": "ok", "sha256": SHA.hex()})
    want_bad = {"path": path, "status": "failed", "error": "no room"}
    assert body(x.result(bad))[1:] == compact(want_bad)
    sender = x.SenderStream()
    sender.sent(path)
    sender.sent(path)
    assert sender.feed(body(x.result(ok))) == ("result", ok)
    assert sender.feed(body(x.result(bad))) == ("result", x.Result(path, "failed", None, "no room"))


def test_scp_placement_rules() -> None:
    assert x.placed("src/a/b", True, "") == ["src", "a", "b"]
    assert x.placed("src/a/b", False, "dst") == ["dst", "a", "b"]
    assert x.wants_into(1, True) and not x.wants_into(1, False)  # (`d/` missing: dir_named)
    assert x.wants_into(2, False)


# ---- section 17.3's stream table is the code's ------------------------------------------


def _stream_table() -> list[tuple[str, str, str]]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = text[text.index("### 17.3 ") : text.index("### 17.4 ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0].isupper():
            rows.append((cells[0], cells[1], cells[2]))
    return rows


RECORDS: dict[str, list[bytes]] = {
    "TREE": [body(x.tree(1, 5))],
    "ENTRY (dir, symlink), FAIL, FILE": [
        body(x.entry(x.Entry("d", "dir", 0, 0o755, 0))),
        body(x.entry(x.Entry("l", "symlink", 0, 0o777, 0, "t"))),
        body(x.fail("f", "file", "gone")),
    ],
    "ENTRY (file)": [file_entry()],
    "OFFSET": [body(x.offset(0))],
    "DATA": [b"\x03he"],
    "END, ABORT": [body(x.end(SHA)), body(x.abort("shrank"))],
    "DONE": [body(x.done())],
}


def test_the_stream_table_in_the_document_is_the_codes() -> None:
    rows = _stream_table()
    assert len(rows) == 7 and {r[1] for r in rows} == set(RECORDS)
    for state, records, after in rows:
        for rec in RECORDS[records]:
            for resume in (False, True):
                rs = x.ReceiverStream(resume)
                rs._state = state.lower()
                rs._file = x.Entry("a", "file", 5, 0, 0)
                rs._left = 0 if records == "END, ABORT" else 5
                rs.feed(rec)
                want = "OFFSET" if resume and "OFFSET" in after else after.split()[0]
                assert rs._state == want.lower(), (state, records, resume)
        for other, recs in RECORDS.items():  # every record the row does not name is refused
            if any(r[0] == state and r[1] == other for r in rows) or other == "DATA":
                continue
            rs = x.ReceiverStream(resume=True)
            rs._state = state.lower()
            rs._file = x.Entry("a", "file", 5, 0, 0)
            with pytest.raises(RemoteProtocolError):
                rs.feed(recs[0])


def test_the_server_may_grow_a_channels_stdin_window(pair: Any) -> None:
    from rexec.protocol.events import CreditReceived

    ch = pair.client.send_xfer(x.XferRequest("put", ("d",), window=1024))
    pair.c2s()
    base = pair.client.stdin_room(ch)
    pair.server.grow_stdin_window(ch, 8 << 20)
    pair.server.grow_stdin_window(ch, 1 << 20)  # never shrinks, sends nothing
    assert pair.s2c() == [CreditReceived(ch, 8 << 20)] and base < 8 << 20
    pair.client.send_stdin(ch, bytes(8 << 20))  # the whole window may be used at once
    assert len(pair.c2s()) == 32


def small(e: x.Entry, data: bytes) -> bytes:
    made = x.small_file(e, len(data))
    assert made is not None
    buf, at = made
    buf[at : at + len(data)] = data
    return body(x.seal_file(buf, hashlib.sha256(data).digest()))


def test_a_small_file_goes_as_one_record() -> None:
    e = x.Entry("d/a", "file", 5, 0o644, 1700000000000000000)
    rec = small(e, b"hello")
    header = b'{"path":"d/a","kind":"file","mode":420,"mtime_ns":1700000000000000000,"size":5}'
    assert rec == b"\x09\x00\x4f" + header + b"hello" + SHA  # PROTOCOL.md 17.6
    what, (got, data, digest) = start().feed(rec)
    assert (what, got, bytes(data), digest) == ("file", e, b"hello", SHA)
    assert x.small_file(x.Entry("big", "file", MAX_PAYLOAD, 0, 0), MAX_PAYLOAD) is None
    with pytest.raises(RemoteProtocolError, match="FILE"):
        start(resume=True).feed(rec)  # resume needs the HAVE round trip: no FILE
    with pytest.raises(RemoteProtocolError, match="size"):
        start().feed(small(x.Entry("a", "file", 4, 0, 0), b"hello"))
    with pytest.raises(RemoteProtocolError, match="short"):
        start().feed(b"\x09\x00")
    with pytest.raises(RemoteProtocolError):
        start().feed(small(x.Entry("a", "dir", 0, 0, 0), b""))
    rs = start()
    rs.feed(file_entry())
    with pytest.raises(RemoteProtocolError, match="out of order"):
        rs.feed(rec)  # inside another file's data


def test_names_that_are_not_utf8_go_as_surrogate_escapes() -> None:
    """A name os gives with lone surrogates (its bytes are not UTF-8) crosses as `\\udcXX`
    escapes in valid UTF-8 JSON and decodes to the same str (so to the same bytes); a
    surrogate no byte maps to is a protocol error, not a crash."""
    name = b"d/bad\xffname".decode("utf-8", "surrogateescape")
    target = b"to\xfe".decode("utf-8", "surrogateescape")
    e = x.Entry(name, "file", 5, 0o644, 1)
    link = x.Entry(name + "l", "symlink", 0, 0o777, 1, target)
    for rec in (x.entry(e), x.entry(link), x.fail(name, "file", f"{name}: gone")):
        body(rec)[1:].decode("utf-8")  # valid UTF-8
    assert b'"path":"d/bad\\udcffname"' in body(x.entry(e))
    rs = start()
    assert rs.feed(body(x.entry(link))) == ("entry", link)
    assert rs.feed(body(x.fail(name, "file", "x"))) == ("fail", (name, "file", "x"))
    assert x.one_line(name) == "d/bad\\udcffname"
    sender = x.SenderStream()
    sender.sent(name)
    ok = x.Result(name, "ok", SHA.hex(), None)
    assert sender.feed(body(x.result(ok))) == ("result", ok)
    req = x.XferRequest("get", (name,), window=1)
    assert x.XferRequest.from_json(req.to_json()) == req
    for bad in ("a\ud800", "\udfff"):
        with pytest.raises(RemoteProtocolError, match="neither UTF-8 nor bytes"):
            start().feed(raw(0x02, {"path": bad, "kind": "dir", "mode": 0, "mtime_ns": 0}))
        with pytest.raises(RemoteProtocolError, match="neither UTF-8 nor bytes"):
            x.XferRequest.from_json(x.XferRequest("put", (bad,), window=1).to_json())


def test_a_time_before_the_epoch_goes_as_zero() -> None:
    """mtime_ns is unsigned on the wire: the encoder clamps, so the peer never refuses it."""
    for kind, target in (("file", None), ("dir", None), ("symlink", "t")):
        e = x.Entry("a", kind, 0, 0o644, -315_619_200_000_000_000, target)
        assert json.loads(body(x.entry(e))[1:])["mtime_ns"] == 0
        assert start().feed(body(x.entry(e)))[1].mtime_ns == 0
