"""The three scenarios, each run twice: the tutorial pair, then the framed pair.

Each run returns a Transcript of real bytes; `judge_*` turns it into story lines and the
checks that say whether the lesson held (naive broke exactly as predicted, framed exact).
Every scenario is arranged to come out the same every time: a reader only reads once the
bytes under discussion are all in its socket buffer (see loopback.wait_buffered).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from rexec.demo import framed, naive
from rexec.demo.codec import HEADER_SIZE, MAX_BODY, encode, hex_bytes
from rexec.demo.framed import FramedConnection, FramedServe, FrameLog, FrameRecord
from rexec.demo.loopback import (
    IO_TIMEOUT,
    SILENCE,
    ServerLog,
    recv_or_silence,
    run_pair,
    wait_buffered,
    wait_replies,
    wait_until,
)

SEQ_COMMAND = b"seq 1 2000"
SEQ_OUTPUT = b"".join(b"%d\n" % i for i in range(1, 2001))  # 8893 bytes
ECHO_COMMAND = b"echo hello"
ECHO_OUTPUT = b"hello\n"
STICKY_COMMANDS = (b"echo one", b"echo two")
STICKY_OUTPUTS = (b"one\n", b"two\n")
AFTER_COMMAND = b"echo after"
AFTER_OUTPUT = b"after\n"
OVERSIZE_HEADER = b"\xff\xff\xff\xff"  # announces 4 GiB - 1

NAMES = ("truncation", "sticky", "empty")


@dataclass(frozen=True)
class Check:
    """One claim of the lesson, and whether the bytes bore it out."""

    label: str
    ok: bool


@dataclass
class Transcript:
    """What actually went over one connection, as both ends saw it."""

    server: ServerLog
    client_sent: list[bytes] = field(default_factory=list)  # messages the client sent
    send_returned: list[int] = field(default_factory=list)  # naive: send()'s results
    wire: list[bytes] = field(default_factory=list)  # framed: bytes put on the wire
    client_received: list[bytes | None] = field(default_factory=list)  # None: timed out
    client_chunks: list[bytes] = field(default_factory=list)  # framed: raw recv() results
    queued: int = 0  # bytes still unread in the client's socket at the end
    server_waiting: bool = False  # server was blocked in recv() while the client timed out
    frames: list[FrameRecord] = field(default_factory=list)
    probe: Transcript | None = None  # framed truncation: the oversize-header probe


@dataclass
class Half:
    """One pair's run of a scenario: its transcript, its story and its checks."""

    kind: str  # "naive" or "framed"
    transcript: Transcript
    story: list[str]
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """Every check held."""
        return all(check.ok for check in self.checks)


@dataclass
class ScenarioResult:
    """Both halves of one scenario, or the error that stopped it."""

    name: str
    title: str
    halves: list[Half] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The lesson held: no error, and every check of both halves passed."""
        return self.error is None and len(self.halves) == 2 and all(h.ok for h in self.halves)


def describe(data: bytes | None) -> str:
    """Byte count, first/last bytes and sha256 (first 16 hex digits) of a message."""
    if data is None:
        return f"nothing within {SILENCE} s"
    digest = hashlib.sha256(data).hexdigest()[:16]
    if len(data) <= 24:
        return f"{len(data)} B {data!r}  sha256 {digest}"
    return f"{len(data)} B first {data[:10]!r} last {data[-10:]!r}  sha256 {digest}"


def _line(label: str, text: str) -> str:
    return f"{label:<20} {text}"


def _checks(pairs: list[tuple[str, bool]], log: ServerLog) -> list[Check]:
    """The scenario's own checks plus the one every run needs: the server ended cleanly."""
    checks = [Check(label, ok) for label, ok in pairs]
    checks.append(Check(f"server thread ended cleanly ({log.error or 'no error'})", not log.error))
    return checks


def _pending(log: ServerLog, taken: int) -> int:
    """Bytes the server has sent that the client has not read yet."""
    return sum(len(reply) for reply in log.sent) - taken


