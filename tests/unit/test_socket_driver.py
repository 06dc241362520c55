"""The selector driver's send buffer: control frames overtake stdin it has not buffered yet."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import pytest

import rexec.client.sockdriver
from rexec.address import parse_address
from rexec.client.core import ClientCore
from rexec.client.sockdriver import OUT_HIGH_WATER, SocketDriver
from rexec.protocol.events import SignalReceived, StdinReceived
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import STDIN_WINDOW, ServerInfo
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import generate_token

INFO = ServerInfo(server="t", user="u", host="h", max_payload=MAX_PAYLOAD, max_channels=8)


def test_a_signal_overtakes_the_stdin_the_driver_has_not_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    monkeypatch.setattr(rexec.client.sockdriver, "open_socket", lambda *args: ours)
    token = generate_token()
    server = ServerConnection({token.key_id: token.secret}.get, INFO)

    def handshake() -> None:  # then the server stops reading, as a stalled one would
        with contextlib.suppress(OSError):
            while not server.authenticated:
                server.receive_data(theirs.recv(65536))
                theirs.sendall(server.data_to_send())

    thread = threading.Thread(target=handshake)
    thread.start()
    core = ClientCore(token)
    driver = SocketDriver(parse_address("unix:/nowhere"), core)
    events: list[Any] = []
    try:
        driver.connect(10)
        thread.join(10)
        cmd = core.start(["cat"], stdin=True)
        driver.started()
        sent = 0
        while sent < STDIN_WINDOW:  # the whole window, more than the driver buffers
            sent += core.write(cmd, bytes(STDIN_WINDOW - sent))
            driver.flush()
        assert len(driver._out) <= OUT_HIGH_WATER + 4 + 8 + MAX_PAYLOAD + 16  # one frame over
        assert core.conn.pending_data > 0  # the rest waits in the core, unencrypted
        core.signal(cmd, 15)
        driver.flush()
        theirs.setblocking(False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            sum(len(e.data) for e in events if isinstance(e, StdinReceived)) < STDIN_WINDOW
            or SignalReceived(cmd.channel, 15) not in events
        ):
            try:
                data = theirs.recv(1 << 20)
            except BlockingIOError:
                driver.poll()  # the socket has room again: the driver sends more
                continue
            events += server.receive_data(data)
    finally:
        driver.abort()
        theirs.close()
        thread.join(10)
    assert SignalReceived(cmd.channel, 15) in events
    kinds = [type(e).__name__ for e in events]
    signal_at = kinds.index("SignalReceived")
    assert "StdinReceived" in kinds[signal_at:], "the SIGNAL waited behind all the stdin"
    assert "StdinReceived" in kinds[:signal_at]  # (what the driver had buffered went first)
