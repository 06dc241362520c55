"""Fixtures for driving a client and a server connection against each other in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from rexec.protocol.client import ClientConnection
from rexec.protocol.messages import ServerInfo
from rexec.protocol.noise import Suite
from rexec.protocol.server import ServerConnection
from rexec.protocol.token import Token, generate_token

INFO = ServerInfo(
    server="rexec test", user="tester", host="testhost", max_payload=262144, max_channels=64
)


@dataclass
class Pair:
    token: Token
    client: ClientConnection
    server: ServerConnection

    def c2s(self) -> list[object]:
        return list(self.server.receive_data(self.client.data_to_send()))

    def s2c(self) -> list[object]:
        return list(self.client.receive_data(self.server.data_to_send()))

    def handshake(self) -> None:
        self.client.initiate()
        self.c2s()
        self.s2c()
        self.c2s()  # AUTH
        assert self.server.authenticated


PairFactory = Callable[..., Pair]


@pytest.fixture
def make_pair() -> PairFactory:
    def make(suite: Suite = Suite.AESGCM, token: Token | None = None, **server_kw: object) -> Pair:
        tok = token or generate_token()
        keys = {tok.key_id: tok.secret}
        client = ClientConnection(tok, suite)
        server = ServerConnection(keys.get, INFO, **server_kw)  # type: ignore[arg-type]
        return Pair(tok, client, server)

    return make


@pytest.fixture
def pair(make_pair: PairFactory) -> Pair:
    p = make_pair()
    p.handshake()
    return p
