"""The package's layers, read from the source: no import cycles, dependencies point down.

Every import counts, including those inside functions and under TYPE_CHECKING: a lazy import
is still a dependency. `rexec/__init__.py` is the public facade over everything and is left
out of the graph (it imports lazily, and `from rexec import __version__` reaches only it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "rexec"

# layer -> the layers it may import. "base" sits under the sans-I/O core; "leaf" modules are
# shared by the client and server sides, above the core.
BASE = {"rexec._record", "rexec.errors"}
LEAVES = {
    "rexec.address",
    "rexec.heap",
    "rexec.log",
    "rexec.result",
    "rexec.secretfile",
    "rexec.statefile",
    "rexec.tomlfile",
    "rexec.transfer",
    "rexec.transport",
    "rexec.xferengine",
    "rexec.xferfs",
}
ALLOWED = {
    "base": {"base"},
    "protocol": {"base", "protocol"},
    "leaf": {"base", "protocol", "leaf"},
    "client": {"base", "protocol", "leaf", "client"},
    "server": {"base", "protocol", "leaf", "server"},
    "cli": {"base", "protocol", "leaf", "client", "server", "cli", "demo"},
    "demo": {"base", "protocol", "leaf", "demo"},
    "main": {"cli"},
    # test-framework integrations over the public API (the `rexec` facade is not in the graph)
    "pytest_plugin": {"base", "leaf", "client"},
    "testinfra_backend": {"base", "pytest_plugin"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != "rexec" and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items() if n != "rexec"}


def _layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in LEAVES:
        return "leaf"
    if module == "rexec.__main__":
        return "main"
    return module.split(".")[1]


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        assert _layer(module) in ALLOWED, f"{module} is in no layer: add it to test_layers.py"


def test_dependencies_point_down() -> None:
    bad = [
        f"{mod} -> {dep}"
        for mod, deps in _graph().items()
        for dep in sorted(deps)
        if _layer(dep) not in ALLOWED[_layer(mod)]
    ]
    assert bad == [], "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The import reader finds function-level and TYPE_CHECKING imports (it can fail)."""
    src = tmp_path / "m.py"
    src.write_text(
        "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from rexec.server import config\n"
        "def f():\n    from rexec.cli.common import err\n"
    )
    known = {"rexec.server.config", "rexec.cli.common", "rexec.server"}
    assert _imports("rexec.x", src, known) == {"rexec.server.config", "rexec.cli.common"}
