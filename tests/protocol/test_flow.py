"""Per-channel flow control and the sender's queue, in memory (PROTOCOL.md section 12.3)."""

from __future__ import annotations

from typing import Any

import pytest

from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol.events import (
    CreditReceived,
    ExitReceived,
    OutputReceived,
    PongReceived,
    StdinClosed,
    StdinReceived,
)
from rexec.protocol.frames import HEADROOM, INNER, LENGTH, MAX_PAYLOAD, FrameType
from rexec.protocol.messages import STDIN_WINDOW, ExitStatus
from rexec.protocol.noise import TAGLEN

MiB = 1024 * 1024


def _frames(data: bytes) -> list[int]:
    """The body lengths of the frames in `data`."""
    out, off = [], 0
    while off < len(data):
        (n,) = LENGTH.unpack_from(data, off)
        out.append(n)
        off += 4 + n
    assert off == len(data)
    return out


def _exec(p: Any, *, stdin: bool = False, window: int | None = None) -> int:
    ch = int(p.client.send_exec(["cat"], stdin=stdin, window=window))
    assert [type(e).__name__ for e in p.c2s()] == ["ExecReceived"]
    return ch


# ---- stdin: the server's window ------------------------------------------------------


def test_stdin_room_starts_at_the_servers_window_and_credit_grows_it(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    assert pair.client.stdin_room(ch) == STDIN_WINDOW == pair.server.window
    pair.client.send_stdin(ch, bytes(STDIN_WINDOW))
    assert pair.client.stdin_room(ch) == 0
    with pytest.raises(LocalProtocolError, match="exceeds channel 1's window"):
        pair.client.send_stdin(ch, b"x")
    events = pair.c2s()
    assert sum(len(e.data) for e in events) == STDIN_WINDOW
    assert all(isinstance(e, StdinReceived) for e in events)
    # consumed, but less than half the window: no CREDIT yet
    pair.server.stdin_consumed(ch, STDIN_WINDOW // 2 - 1)
    assert pair.server.data_to_send() == b""
    pair.server.stdin_consumed(ch, 1)
    assert pair.s2c() == [CreditReceived(ch, STDIN_WINDOW // 2)]
    assert pair.client.stdin_room(ch) == STDIN_WINDOW // 2


def test_stdin_beyond_the_window_is_a_protocol_error(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    pair.client.send_stdin(ch, bytes(STDIN_WINDOW))
    pair.c2s()
    assert pair.client._send is not None
    inner = INNER.pack(FrameType.STDIN, 0, 0, ch) + b"y"
    ct = pair.client._send.encrypt(b"", inner)
    with pytest.raises(RemoteProtocolError, match="exceeds the window"):
        pair.server.receive_data(LENGTH.pack(len(ct)) + ct)


def test_stdin_room_is_zero_once_stdin_is_closed(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    pair.client.send_stdin_eof(ch)
    assert pair.client.stdin_room(ch) == 0
    with pytest.raises(LocalProtocolError, match="closed or was not requested"):
        pair.client.send_stdin(ch, b"x")
    assert pair.c2s() == [StdinClosed(ch)]
    # a CREDIT crossing our STDIN_EOF is accepted, and changes nothing
    pair.server.stdin_consumed(ch, STDIN_WINDOW)
    assert pair.s2c() == [CreditReceived(ch, STDIN_WINDOW * 2)]
    assert pair.client.stdin_room(ch) == 0


# ---- output: the client's window -----------------------------------------------------


def test_output_window_is_the_execs_and_shared_by_stdout_and_stderr(pair: Any) -> None:
    ch = _exec(pair, window=10)
    assert pair.server.output_room(ch) == 10
    pair.server.send_output(ch, 1, b"12345")
    pair.server.send_output(ch, 2, b"678")
    assert pair.server.output_room(ch) == 2
    with pytest.raises(LocalProtocolError, match="exceeds channel 1's window"):
        pair.server.send_output(ch, 1, b"abc")
    assert [type(e).__name__ for e in pair.s2c()] == ["OutputReceived"] * 2
    pair.client.output_consumed(ch, 4)  # under half of 10: nothing yet
    assert pair.client.data_to_send() == b""
    pair.client.output_consumed(ch, 4)
    assert pair.c2s() == [CreditReceived(ch, 10)]
    assert pair.server.output_room(ch) == 10


def test_output_beyond_the_window_is_a_protocol_error(pair: Any) -> None:
    ch = _exec(pair, window=3)
    assert pair.server._send is not None
    inner = INNER.pack(FrameType.STDOUT, 0, 0, ch) + b"four"
    ct = pair.server._send.encrypt(b"", inner)
    with pytest.raises(RemoteProtocolError, match="STDOUT of 4 bytes on channel 1 exceeds"):
        pair.client.receive_data(LENGTH.pack(len(ct)) + ct)


def test_no_credit_for_an_ended_channel(pair: Any) -> None:
    ch = _exec(pair, window=4)
    pair.server.send_output(ch, 1, b"abcd")
    pair.server.send_exit(ch, ExitStatus(0))
    pair.s2c()
    pair.client.output_consumed(ch, 4)  # the application reads after the EXIT
    assert pair.client.data_to_send() == b""


def test_output_arrives_as_the_bytearray_it_was_decrypted_into(pair: Any) -> None:
    ch = _exec(pair)
    pair.server.send_output(ch, 1, b"payload")
    (event,) = pair.s2c()
    assert isinstance(event, OutputReceived) and type(event.data) is bytearray
    assert event.data == b"payload"


# ---- the sender's queue: control frames first, EXIT last -----------------------------


def test_control_frames_overtake_data_the_socket_has_not_taken(pair: Any) -> None:
    ch = _exec(pair)
    pair.server.send_output(ch, 1, bytes(MiB))
    assert pair.server.pending_data == MiB and pair.server.has_pending
    pair.client.send_ping(b"are you there")
    assert pair.c2s() == []
    # the driver's socket is full: it pulls control frames only
    first = pair.server.data_to_send(0)
    assert _frames(first) == [HEADROOM + len(b"are you there") + TAGLEN]
    assert pair.client.receive_data(first) == [PongReceived(b"are you there")]
    rest = pair.server.data_to_send()
    assert _frames(rest) == [HEADROOM + MAX_PAYLOAD + TAGLEN] * 4
    events = pair.client.receive_data(rest)  # nonces follow the wire order
    assert sum(len(e.data) for e in events) == MiB and pair.server.pending_data == 0


def test_a_limit_pulls_data_a_frame_at_a_time(pair: Any) -> None:
    ch = _exec(pair)
    pair.server.send_output(ch, 1, bytes(MiB))
    assert len(_frames(pair.server.data_to_send(1))) == 1
    assert pair.server.pending_data == MiB - MAX_PAYLOAD
    frame = 4 + HEADROOM + MAX_PAYLOAD + TAGLEN
    assert len(_frames(pair.server.data_to_send(frame))) == 1
    assert len(_frames(pair.server.data_to_send(frame + 1))) == 2


def test_exit_error_and_close_wait_behind_their_channels_data(pair: Any) -> None:
    ch = _exec(pair)
    pair.server.send_output(ch, 1, b"last words")
    pair.server.send_channel_error(ch, 8, "oops")
    pair.server.send_exit(ch, ExitStatus(1))
    pair.server.send_close()
    assert pair.server.data_to_send(0) == b""  # nothing may overtake the output
    events = pair.s2c()
    assert [type(e).__name__ for e in events] == [
        "OutputReceived",
        "ErrorReceived",
        "ExitReceived",
        "CloseReceived",
    ]
    assert events[2] == ExitReceived(ch, ExitStatus(1))


def test_stdin_eof_waits_behind_the_stdin(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    pair.client.send_stdin(ch, b"data")
    pair.client.send_stdin_eof(ch)
    pair.client.send_signal(ch, 15)
    first = pair.client.data_to_send(0)
    assert [type(e).__name__ for e in pair.server.receive_data(first)] == ["SignalReceived"]
    assert pair.c2s() == [StdinReceived(ch, b"data"), StdinClosed(ch)]


def test_a_buffer_with_headroom_is_framed_in_place(make_pair: Any) -> None:
    def stream(use_buffer: bool) -> bytes:
        p = make_pair()
        p.handshake()
        ch = _exec(p)
        payload = bytes(range(256)) * 100
        if use_buffer:
            buf = bytearray(HEADROOM) + payload
            p.server.send_output_buffer(ch, 1, buf)
        else:
            p.server.send_output(ch, 1, payload)
        (event,) = p.s2c()
        return bytes(event.data)

    assert stream(True) == stream(False) == bytes(range(256)) * 100


def test_headroom_buffers_are_checked(pair: Any) -> None:
    ch = _exec(pair, window=8)
    with pytest.raises(LocalProtocolError, match="is not a payload"):
        pair.server.send_output_buffer(ch, 1, bytearray(HEADROOM - 1))
    with pytest.raises(LocalProtocolError, match="exceeds channel 1's window"):
        pair.server.send_output_buffer(ch, 1, bytearray(HEADROOM + 9))


def test_big_frames_are_written_apart_small_ones_together(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    pair.client.send_ping(b"a")
    pair.client.send_stdin(ch, bytes(MAX_PAYLOAD + 10))
    pair.client.send_signal(ch, 2)
    bufs = pair.client.buffers_to_send()
    # PING + SIGNAL (control, joined), then the big STDIN frame, then the small one
    assert [len(_frames(bytes(b))) for b in bufs] == [2, 1, 1]
    events = pair.server.receive_data(b"".join(bufs))
    assert [type(e).__name__ for e in events] == [
        "SignalReceived",
        "StdinReceived",
        "StdinReceived",
    ]


def test_pong_after_our_close_is_not_sent_even_with_data_pending(pair: Any) -> None:
    ch = _exec(pair, stdin=True)
    pair.client.send_stdin(ch, b"x")
    pair.client.send_close()
    pair.server.send_ping(b"p")
    assert pair.client.receive_data(pair.server.data_to_send()) == []
    events = pair.c2s()
    assert [type(e).__name__ for e in events] == ["StdinReceived", "CloseReceived"]
