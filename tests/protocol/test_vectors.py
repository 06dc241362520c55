"""The cacophony vectors for NNpsk0 reproduce byte for byte (handshake, hash, transport)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rexec.protocol.noise import NNpsk0Handshake, Suite

NAMES = {s.protocol_name.decode(): s for s in Suite}


def _vectors(shared: Path) -> list[dict[str, Any]]:
    path = shared / "vectors" / "cacophony.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the cacophony vectors ship in ../shared")
    data = json.loads(path.read_text())
    return [v for v in data["vectors"] if v["protocol_name"] in NAMES]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_cacophony_vector(shared_dir: Path, name: str) -> None:
    matching = [v for v in _vectors(shared_dir) if v["protocol_name"] == name]
    assert matching, f"no vector for {name} in cacophony.txt"
    for v in matching:
        suite = NAMES[name]
        init = NNpsk0Handshake(
            suite,
            initiator=True,
            prologue=bytes.fromhex(v["init_prologue"]),
            psk=bytes.fromhex(v["init_psks"][0]),
            ephemeral=bytes.fromhex(v["init_ephemeral"]),
        )
        resp = NNpsk0Handshake(
            suite,
            initiator=False,
            prologue=bytes.fromhex(v["resp_prologue"]),
            psk=bytes.fromhex(v["resp_psks"][0]),
            ephemeral=bytes.fromhex(v["resp_ephemeral"]),
        )
        msgs = v["messages"]
        ct = init.write_message_1(bytes.fromhex(msgs[0]["payload"]))
        assert ct.hex() == msgs[0]["ciphertext"]
        assert resp.read_message_1(ct).hex() == msgs[0]["payload"]
        ct = resp.write_message_2(bytes.fromhex(msgs[1]["payload"]))
        assert ct.hex() == msgs[1]["ciphertext"]
        assert init.read_message_2(ct).hex() == msgs[1]["payload"]
        assert init.handshake_hash.hex() == v["handshake_hash"]
        assert resp.handshake_hash.hex() == v["handshake_hash"]
        i_send, i_recv = init.split()
        r_send, r_recv = resp.split()
        assert len(msgs) > 2, "vector has no transport messages"
        for k, msg in enumerate(msgs[2:]):
            # after the responder's last handshake message, the initiator speaks first
            send, recv = (i_send, r_recv) if k % 2 == 0 else (r_send, i_recv)
            ct = send.encrypt(b"", bytes.fromhex(msg["payload"]))
            assert ct.hex() == msg["ciphertext"], f"transport message {k}"
            assert recv.decrypt(b"", ct).hex() == msg["payload"]
