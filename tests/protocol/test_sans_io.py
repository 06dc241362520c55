"""rexec/protocol stays sans-I/O, and the client's import path stays lean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rexec.protocol

BANNED = {"asyncio", "socket", "selectors", "subprocess", "structlog", "threading"}
PROTOCOL_DIR = Path(rexec.protocol.__file__).parent


def test_protocol_imports_no_io_module() -> None:
    files = sorted(PROTOCOL_DIR.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in BANNED, f"{path.name} imports {name}"


def test_client_protocol_path_does_not_load_io_or_pydantic() -> None:
    code = (
        "import sys, rexec.protocol.client, rexec.protocol.token;"
        "print(','.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'asyncio','subprocess','structlog','pydantic'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
