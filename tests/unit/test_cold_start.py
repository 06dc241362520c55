"""`rexec run` imports only what it needs: its imports are its latency (DESIGN.md 2a).

`rexec run` is a new process per command. The target is half the wall time of OpenSSH's
`ssh host true` (~137 ms with curve25519 on a quiet 2-core machine), so ~65 ms end to end,
of which bare Python takes ~20 ms and cryptography's AEAD + X25519 ~15 ms. Every module
below was taken off that path on purpose; what each cost `rexec run` (`python -X importtime`
on a loaded 2-core machine):

- asyncio (~55-70 ms), pydantic (~80 ms, plus schema building), structlog: the server's.
  The CLI drives the sans-I/O core with a blocking selector loop (rexec.client.sockdriver).
- dataclasses (+ inspect, dis, tokenize: ~7-15 ms, plus ~0.3 ms per class): the client's
  value classes are __slots__ classes (rexec._record).
- argparse (+ gettext: ~4-10 ms): `rexec run` has a small option parser of its own.
- pathlib (+ urllib.parse, ipaddress, fnmatch: ~3-7 ms): rexec.client.target works on str paths
  with os.path and imports pathlib, like tomllib, only when a client config file exists.
- cryptography's serialization module (~6-9 ms): public_bytes_raw() does without it.
- hashlib and hmac (~3 ms: _hashlib initialises its own OpenSSL): the Noise handshake and
  the AUTH proof use the interpreter's own SHA-256 module (rexec.protocol._crypto).
- typing and re (~5-8 ms together), json (which imports re), base64 (re), and cryptography's
  Python layer (cryptography.exceptions, .hazmat.primitives: they import typing): modules on
  the path import typing only for type checkers, parse JSON with the accelerator behind json
  (rexec.protocol.jsonwire), use binascii, and take cryptography's Rust binding directly;
  InvalidTag is imported only when a frame fails authentication.

enum is not listed: socket imports it anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rexec.protocol.token import generate_token

FORBIDDEN = (
    "asyncio",
    "pydantic",
    "structlog",
    "dataclasses",
    "inspect",
    "argparse",
    "pathlib",
    "tomllib",
    "cryptography.hazmat.primitives.serialization",
    "hashlib",
    "hmac",
    "ctypes",  # rexec.heap loads it only once a bulk transfer starts
    # cryptography's public X25519 API imports the whole OpenSSL backend (rsa, ec, padding,
    # threading, random) to check support: rexec.protocol._crypto avoids it (~11 ms)
    "cryptography.hazmat.backends",
    "threading",
    "random",
    # getaddrinfo with a str host loads the IDNA codec: sockdriver.open_socket passes bytes
    "encodings.idna",
    "unicodedata",
    "typing",
    "re",
    "json",
    "base64",
    "cryptography.exceptions",
    "cryptography.hazmat.primitives",
    # many hosts: only a host set (lab[01-40], a,b, @group) loads the fleet front end
    "rexec.cli.fleet",
    "rexec.client.fleet",
    "rexec.client.fanout",
    "rexec.client.hosts",
    "resource",
)

# Everything `rexec run` does short of a server: parse the command line (and --help), resolve
# the target and token, build the HELLO and Noise message 1, fail to connect, report it.
PROBE = """
import sys
import rexec.cli.main, rexec.cli.run, rexec.client.blocking
from rexec.cli.main import main
from rexec.cli.run import parse_run_args
from rexec.protocol.client import ClientConnection
from rexec.client.target import resolve_target

assert main(["run", "--help"]) == 0
args = parse_run_args(["-n", "--json", "-e", "A=1", "-C", "/", "--timeout=5", "h:1", "true"])
resolved = resolve_target(args.target)
conn = ClientConnection(resolved.token)
conn.initiate()
assert len(conn.data_to_send()) == 16 + 4 + 48
from rexec.protocol.messages import ServerInfo, exec_request_json
info = ServerInfo("rexec", "u", "h", 1 << 18, 64)
assert ServerInfo.from_json(info.to_json()) == info
assert exec_request_json(["true"], env={"A": "1"}, timeout=5.0).startswith(b'{"argv"')
code = main(["run", "-n", "--suite", "chachapoly", "unix:" + sys.argv[1], "true"])
assert code == 255, code
print(" ".join(sorted(sys.modules)))  # not json: one of the modules checked
"""


def _loaded_modules(tmp_path: Path) -> set[str]:
    home = tmp_path / "home"  # no client config, no token file: neither is ever read
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXEC_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home), REXEC_TOKEN=generate_token().format())
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "no-such.sock")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return set(out.stdout.splitlines()[-1].split())


def test_run_path_imports_none_of_the_expensive_modules(tmp_path: Path) -> None:
    loaded = _loaded_modules(tmp_path)
    assert "rexec.client.blocking" in loaded and "cryptography" in loaded  # the probe did run
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert bad == [], f"`rexec run` start-up imports {bad}: see DESIGN.md section 2a"


def test_client_config_brings_tomllib_and_pathlib_only_when_it_exists(tmp_path: Path) -> None:
    code = (
        "import sys, rexec.client.target as t; "
        "t.load_client_config(env={'HOME': sys.argv[1]}); "
        "print('tomllib' in sys.modules, 'pathlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
    (tmp_path / ".config/rexec").mkdir(parents=True)
    (tmp_path / ".config/rexec/client.toml").write_text('[hosts.a]\naddress = "h"\n')
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "True"]
