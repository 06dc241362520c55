"""JSON for the wire's JSON bodies, from the C accelerator behind the `json` package.

`rexec run` encodes an EXEC and decodes a SERVER INFO on every start; the `json` package
imports `re` for its pure-Python fallbacks, which with `typing` costs that start-up several
milliseconds (DESIGN.md 2a). The accelerator `_json` needs neither. The results are those of
`json.dumps(obj, separators=(",", ":"))` and `json.loads(text)`; where `_json` is missing
(another Python), or for a malformed document's error (the accelerator imports
`json.decoder` to raise it), the `json` package is used.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

try:
    import _json

    _c: Any = _json
except ImportError:  # pragma: no cover - CPython has it
    _c = None

_WS = " \t\n\r"  # JSON's whitespace


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: object) -> str:
    """json.dumps(obj, separators=(",", ":")): compact, ASCII-only, keys in insertion order."""
    if _c is None:  # pragma: no cover
        import json

        return json.dumps(obj, separators=(",", ":"))
    if isinstance(obj, str):
        return str(_c.encode_basestring_ascii(obj))
    encode = _c.make_encoder(
        {}, _not_serializable, _c.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return "".join(encode(obj, 0))


class _Decoder:
    """The attributes `_json.make_scanner` reads (those of a default json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    def __init__(self, parse_constant: Callable[[str], Any]) -> None:
        self.parse_constant = parse_constant
        self.memo: dict[str, str] = {}


def loads(raw: bytes, *, parse_constant: Callable[[str], Any]) -> Any:
    """json.loads(raw, parse_constant=...); ValueError (json's own) if it is not one value.

    The fast path takes UTF-8 without a BOM; anything else (UTF-16, a BOM, an error) gets
    json's own reading, so the result and the error are json.loads's in every case.
    """
    if _c is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        start = len(text) - len(text.lstrip(_WS))
        end = len(text.rstrip(_WS))
        if start < end:
            try:
                value, stop = _c.make_scanner(_Decoder(parse_constant))(text, start)
            except (StopIteration, ValueError):
                pass
            else:
                if stop == end:
                    return value
    import json  # not one JSON value in UTF-8 (or no accelerator): json's verdict

    return json.loads(raw, parse_constant=parse_constant)
