"""Tokens end to end: fleet keys per server, revoke/rotate/expire on live servers, policies.

Every test starts its own servers (server_factory): they edit token stores and make
authentication fail, which must not disturb the shared server's rate limiter.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from rexec.errors import ErrorCode, PolicyError

REVOKE_BOUND = 1.0  # the bound: a revoked token's live connection ends within 1 s


def token_cmd(e2e: Any, store: Path, *args: str, input: bytes | None = None) -> Any:
    """`rexec token ARGS... --store STORE`, which must succeed."""
    proc = e2e.run_cli(["token", *args, "--store", str(store)], input=input)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def new_token(e2e: Any, store: Path, name: str, *options: str) -> str:
    return str(token_cmd(e2e, store, "new", "--id", name, *options).stdout.decode().strip())


def store_entry(store: Path, name: str) -> dict[str, Any]:
    doc = json.loads(store.read_text())
    return next(t for t in doc["tokens"] if t["name"] == name)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def run(e2e: Any, srv: Any, token: str, *cmd: str, address: str | None = None) -> Any:
    return e2e.run_cli(["run", address or srv.address, *cmd], token=token)


def auth_refused(proc: Any) -> bool:
    return proc.returncode == 255 and b"authentication failed" in proc.stderr


# ---- fleet tokens ----------------------------------------------------------------------


def test_fleet_keys_are_per_server(server_factory: Any, e2e: Any, tmp_path: Path) -> None:
    a, b = server_factory(), server_factory()
    fleet_line = e2e.run_cli(["token", "new", "--fleet", "lab"]).stdout.decode().strip()
    assert fleet_line.startswith("rexec1fleet:lab:")
    fleet = secret_file(tmp_path / "fleet.token", fleet_line)
    for srv, name in ((a, "srv-a"), (b, "srv-b")):
        derived = e2e.run_cli(["token", "derive", str(fleet), "--server", name])
        assert derived.returncode == 0, derived.stderr
        line = derived.stdout.strip()
        assert line.startswith(b"rexec1:") and fleet_line.split(":")[2].encode() not in line
        token_cmd(e2e, srv.store, "import", "--id", "fleet", input=line + b"\n")
        assert fleet_line.split(":")[2] not in srv.store.read_text()  # the master stays home
    config = tmp_path / "client.toml"
    config.write_text(
        f'[hosts.srv-a]\naddress = "{a.address}"\n'
        f'[hosts.srv-b]\naddress = "{b.address}"\n'
        # named B, but pointing at A's address: A does not hold B's key
        f'[hosts.evil]\naddress = "{a.address}"\nserver_id = "srv-b"\n'
    )
    client_env = {"REXEC_CONFIG": str(config), "REXEC_TOKEN_FILE": str(fleet)}
    for alias in ("srv-a", "srv-b"):
        ok = e2e.run_cli(["run", alias, "echo", alias], env=client_env)
        assert (ok.returncode, ok.stdout) == (0, alias.encode() + b"\n"), ok.stderr

    # a key taken from A's store: refused by B
    entry = store_entry(a.store, "fleet")
    stolen = f"rexec1:{entry['key_id']}:{entry['secret']}"
    assert run(e2e, a, stolen, "true").returncode == 0
    assert auth_refused(run(e2e, b, stolen, "true"))

    # A, holding only A's key, cannot finish a handshake with a client connecting to B
    audited = len(a.audit_records())
    posed = e2e.run_cli(["run", "evil", "echo", "pwned"], env=client_env)
    assert auth_refused(posed), posed.stderr
    assert posed.stdout == b""
    assert len(a.audit_records()) == audited  # nothing ran on A
    assert a.log_events("authentication failed")


def test_derive_prints_the_protocol_vector(e2e: Any, tmp_path: Path) -> None:
    fleet = secret_file(
        tmp_path / "f.token", "rexec1fleet:lab:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
    )
    out = e2e.run_cli(["token", "derive", str(fleet), "--server", "LAB01:8222"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"rexec1:bf4f2d04daa7b368:tkFCo56tDilFBjKJHOBNpxSI80ZvuS6qsKFAy8GTKhs\n"
    assert b"'lab01'" in out.stderr
    fleet.chmod(0o644)
    refused = e2e.run_cli(["token", "derive", str(fleet), "--server", "x"])
    assert refused.returncode == 2 and b"chmod 600" in refused.stderr


# ---- lifecycle -----------------------------------------------------------------------


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def test_revoke_closes_a_live_session_within_1s(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    mark = e2e.marker("31")
    client = subprocess.Popen(
        [e2e.REXEC, "run", srv.address, "sh", "-c", f"sleep {mark}; echo survived"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e2e.clean_env({"REXEC_TOKEN": srv.token}),
    )
    try:
        assert e2e.wait_until(lambda: e2e.cmdline_pids(f"sleep {mark}"), 10.0)
        token_cmd(e2e, srv.store, "revoke", "t")
        revoked_at = srv.store.stat().st_mtime
        out, errs = client.communicate(timeout=10)
        gone = time.time()
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.kill()
    assert client.returncode == 255
    assert errs == b"rexec: server error (auth): token revoked\n"
    assert out == b""
    assert not e2e.cmdline_pids(f"sleep {mark}")  # the command was killed, not orphaned
    (event,) = srv.log_events("token no longer valid; closing")
    assert event["reason"] == "token revoked"
    assert _iso(event["timestamp"]) - revoked_at < REVOKE_BOUND  # the server acted in time
    assert gone - revoked_at < REVOKE_BOUND + 2.0  # the client saw it (CLI start-up slack)
    (record,) = srv.wait_audit(1)
    assert record["signal"] == 9 and record["error"] == "killed: token revoked"
    assert record["policy"] == {"decision": "allowed", "rule": "none"}
    assert auth_refused(run(e2e, srv, srv.token, "true"))  # and no new connection


def test_rotate_with_overlap_accepts_old_and_new_then_only_new(
    server_factory: Any, e2e: Any
) -> None:
    srv = server_factory()
    old = srv.token
    rotated = token_cmd(e2e, srv.store, "rotate", "t", "--overlap", "2s")
    new = rotated.stdout.decode().strip()
    assert new.startswith("rexec1:") and new != old
    assert b"works for 2s" in rotated.stderr
    assert run(e2e, srv, old, "echo", "old").stdout == b"old\n"
    assert run(e2e, srv, new, "echo", "new").stdout == b"new\n"
    until = _iso(store_entry(srv.store, "t")["previous"][0]["until"])
    time.sleep(max(0.0, until - time.time()) + 0.1)
    assert auth_refused(run(e2e, srv, old, "echo", "old"))
    assert run(e2e, srv, new, "echo", "new").stdout == b"new\n"


def test_an_expired_token_is_refused(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    past = new_token(e2e, srv.store, "past", "--expires", "2000-01-01")
    assert auth_refused(run(e2e, srv, past, "true"))
    assert srv.log_events("authentication failed")
    assert run(e2e, srv, srv.token, "true").returncode == 0  # the others are untouched


@pytest.mark.slow
def test_live_sessions_end_at_expiry(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    soon = new_token(e2e, srv.store, "soon", "--expires", "3s")
    expires = _iso(store_entry(srv.store, "soon")["expires"])
    mark = e2e.marker("32")
    proc = run(e2e, srv, soon, "sleep", mark)  # runs until the token expires
    assert proc.returncode == 255
    assert proc.stderr == b"rexec: server error (auth): token expired\n"
    assert time.time() - expires < REVOKE_BOUND + 2.0
    assert not e2e.cmdline_pids(f"sleep {mark}")
    assert auth_refused(run(e2e, srv, soon, "true"))


def test_list_shows_lifecycle_and_policy_never_secrets(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    new_token(e2e, srv.store, "ci", "--expires", "2099-01-01", "--allow", "make ...")
    assert run(e2e, srv, srv.token, "true").returncode == 0
    srv.stop()  # last-used times are flushed at shutdown (and every 10 s)
    listing = token_cmd(e2e, srv.store, "list").stdout.decode()
    rows = [line.split("\t") for line in listing.splitlines()]
    assert rows[0] == ["NAME", "KEY_ID", "CREATED", "EXPIRES", "LAST_USED", "POLICY"]
    t, ci = rows[1], rows[2]
    assert t[0] == "t" and t[3] == "never" and t[4].endswith("Z") and t[5] == "-"
    assert ci[0] == "ci" and ci[3] == "2099-01-01T00:00:00Z" and ci[4] == "never"
    assert ci[5] == "allow='make ...'"
    for entry in json.loads(srv.store.read_text())["tokens"]:
        assert entry["secret"] not in listing


# ---- policy --------------------------------------------------------------------------


def test_allow_admits_what_rexec_run_sends_for_one_plain_word(
    server_factory: Any, e2e: Any, tmp_path: Path
) -> None:
    """`rexec run HOST uptime` sends one argument (a shell line): a token allowed `uptime`
    runs it, as the argv its pattern checked; shell syntax around it is still refused."""
    srv = server_factory()
    token = new_token(e2e, srv.store, "up", "--allow", "uname", "--allow", "ls -d /tmp")
    ok = run(e2e, srv, token, "uname")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"Linux\n", b"")
    assert run(e2e, srv, token, "ls -d /tmp").stdout == b"/tmp\n"
    audit = srv.audit_records()[-2:]
    assert [r["policy"] for r in audit] == [
        {"decision": "allowed", "rule": "allow uname"},
        {"decision": "allowed", "rule": "allow ls -d /tmp"},
    ]
    for line in ("uname; id", "uname $X", "ls -d /tm*"):
        refused = run(e2e, srv, token, line)
        assert refused.returncode == 255, line
        assert refused.stderr.startswith(b"rexec: server error (policy): allow: "), line


def test_allow_accepts_matching_argv_and_refuses_shell_lines_and_others(
    server_factory: Any, e2e: Any, tmp_path: Path
) -> None:
    srv = server_factory()
    token = new_token(e2e, srv.store, "ro", "--allow", "echo ...", "--allow", "ls -d /tmp")
    ok = run(e2e, srv, token, "echo", "a b", "c")
    assert (ok.returncode, ok.stdout) == (0, b"a b c\n")
    assert run(e2e, srv, token, "ls", "-d", "/tmp").stdout == b"/tmp\n"
    target = tmp_path / "x"
    shell = run(e2e, srv, token, f"echo hi; touch {target}")
    assert shell.returncode == 255
    assert shell.stderr == (
        b"rexec: server error (policy): allow: shell command lines are refused for this token "
        b"(it has --allow patterns and no --allow-shell); send an argv\n"
    )
    other = run(e2e, srv, token, "touch", str(target))
    assert other.returncode == 255
    assert (
        other.stderr
        == (
            f"rexec: server error (policy): allow: argv touch {target} matches no --allow "
            "pattern of this token\n"
        ).encode()
    )
    assert run(e2e, srv, token, "ls", "-d", "/tmp", "/").returncode == 255
    assert not target.exists()
    records = srv.wait_audit(5)
    assert [r["policy"]["decision"] for r in records] == [
        "allowed",
        "allowed",
        "refused",
        "refused",
        "refused",
    ]
    assert records[0]["policy"]["rule"] == "allow echo ..."
    assert records[2]["policy"]["rule"] == "allow" and records[2]["exit_code"] is None
    assert records[2]["error"].startswith("policy: allow: shell command lines")


class Relay:
    """Forwards 127.0.0.1:<port> to a server from source address 127.0.0.2, so the server
    sees a peer of 127.0.0.2 (Linux picks 127.0.0.1 as the source for any 127/8 target)."""

    def __init__(self, target: tuple[str, int], source: str) -> None:
        self.target, self.source = target, source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = self.listener.accept()
                up = socket.create_connection(self.target, 10, (self.source, 0))
                self.socks += [down, up]
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self.listener, *self.socks):
            sock.close()


@pytest.fixture
def relay_factory() -> Iterator[Any]:
    made: list[Relay] = []

    def make(target: str) -> Relay:
        host, port = target.rsplit(":", 1)
        relay = Relay((host, int(port)), "127.0.0.2")
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def test_from_refuses_other_source_addresses(
    server_factory: Any, e2e: Any, relay_factory: Any
) -> None:
    srv = server_factory(listen=("127.0.0.1:0", "127.0.0.2:0"))
    one = new_token(e2e, srv.store, "one", "--from", "127.0.0.1")
    two = new_token(e2e, srv.store, "two", "--from", "127.0.0.2/32")
    addr1 = next(a for a in srv.addresses if a.startswith("127.0.0.1:"))
    addr2 = next(a for a in srv.addresses if a.startswith("127.0.0.2:"))
    via2 = relay_factory(addr2).address  # the server sees these connections from 127.0.0.2
    assert run(e2e, srv, one, "echo", "ok", address=addr1).stdout == b"ok\n"
    refused = run(e2e, srv, one, "echo", "ok", address=via2)
    assert refused.returncode == 255
    assert refused.stderr == (
        b"rexec: server error (policy): from: 127.0.0.2 is not in this token's --from list\n"
    )
    assert run(e2e, srv, two, "echo", "ok", address=via2).stdout == b"ok\n"
    refused = run(e2e, srv, two, "echo", "ok", address=addr1)
    assert refused.returncode == 255 and b"from: 127.0.0.1 is not in" in refused.stderr
    peers = [r["peer"].rsplit(":", 1)[0] for r in srv.wait_audit(4)]
    assert peers == ["127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="--run-as needs a server running as root")
def test_run_as_runs_as_the_mapped_user(server_factory: Any, e2e: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    srv = server_factory()
    token = new_token(e2e, srv.store, "ops", "--run-as", "nobody")
    out = run(e2e, srv, token, "id", "-u")
    assert (out.returncode, out.stdout) == (0, f"{nobody.pw_uid}\n".encode()), out.stderr
    out = run(e2e, srv, token, "sh", "-c", 'id -g; echo "$USER $LOGNAME $HOME $SHELL"')
    assert out.stdout.decode().splitlines() == [
        str(nobody.pw_gid),
        f"nobody nobody {nobody.pw_dir} {nobody.pw_shell}",
    ]
    assert run(e2e, srv, srv.token, "id", "-u").stdout == b"0\n"  # other tokens: unchanged
    assert srv.wait_audit(3)[0]["policy"]["rule"] == "run-as nobody"


def test_learn_then_learned_round_trip(server_factory: Any, e2e: Any) -> None:
    srv = server_factory()
    token = new_token(e2e, srv.store, "probe", "--learn")
    with contextlib.closing(srv.connect(token=token)) as conn:
        for command in (["echo", "a b", "*"], ["ls", "-d", "/tmp"], ["echo", "a b", "*"]):
            assert conn.run(command).exit_code == 0
        assert conn.run("true; false").exit_code == 1  # a shell line: recorded too
        assert conn.run("uname -s").exit_code == 0  # plain words: recorded as their argv
    learned = token_cmd(e2e, srv.store, "learned", "probe").stdout.decode().splitlines()
    assert learned == [
        "echo 'a b' '[*]'",
        "ls -d /tmp",
        "# shell command line (needs --allow-shell): true; false",
        "uname -s",
    ]
    allow = [arg for line in learned if not line.startswith("#") for arg in ("--allow", line)]
    token_cmd(e2e, srv.store, "edit", "probe", "--no-learn", *allow)
    with contextlib.closing(srv.connect(token=token)) as conn:
        assert conn.run(["echo", "a b", "*"]).stdout == b"a b *\n"
        assert conn.run(["ls", "-d", "/tmp"]).stdout == b"/tmp\n"
        assert conn.run("uname -s").stdout == b"Linux\n"
        for refused in (["echo", "a b", "x"], ["ls", "-d", "/"], "true; false"):
            with pytest.raises(PolicyError) as info:
                conn.run(refused)
            assert info.value.code == ErrorCode.POLICY
            assert info.value.message.startswith("allow: ")
