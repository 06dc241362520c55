"""The fixed pair: the same loop as the tutorial, but every message is a length-prefixed frame.

It still reads with recv(1024): the buffer size never mattered. What changes is that the
receiver knows where each message ends, so cut, glued and empty messages all come out
exactly as they were sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from rexec.demo.codec import HEADER_SIZE, MAX_BODY, Frame, FrameDecoder, FrameTooLarge, encode
from rexec.demo.loopback import ServerLog, Settle, run_command
from rexec.errors import RemoteProtocolError, TruncatedError

RECV_SIZE = 1024  # same buffer as the tutorial, on purpose
MAX_COMMANDS = 8


@dataclass(frozen=True)
class FrameRecord:
    """One frame as its receiver decoded it, for --show-frames."""

    route: str  # "client -> server" or "server -> client"
    frame: Frame


class FrameLog:
    """Frames decoded by both ends of one connection, in the order they were decoded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[FrameRecord] = []

    def add(self, route: str, frame: Frame) -> None:
        """Record one decoded frame (called from either thread)."""
        with self._lock:
            self._records.append(FrameRecord(route, frame))

    def records(self) -> list[FrameRecord]:
        """A snapshot of everything decoded so far."""
        with self._lock:
            return list(self._records)


class FramedConnection:
    """A blocking socket that sends and receives whole frames."""

    def __init__(
        self,
        sock: socket.socket,
        route: str,
        frames: FrameLog | None = None,
        before_recv: Settle | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self._sock = sock
        self._route = route  # the direction of the frames this end receives
        self._frames = frames
        self._before_recv = before_recv
        self.decoder = FrameDecoder(max_body)
        self._ready: deque[Frame] = deque()
        self.chunks: list[bytes] = []  # what each recv() returned, to show the splits

    def send(self, body: bytes) -> bytes:
        """Send one frame, header and body in a single write; return the wire bytes."""
        wire = encode(body, self.decoder.max_body)
        self._sock.sendall(wire)
        return wire

    def recv(self) -> bytes | None:
        """Return the next frame's body, or None on a clean EOF between frames.

        EOF inside a frame is TruncatedError; an oversize header is FrameTooLarge.
        """
        # Each recv() brings at least one byte, so a whole frame needs at most this many.
        for _ in range(self.decoder.max_body + HEADER_SIZE + 1):
            if self._ready:
                return self._ready.popleft().body
            if self._before_recv is not None:
                self._before_recv(self._sock, len(self.chunks))
            chunk = self._sock.recv(RECV_SIZE)
            if not chunk:
                if self.decoder.buffered:
                    raise TruncatedError(
                        f"connection closed {self.decoder.buffered} bytes into a frame"
                    )
                return None
            self.chunks.append(chunk)
            for frame in self.decoder.feed(chunk):
                if self._frames is not None:
                    self._frames.add(self._route, frame)
                self._ready.append(frame)
        raise RemoteProtocolError("no complete frame after the most recv() calls one can need")


class FramedServe:
    """The tutorial's server loop, with frames instead of bare recv/send."""

    def __init__(self, frames: FrameLog | None = None, settle: Settle | None = None) -> None:
        self._frames = frames
        self._settle = settle

    def __call__(self, conn: socket.socket, log: ServerLog) -> None:
        """Serve one connection: recv a command frame, run it, reply with one frame."""
        framed = FramedConnection(conn, "client -> server", self._frames, self._settle)
        try:
            for _ in range(MAX_COMMANDS):
                if time.monotonic() > log.deadline:
                    log.error = "server deadline reached"
                    return
                log.waiting_in_recv = True
                try:
                    command = framed.recv()
                except FrameTooLarge as exc:
                    log.refused = exc
                    log.body_buffered_at_refusal = framed.decoder.body_buffered
                    return
                finally:
                    log.waiting_in_recv = False
                if command is None:
                    log.saw_eof = True
                    return
                log.received.append(command)
                output = run_command(command)
                framed.send(output)
                log.sent.append(output)
                log.replies.release()
        finally:
            log.recv_chunks = list(framed.chunks)
