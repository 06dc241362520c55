"""Interop with an independent Noise implementation: the `noiseprotocol` package."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")

noise_conn = pytest.importorskip("noise.connection", reason="noiseprotocol (dev extra) missing")
NoiseConnection = noise_conn.NoiseConnection
Keypair = noise_conn.Keypair

from rexec.protocol.noise import NNpsk0Handshake, Suite  # noqa: E402

PROLOGUE = b"RXEC\x01\x01\x00\x00abcdefgh"


def _peer(suite: Suite, *, initiator: bool, psk: bytes, ephemeral: bytes | None) -> object:
    conn = NoiseConnection.from_name(suite.protocol_name)
    conn.set_psks(psk=psk)
    conn.set_prologue(PROLOGUE)
    if ephemeral is not None:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-e", "random-e"])
@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-init", "we-resp"])
def test_interop(suite: Suite, fixed: bool, we_initiate: bool) -> None:
    psk = os.urandom(32)
    e_ours = os.urandom(32) if fixed else None
    e_peer = os.urandom(32) if fixed else None
    ours = NNpsk0Handshake(
        suite, initiator=we_initiate, prologue=PROLOGUE, psk=psk, ephemeral=e_ours
    )
    peer = _peer(suite, initiator=not we_initiate, psk=psk, ephemeral=e_peer)
    if we_initiate:
        assert bytes(peer.read_message(ours.write_message_1(b"hello"))) == b"hello"  # type: ignore[attr-defined]
        assert ours.read_message_2(bytes(peer.write_message(b"info"))) == b"info"  # type: ignore[attr-defined]
    else:
        assert ours.read_message_1(bytes(peer.write_message(b"hello"))) == b"hello"  # type: ignore[attr-defined]
        assert bytes(peer.read_message(ours.write_message_2(b"info"))) == b"info"  # type: ignore[attr-defined]
    assert peer.handshake_finished  # type: ignore[attr-defined]
    assert ours.handshake_hash == peer.get_handshake_hash()  # type: ignore[attr-defined]
    send, recv = ours.split()
    for i in range(5):
        msg = os.urandom(100 + i)
        assert peer.decrypt(send.encrypt(b"", msg)) == msg  # type: ignore[attr-defined]
        back = os.urandom(50 + i)
        assert recv.decrypt(b"", peer.encrypt(back)) == back  # type: ignore[attr-defined]


def test_wrong_psk_is_rejected_by_peer() -> None:
    ours = NNpsk0Handshake(Suite.AESGCM, initiator=True, prologue=PROLOGUE, psk=os.urandom(32))
    peer = _peer(Suite.AESGCM, initiator=False, psk=os.urandom(32), ephemeral=None)
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):
        peer.read_message(ours.write_message_1(b""))  # type: ignore[attr-defined]
