"""FramedProtocol's write side against a transport that never drains (a slow peer)."""

from __future__ import annotations

import pytest

from rexec.protocol.client import ClientConnection
from rexec.protocol.frames import MAX_PAYLOAD
from rexec.protocol.messages import ServerInfo
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import generate_token
from rexec.transport import MAX_BACKLOG, WRITE_HIGH, FramedProtocol

INFO = ServerInfo(server="t", user="u", host="h", max_payload=MAX_PAYLOAD, max_channels=64)
MiB = 1024 * 1024


class StuckTransport:
    """asyncio's write buffer as the protocol sees it: writes pile up, nothing leaves, and
    pause_writing() comes once the buffer exceeds the high-water mark."""

    def __init__(self, protocol: FramedProtocol, already: int) -> None:
        self.protocol = protocol
        self.size = already
        self.paused = False
        self.aborted = False

    def write(self, data: bytes | bytearray) -> None:
        self.size += len(data)
        if self.size > WRITE_HIGH and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.size

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def _server_with_channels(channels: int) -> ServerConnection:
    token = generate_token()
    client = ClientConnection(token)
    server = ServerConnection({token.key_id: token.secret}.get, INFO)
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for _ in range(channels):
        client.send_exec(["cat"])
    server.receive_data(client.data_to_send())  # AUTH and the EXECs
    assert len(server.channels) == channels
    return server


@pytest.mark.parametrize("already", [0, 600 * 1024, 2 * MiB + 600 * 1024, WRITE_HIGH - 1])
def test_output_queued_for_many_channels_never_looks_like_a_peer_that_does_not_read(
    already: int,
) -> None:
    """A reading but slow peer: one chunk pending per channel (24 of them) must not push
    the write buffer past the drop threshold, wherever the buffer stood."""
    server = _server_with_channels(24)
    proto = FramedProtocol(server, lambda events: None, lambda error: None)
    transport = StuckTransport(proto, already)
    proto.transport = transport  # type: ignore[assignment]
    for channel in server.channels:
        server.send_output(channel, 1, bytes(MAX_PAYLOAD))
    proto.flush()
    assert not transport.aborted, proto.dropped
    assert transport.size <= WRITE_HIGH + 4 + MAX_PAYLOAD + 24 + MAX_BACKLOG // 2
    assert server.has_pending  # the rest waits, unencrypted, for resume_writing()
