"""The EXEC `pty` member: the client's PtyRequest, its JSON, and the server's validation."""

from __future__ import annotations

import json
import termios
from typing import Any

import pytest

from rexec.errors import LocalProtocolError, RemoteProtocolError
from rexec.protocol.messages import OUTPUT_WINDOW, exec_request_json
from rexec.protocol.models import parse_exec_request
from rexec.protocol.pty import PtyRequest, apply_modes, read_modes


def test_request_json_round_trip() -> None:
    req = PtyRequest("xterm-256color", 40, 120, {"erase": 127, "intr": 3, "echo": True})
    body = exec_request_json("sh -i", stdin=True, pty=req)
    assert json.loads(body) == {
        "command": "sh -i",
        "stdin": True,
        "window": OUTPUT_WINDOW,
        "pty": {
            "term": "xterm-256color",
            "rows": 40,
            "cols": 120,
            "modes": {"erase": 127, "intr": 3, "echo": True},
        },
    }
    parsed = parse_exec_request(body)
    assert parsed.pty is not None
    assert parsed.pty.request() == req
    assert parse_exec_request(exec_request_json("true")).pty is None
    assert b"modes" not in exec_request_json("true", pty=PtyRequest())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x y", 24, 80), "terminal type"),
        (("", 24, 80), "terminal type"),
        (("a" * 65, 24, 80), "terminal type"),
        (("xterm", 65536, 80), "rows"),
        (("xterm", 24, -1), "cols"),
        (("xterm", 24, True), "cols"),
        (("xterm", 24, 80, {"erase": 256}), "erase"),
        (("xterm", 24, 80, {"intr": True}), "intr"),
        (("xterm", 24, 80, {"echo": 1}), "echo"),
    ],
)
def test_client_refuses_bad_requests(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        PtyRequest(*args)


@pytest.mark.parametrize(
    ("pty", "message"),
    [
        ({"term": "x\ny", "rows": 1, "cols": 1}, "terminal type"),
        ({"term": "xterm", "rows": 70000, "cols": 1}, "rows"),
        ({"term": "xterm", "rows": "24", "cols": 80}, "pty.rows"),
        ({"term": "xterm", "rows": 24}, "pty.cols"),
        ({"term": "xterm", "rows": 24, "cols": 80, "extra": 1}, "pty.extra"),
        ({"term": "xterm", "rows": 24, "cols": 80, "modes": {"echo": 1}}, "echo"),
        ({"term": "xterm", "rows": 24, "cols": 80, "modes": {"erase": 300}}, "erase"),
        ({"term": "xterm", "rows": 24, "cols": 80, "modes": {"x": "s"}}, "pty.modes"),
        (True, "pty"),
    ],
)
def test_server_refuses_bad_pty(pty: Any, message: str) -> None:
    body = json.dumps({"command": "sh", "window": 0, "pty": pty}).encode()
    with pytest.raises(RemoteProtocolError, match=message):
        parse_exec_request(body)


def test_server_ignores_unknown_modes() -> None:
    body = (
        b'{"command":"sh","window":0,"pty":{"term":"xterm","rows":2,"cols":3,"modes":{"future":5}}}'
    )
    parsed = parse_exec_request(body)
    assert parsed.pty is not None and parsed.pty.modes == {"future": 5}


def test_modes_read_and_apply() -> None:
    attrs: list[Any] = [0, 0, 0, termios.ECHO, 0, 0, [b"\0"] * 32]
    changed = apply_modes(attrs, {"erase": 8, "intr": 7, "echo": False, "iutf8": True, "x": 1})
    assert attrs[3] == termios.ECHO and attrs[6][termios.VERASE] == b"\0"  # a copy
    modes = read_modes(changed)
    assert modes["erase"] == 8 and modes["intr"] == 7 and modes["quit"] == 0
    assert modes["echo"] is False and modes["iutf8"] is True
    assert read_modes(apply_modes(changed, modes)) == modes
