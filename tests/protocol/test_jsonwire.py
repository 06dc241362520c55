"""rexec.protocol.jsonwire gives exactly json's results: same text out, same value or error in."""

from __future__ import annotations

import json

import pytest

from rexec.protocol import jsonwire

VALUES = [
    {
        "argv": ["a", "é", '\x00\n"\\', "\U0001f600"],
        "env": {"A": "1"},
        "timeout": 1.5,
        "stdin": True,
        "window": 8388608,
        "pty": {"term": "xterm", "rows": 24, "modes": {"echo": True, "intr": 3}},
    },
    {"x": float("nan"), "y": float("-inf"), "z": -0.0, "big": 10**30, "n": None, "l": []},
    "str",
    5,
    [1, 2.5e-10, False],
]

DOCS = [
    b'{"a":1}',
    b' {"a": [1, 2.5, "x\\u00e9"], "b": null} \n',
    b'\xef\xbb\xbf{"a":1}',  # a UTF-8 BOM: json.loads reads it from bytes
    '{"a":1}'.encode("utf-16"),
    b'{"a":1} x',
    b"",
    b"  ",
    b"NaN",
    b'{"a":NaN}',
    b'{"a":"\x01"}',
    b"[1,",
    b"\xff",
    b'"s"',
    b'{"a":1,"a":2}',
    b"1e400",
    b"[" * 100 + b"]" * 100,
]


def _refuse(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


@pytest.mark.parametrize("value", VALUES)
def test_dumps_is_json_dumps_compact(value: object) -> None:
    assert jsonwire.dumps(value) == json.dumps(value, separators=(",", ":"))


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsonwire.dumps({"a": object()})


def _outcome(fn: object, doc: bytes) -> tuple[str, object]:
    try:
        return ("ok", fn(doc, parse_constant=_refuse))  # type: ignore[operator]
    except ValueError as exc:
        return ("error", f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("doc", DOCS)
def test_loads_is_json_loads(doc: bytes) -> None:
    assert repr(_outcome(jsonwire.loads, doc)) == repr(_outcome(json.loads, doc))