def _wait_reply(sock: socket.socket, log: ServerLog, replies: int, taken: int) -> None:
    """Block until the server has sent `replies` more replies and they are all buffered."""
    if wait_replies(log, replies):
        wait_buffered(sock, _pending(log, taken))


def _drain(sock: socket.socket, count: int) -> None:
    """Read and drop `count` buffered bytes (each recv returns at least one, or EOF)."""
    for _ in range(count):
        if count <= 0:
            return
        chunk = sock.recv(count)
        if not chunk:
            return
        count -= len(chunk)


# --- truncation --------------------------------------------------------------------------


def naive_truncation() -> Transcript:
    """A reply longer than 1024 bytes comes back cut; the rest answers the next command."""

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        taken = 0
        for command in (SEQ_COMMAND, ECHO_COMMAND):
            t.client_sent.append(command)
            t.send_returned.append(naive.send(sock, command))
            _wait_reply(sock, log, 1, taken)
            reply = naive.recv(sock)
            taken += len(reply)
            t.client_received.append(reply)
        t.queued = wait_buffered(sock, _pending(log, taken))
        _drain(sock, t.queued)  # hanging up with bytes unread would reset the connection
        return t

    transcript, _ = run_pair(naive.serve, talk)
    return transcript


def framed_truncation(frames: FrameLog | None = None) -> Transcript:
    """The same two commands over frames: all 8893 bytes, then exactly b'hello\\n'."""
    log_frames = FrameLog() if frames is None else frames

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        conn = FramedConnection(sock, "server -> client", log_frames)
        for command in (SEQ_COMMAND, ECHO_COMMAND):
            t.client_sent.append(command)
            t.wire.append(conn.send(command))
            t.client_received.append(conn.recv())
        t.client_chunks = conn.chunks
        return t

    transcript, _ = run_pair(FramedServe(log_frames), talk, nodelay=True)
    transcript.frames = log_frames.records()
    transcript.probe = framed_oversize()
    return transcript


def framed_oversize() -> Transcript:
    """A header announcing 4 GiB is refused as soon as its 4 bytes are read."""

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        wire = OVERSIZE_HEADER + b"x" * 16  # the start of a body that would never end
        sock.sendall(wire)
        t.wire.append(wire)
        try:  # the close is coming, so wait as long as any I/O may take
            t.client_received.append(recv_or_silence(sock, framed.RECV_SIZE, IO_TIMEOUT))
        except ConnectionResetError:
            t.client_received.append(b"")  # closed with our bytes unread: still closed
        return t

    transcript, _ = run_pair(FramedServe(), talk, nodelay=True)
    return transcript


