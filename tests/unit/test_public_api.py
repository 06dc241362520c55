"""The public API is what `rexec` exports, and it is closed: every rexec type that appears in
a public signature is exported too, and the front ends and tests reach no private name of
another module (they use what users can use)."""

from __future__ import annotations

import ast
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import rexec

ROOT = Path(__file__).resolve().parents[2]
# exported classes whose instances only the library makes: their constructors are not API
LIBRARY_MADE = {"Connecting", "OutputStream", "Process", "SyncOutputStream", "SyncProcess"}
PUBLIC_DUNDERS = {"__init__", "__iter__", "__aiter__", "__enter__", "__aenter__", "__await__"}


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert rexec.__all__ == sorted(rexec.__all__)
    for name in rexec.__all__:
        assert getattr(rexec, name) is not None


def _signatures() -> Iterator[tuple[str, Callable[..., Any] | type]]:
    """(where, thing whose annotations are public) for every exported callable and class."""
    for name in rexec.__all__:
        obj = getattr(rexec, name)
        if not inspect.isclass(obj):
            yield name, obj
            continue
        for klass in obj.__mro__:
            if not klass.__module__.startswith("rexec"):
                continue
            yield f"{name} (class attributes)", klass
            for attr, member in vars(klass).items():
                if attr.startswith("_") and attr not in PUBLIC_DUNDERS:
                    continue
                if attr == "__init__" and name in LIBRARY_MADE:
                    continue
                if isinstance(member, property) and member.fget is not None:
                    yield f"{name}.{attr}", member.fget
                elif isinstance(member, classmethod | staticmethod):
                    yield f"{name}.{attr}", member.__func__
                elif inspect.isfunction(member):
                    yield f"{name}.{attr}", member


def _rexec_types(hint: Any) -> Iterator[type]:
    if isinstance(hint, type) and hint.__module__.startswith("rexec"):
        yield hint
    for arg in typing.get_args(hint):
        if isinstance(arg, list):  # Callable[[...], R]
            for item in arg:
                yield from _rexec_types(item)
        else:
            yield from _rexec_types(arg)


def test_every_type_in_a_public_signature_is_exported() -> None:
    exported = {id(getattr(rexec, name)) for name in rexec.__all__}
    missing: dict[str, set[str]] = {}
    seen = 0
    for where, thing in _signatures():
        # modules on `rexec run`'s path import typing for type checkers only (its import
        # costs start-up time): Any is supplied here, every other name must resolve
        hints = typing.get_type_hints(thing, localns={"Any": Any})
        seen += len(hints)
        for hint in hints.values():
            for t in _rexec_types(hint):
                if id(t) not in exported:
                    missing.setdefault(f"{t.__module__}.{t.__qualname__}", set()).add(where)
    assert seen > 100  # the walk did see the API
    assert missing == {}, "\n".join(f"{t}: used by {sorted(w)}" for t, w in missing.items())


def test_the_signature_walk_finds_nested_types() -> None:
    from rexec.client.core import Command

    hint = typing.Callable[[int, list[Command] | None], None]
    assert list(_rexec_types(hint)) == [Command]
    assert list(_rexec_types(types.NoneType)) == []


# ---- no private names across modules ------------------------------------------------------


SELF = {"self", "cls"}
STDLIB = {("os", "_exit")}  # public despite the underscore: how a forked child leaves


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(path: Path, own_module: str = "", attributes: bool = False) -> list[str]:
    """Imports of `_`-prefixed rexec names or modules; with `attributes`, also `x._attr` on
    anything but self/cls."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("rexec") or node.module == own_module:
                continue
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module}")
            found += [f"{node.lineno}: {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rexec" and any(_private(p) for p in parts):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and attributes and _private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in SELF and (owner, node.attr) not in STDLIB:
                found.append(f"{node.lineno}: .{node.attr}")
    return found


def _checked_files() -> Iterator[tuple[Path, str, bool]]:
    """(file, its own module, whether attribute access counts too). The front ends and the
    end-to-end tests use the public API only; the other tests (white-box protocol tests
    among them) may look inside objects, but import nothing private."""
    for path in sorted((ROOT / "rexec" / "cli").glob("*.py")):
        yield path, f"rexec.cli.{path.stem}", True
    for path in sorted((ROOT / "tests").rglob("*.py")):
        yield path, "", "e2e" in path.parts


@pytest.mark.parametrize(
    ("path", "module", "attributes"),
    list(_checked_files()),
    ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else "",
)
def test_front_ends_and_tests_use_no_private_names(
    path: Path, module: str, attributes: bool
) -> None:
    uses = _private_uses(path, module, attributes)
    assert uses == [], f"{path.relative_to(ROOT)} uses private names: {uses}"


def test_the_private_name_checker_can_fail(tmp_path: Path) -> None:
    src = tmp_path / "bad.py"
    src.write_text(
        "from rexec.address import _hidden, parse_address\n"
        "import rexec._record\n"
        "from rexec._record import Record\n"
        "client._driver.poll()\n"
        "self._mine = 1\n"
    )
    assert _private_uses(src) == ["1: _hidden", "2: import rexec._record", "3: from rexec._record"]
    assert _private_uses(src, attributes=True)[-1] == "4: ._driver"
