"""Explicit states: PROTOCOL.md section 12's tables are the code's tables, and the
connection and channels move through them as a real conversation goes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from rexec.errors import LocalProtocolError, RemoteProtocolError, TruncatedError
from rexec.protocol.messages import ExitStatus
from rexec.protocol.states import (
    CHANNEL_TRANSITIONS,
    CONN_TRANSITIONS,
    ChannelEvent,
    ChannelState,
    ConnEvent,
    ConnState,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _section_12() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## 12. ")
    return text[start : text.index("\n## 13. ", start)]


def _tables(first_column: str) -> list[list[list[str]]]:
    """Every markdown table in section 12 whose header starts with `first_column`."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for line in _section_12().splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if rows is None:
            rows = []
            if cells[0] == first_column:
                tables.append(rows)
            continue
        if not re.fullmatch(r"[-: |]+", line):
            rows.append(cells)
    return tables


def _doc_transitions(kind: str) -> set[tuple[str, str, str]]:
    tables = [t for t in _tables(f"{kind} state") if t and len(t[0]) == 3]
    assert len(tables) == 1, f"section 12 must have one {kind} transition table"
    return {(s, e, n) for s, e, n in tables[0]}


def _doc_states(kind: str) -> set[str]:
    tables = [t for t in _tables(f"{kind} state") if t and len(t[0]) == 2]
    assert len(tables) == 1, f"section 12 must have one table of {kind} states"
    return {row[0] for row in tables[0]}


def test_connection_table_in_the_document_is_the_codes() -> None:
    code = {(s.name, e.name, n.name) for (s, e), n in CONN_TRANSITIONS.items()}
    assert _doc_transitions("connection") == code
    assert _doc_states("connection") == {s.name for s in ConnState}
    assert {e for _, e, _ in code} == {e.name for e in ConnEvent}


def test_channel_table_in_the_document_is_the_codes() -> None:
    code = {(s.name, e.name, n.name) for (s, e), n in CHANNEL_TRANSITIONS.items()}
    assert _doc_transitions("channel") == code
    assert _doc_states("channel") == {s.name for s in ChannelState}
    assert {e for _, e, _ in code} == {e.name for e in ChannelEvent}


def test_the_document_check_can_fail() -> None:
    """The parser sees a changed row (so the comparison above is not vacuous)."""
    rows = _doc_transitions("connection")
    assert ("OPEN", "SEND_CLOSE", "CLOSE_SENT") in rows
    assert ("OPEN", "SEND_CLOSE", "CLOSED") not in rows
    assert len(rows) == len(CONN_TRANSITIONS) > 10


def test_states_are_read_only(pair: Any) -> None:
    with pytest.raises(AttributeError):
        pair.client.state = ConnState.DONE  # type: ignore[misc]
    ch = pair.client.send_exec("true")
    with pytest.raises(TypeError):
        pair.client.channels[ch] = pair.client.channels[ch]  # type: ignore[index]
    with pytest.raises(AttributeError):
        pair.client.channels[ch].state = ChannelState.CLOSED  # type: ignore[misc]


def test_a_whole_conversation_walks_the_tables(make_pair: Any) -> None:
    p = make_pair()
    assert (p.client.state, p.server.state) == (ConnState.HANDSHAKE, ConnState.HANDSHAKE)
    p.client.initiate()
    p.c2s()
    assert p.server.state is ConnState.AUTHENTICATING
    p.s2c()
    assert p.client.state is ConnState.OPEN
    p.c2s()
    assert p.server.state is ConnState.OPEN

    ch = p.client.send_exec(["cat"], stdin=True)
    assert p.client.channel_state(ch) is ChannelState.STDIN_OPEN
    assert p.server.channel_state(ch) is ChannelState.UNUSED
    p.c2s()
    assert p.server.channel_state(ch) is ChannelState.STDIN_OPEN
    assert p.server.channel_state(ch + 1) is ChannelState.UNUSED
    p.client.send_stdin_eof(ch)
    assert p.client.channel_state(ch) is ChannelState.STDIN_CLOSED
    p.c2s()
    assert p.server.channel_state(ch) is ChannelState.STDIN_CLOSED
    p.server.send_exit(ch, ExitStatus(0))
    assert p.server.channel_state(ch) is ChannelState.CLOSED
    p.s2c()
    assert p.client.channel_state(ch) is ChannelState.CLOSED and not p.client.channels

    p.client.send_close()
    assert p.client.state is ConnState.CLOSE_SENT
    p.c2s()
    assert p.server.state is ConnState.CLOSE_RECEIVED
    p.server.send_close()
    assert p.server.state is ConnState.CLOSED
    p.s2c()
    assert p.client.state is ConnState.CLOSED
    p.client.receive_eof()
    p.server.receive_eof()
    assert (p.client.state, p.server.state) == (ConnState.DONE, ConnState.DONE)
    assert p.client.close_sent and p.client.close_received and p.client.eof_received


def test_rejected_exec_channel(pair: Any) -> None:
    from rexec.protocol.frames import FrameType

    ch = pair.client.last_channel + 1
    pair.client._queue_frame(FrameType.EXEC, ch, b"{}")
    events = pair.c2s()
    assert type(events[0]).__name__ == "ExecRejected"
    assert pair.server.channel_state(ch) is ChannelState.REJECTED


def test_peer_closed_and_ended_then_we_close(pair: Any) -> None:
    pair.client.send_close()
    pair.c2s()
    pair.server.receive_eof()  # the client closed and half-closed at once
    assert pair.server.state is ConnState.PEER_ENDED
    pair.server.send_close()  # we may still say CLOSE
    assert pair.server.state is ConnState.DONE
    with pytest.raises(LocalProtocolError, match="in state DONE"):
        pair.server.send_ping()


def test_truncation_and_failure_states(make_pair: Any) -> None:
    p = make_pair()
    p.handshake()
    with pytest.raises(TruncatedError):
        p.server.receive_eof()
    assert p.server.state is ConnState.FAILED
    p = make_pair()
    p.handshake()
    p.client.send_close()
    with pytest.raises(TruncatedError):
        p.client.receive_eof()
    assert p.client.state is ConnState.DONE and not p.client.close_received
    p = make_pair()
    p.handshake()
    with pytest.raises(RemoteProtocolError):
        p.server.receive_data(b"\x00\x00\x00\x01")  # a length below the minimum
    assert p.server.state is ConnState.FAILED
    p.server.farewell(1, "bye")  # may still say why, once
    assert p.server.state is ConnState.DONE and p.server.close_sent
    assert p.s2c()[-1].__class__.__name__ == "CloseReceived"