def judge_truncation(naive_t: Transcript, framed_t: Transcript) -> tuple[Half, Half]:
    """Story and checks for both halves of the truncation scenario."""
    nt, ft = naive_t, framed_t
    total = len(SEQ_OUTPUT)
    got = [*nt.client_received, None, None]
    cut = got[0] or b""
    size = naive.RECV_SIZE
    queued_expected = total + len(ECHO_OUTPUT) - 2 * size
    story = [
        _line("client send()", describe(SEQ_COMMAND)),
        _line("server ran it, sent", describe(nt.server.sent[0] if nt.server.sent else None)),
        _line(f"client recv({naive.RECV_SIZE})", describe(got[0])),
        _line("", f"-> the reply, cut at {len(cut)} of {total} bytes"),
        _line("client send()", describe(ECHO_COMMAND) + f"  (expects {ECHO_OUTPUT!r})"),
        _line(f"client recv({naive.RECV_SIZE})", describe(got[1])),
        _line("", f"-> bytes {len(cut)}-{2 * len(cut) - 1} of seq's output, not {ECHO_OUTPUT!r}"),
        _line("still unread", f"{nt.queued} B: every later answer will be out of step"),
    ]
    naive_half = Half(
        "naive",
        nt,
        story,
        _checks(
            [
                (f"`seq 1 2000` printed {total} bytes", nt.server.sent[:1] == [SEQ_OUTPUT]),
                (
                    f"reply cut at exactly {size} of {total} bytes",
                    size < total and got[0] == SEQ_OUTPUT[:size],
                ),
                (
                    f"answer to {ECHO_COMMAND.decode()!r} was bytes {size}-{2 * size - 1} "
                    "of seq's output",
                    2 * size <= total and got[1] == SEQ_OUTPUT[size : 2 * size],
                ),
                (f"{queued_expected} bytes left unread, out of step", nt.queued == queued_expected),
            ],
            nt.server,
        ),
    )
    fgot = [*ft.client_received, None, None]
    probe = ft.probe
    refused = probe.server.refused if probe is not None else None
    story = [
        _line("client sent frame", describe(SEQ_COMMAND)),
        _line("server ran it, sent", describe(ft.server.sent[0] if ft.server.sent else None)),
        _line("client got frame", describe(fgot[0])),
        _line("client sent frame", describe(ECHO_COMMAND)),
        _line("client got frame", describe(fgot[1])),
        _line(
            "oversize probe",
            f"client sent header {hex_bytes(OVERSIZE_HEADER)} (length {2**32 - 1})",
        ),
        _line(
            "",
            f"-> server refused it after {HEADER_SIZE} bytes "
            f"(cap {MAX_BODY}), {probe.server.body_buffered_at_refusal if probe else -1} "
            "body bytes buffered, connection closed",
        ),
    ]
    probe_ok = (
        probe is not None
        and refused is not None
        and refused.length == 2**32 - 1
        and probe.server.body_buffered_at_refusal == 0
        and probe.server.received == []
        and probe.client_received == [b""]
    )
    framed_half = Half(
        "framed",
        ft,
        story,
        _checks(
            [
                (
                    "server got both commands exactly",
                    ft.server.received == [SEQ_COMMAND, ECHO_COMMAND],
                ),
                (
                    f"{total} of {total} bytes of seq's output, sha256 identical",
                    fgot[0] == SEQ_OUTPUT,
                ),
                (f"{ECHO_COMMAND.decode()!r} answered {ECHO_OUTPUT!r}", fgot[1] == ECHO_OUTPUT),
                ("4 GiB header refused before any body byte was buffered", probe_ok),
            ],
            ft.server,
        ),
    )
    if probe is not None:
        framed_half.checks.append(
            Check(
                f"probe server ended cleanly ({probe.server.error or 'no error'})",
                not probe.server.error,
            )
        )
    return naive_half, framed_half


# --- sticky ------------------------------------------------------------------------------


def _settle_first(want: int) -> Callable[[socket.socket, int], None]:
    """A server hook that, before its first recv, waits until `want` bytes have arrived."""

    def settle(conn: socket.socket, index: int) -> None:
        if index == 0:
            wait_buffered(conn, want)

    return settle


def naive_sticky() -> Transcript:
    """Two commands sent back to back arrive in one recv and run as one glued command."""

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        for command in STICKY_COMMANDS:
            t.client_sent.append(command)
            t.send_returned.append(naive.send(sock, command))
        _wait_reply(sock, log, 1, 0)
        t.client_received.append(naive.recv(sock))
        t.client_received.append(recv_or_silence(sock, naive.RECV_SIZE))
        return t

    both = sum(len(c) for c in STICKY_COMMANDS)
    transcript, _ = run_pair(lambda c, log: naive.serve(c, log, _settle_first(both)), talk)
    return transcript


def framed_sticky(frames: FrameLog | None = None) -> Transcript:
    """The same two sends as frames: glued in one recv, split apart exactly by the decoder."""
    log_frames = FrameLog() if frames is None else frames

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        conn = FramedConnection(sock, "server -> client", log_frames)
        for command in STICKY_COMMANDS:
            t.client_sent.append(command)
            t.wire.append(conn.send(command))
        _wait_reply(sock, log, len(STICKY_COMMANDS), 0)
        for _ in STICKY_COMMANDS:
            t.client_received.append(conn.recv())
        t.client_chunks = conn.chunks
        return t

    both = sum(HEADER_SIZE + len(c) for c in STICKY_COMMANDS)
    serve = FramedServe(log_frames, _settle_first(both))
    transcript, _ = run_pair(serve, talk, nodelay=True)
    transcript.frames = log_frames.records()
    return transcript


def judge_sticky(naive_t: Transcript, framed_t: Transcript) -> tuple[Half, Half]:
    """Story and checks for both halves of the sticky scenario."""
    nt, ft = naive_t, framed_t
    glued = b"".join(STICKY_COMMANDS)
    glued_output = b"oneecho two\n"  # what `echo oneecho two` prints
    got = [*nt.client_received, None, None]
    story = [_line("client send()", describe(c)) for c in nt.client_sent]
    story += [
        _line(f"server recv({naive.RECV_SIZE})", describe(nt.server.received[0]))
        if nt.server.received
        else _line("server recv()", "nothing"),
        _line("", "-> both sends in one recv: the server sees one command"),
        _line("server ran it, sent", describe(nt.server.sent[0] if nt.server.sent else None)),
        _line(f"client recv({naive.RECV_SIZE})", describe(got[0])),
        _line(f"client recv({naive.RECV_SIZE})", describe(got[1])),
        _line("", f"-> the answer to {STICKY_COMMANDS[1].decode()!r} never comes"),
    ]
    naive_half = Half(
        "naive",
        nt,
        story,
        _checks(
            [
                (f"server received one glued message {glued!r}", nt.server.received == [glued]),
                (f"client got {glued_output!r}", got[0] == glued_output),
                ("the second answer never came", got[1] is None and len(nt.client_received) == 2),
            ],
            nt.server,
        ),
    )
    fgot = [*ft.client_received, None, None]
    server_chunk = ft.server.recv_chunks[0] if ft.server.recv_chunks else b""
    client_chunk = ft.client_chunks[0] if ft.client_chunks else b""
    story = [_line("client sendall()", describe(w)) for w in ft.wire]
    story += [
        _line(f"server recv({framed.RECV_SIZE})", describe(server_chunk)),
        _line("", f"-> glued again, and the decoder split it: {ft.server.received!r}"),
        _line(f"client recv({framed.RECV_SIZE})", describe(client_chunk)),
        _line("", f"-> two replies in one recv, split: {ft.client_received!r}"),
    ]
    framed_half = Half(
        "framed",
        ft,
        story,
        _checks(
            [
                (
                    f"server's first recv held both frames ({len(server_chunk)} B)",
                    ft.server.recv_chunks[:1] == [b"".join(ft.wire)] and len(ft.wire) == 2,
                ),
                (
                    "server ran each command separately",
                    ft.server.received == list(STICKY_COMMANDS),
                ),
                (
                    f"client's first recv held both replies ({len(client_chunk)} B)",
                    ft.client_chunks[:1] == [b"".join(encode(o) for o in STICKY_OUTPUTS)],
                ),
                (
                    f"client got {STICKY_OUTPUTS[0]!r} then {STICKY_OUTPUTS[1]!r}",
                    fgot[:2] == list(STICKY_OUTPUTS) and len(ft.client_received) == 2,
                ),
            ],
            ft.server,
        ),
    )
    return naive_half, framed_half


# --- empty -------------------------------------------------------------------------------


def naive_empty() -> Transcript:
    """An empty line puts nothing on the wire: server and client then wait for each other."""

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        t.client_sent.append(b"")
        t.send_returned.append(naive.send(sock, b""))
        t.client_received.append(recv_or_silence(sock, naive.RECV_SIZE))
        # The server thread is (or, on a very busy machine, is about to be) in recv().
        t.server_waiting = wait_until(lambda: log.waiting_in_recv) and not log.received
        return t

    transcript, _ = run_pair(naive.serve, talk)
    return transcript


def framed_empty(frames: FrameLog | None = None) -> Transcript:
    """An empty message is a 4-byte frame: it arrives, is answered, and the talk goes on."""
    log_frames = FrameLog() if frames is None else frames

    def talk(sock: socket.socket, log: ServerLog) -> Transcript:
        t = Transcript(server=log)
        conn = FramedConnection(sock, "server -> client", log_frames)
        for command in (b"", AFTER_COMMAND):
            t.client_sent.append(command)
            t.wire.append(conn.send(command))
            t.client_received.append(conn.recv())
        return t

    transcript, _ = run_pair(FramedServe(log_frames), talk, nodelay=True)
    transcript.frames = log_frames.records()
    return transcript


def judge_empty(naive_t: Transcript, framed_t: Transcript) -> tuple[Half, Half]:
    """Story and checks for both halves of the empty-message scenario."""
    nt, ft = naive_t, framed_t
    returned = nt.send_returned[0] if nt.send_returned else -1
    story = [
        _line("client send()", f"{describe(b'')}  -> send() returned {returned}"),
        _line(f"client recv({naive.RECV_SIZE})", describe(nt.client_received[0])),
        _line(
            "server",
            f"still blocked in recv({naive.RECV_SIZE}), {len(nt.server.received)} commands "
            "received: each side waits for the other",
        ),
        _line("client hangs up", "server's recv() returned b'' and it took that as 'client gone'"),
    ]
    naive_half = Half(
        "naive",
        nt,
        story,
        _checks(
            [
                ("send(b'') put 0 bytes on the wire", nt.send_returned == [0]),
                ("the client's recv timed out", nt.client_received == [None]),
                (
                    "the server was still waiting in recv() with nothing received",
                    nt.server_waiting and nt.server.received == [],
                ),
                ("the server then read the hang-up as b''", nt.server.saw_eof),
            ],
            nt.server,
        ),
    )
    fgot = [*ft.client_received, None, None]
    story = [
        _line("client sent frame", f"{describe(b'')}  wire {hex_bytes(ft.wire[0])}")
        if ft.wire
        else _line("client sent frame", "nothing"),
        _line("server got", f"{ft.server.received[:1]!r}: an empty command, not a hang-up"),
        _line("client got frame", describe(fgot[0])),
        _line("client sent frame", describe(AFTER_COMMAND)),
        _line("client got frame", describe(fgot[1])),
        _line("client hangs up", "server's recv() hit EOF between frames: a clean close"),
    ]
    framed_half = Half(
        "framed",
        ft,
        story,
        _checks(
            [
                (
                    "the empty message was 4 bytes on the wire: 00 00 00 00",
                    ft.wire[:1] == [b"\x00\x00\x00\x00"],
                ),
                ("server got b'' then b'echo after'", ft.server.received == [b"", AFTER_COMMAND]),
                (
                    f"client got b'' then {AFTER_OUTPUT!r}",
                    fgot[:2] == [b"", AFTER_OUTPUT] and len(ft.client_received) == 2,
                ),
                ("the hang-up was a clean EOF between frames", ft.server.saw_eof),
            ],
            ft.server,
        ),
    )
    return naive_half, framed_half


# --- running -----------------------------------------------------------------------------

TITLES = {
    "truncation": "a reply longer than one recv(1024)",
    "sticky": "two sends back to back",
    "empty": "an empty line",
}

RUNNERS: dict[
    str,
    tuple[
        Callable[[], Transcript],
        Callable[[FrameLog | None], Transcript],
        Callable[[Transcript, Transcript], tuple[Half, Half]],
    ],
] = {
    "truncation": (naive_truncation, framed_truncation, judge_truncation),
    "sticky": (naive_sticky, framed_sticky, judge_sticky),
    "empty": (naive_empty, framed_empty, judge_empty),
}


def run_scenario(name: str) -> ScenarioResult:
    """Run both halves of one scenario; an unexpected error fails it instead of escaping."""
    result = ScenarioResult(name, TITLES[name])
    run_naive, run_framed, judge = RUNNERS[name]
    try:
        result.halves = list(judge(run_naive(), run_framed(None)))
    except Exception as exc:  # reported as a failed scenario, never a traceback for a class
        result.error = f"{type(exc).__name__}: {exc}"
    return result
