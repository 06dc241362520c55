"""Admission before authentication: per-source caps, early drop, the source key (a unix
peer's uid), and the config keys that set them."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest

from rexec.errors import ConfigError
from rexec.protocol.notice import RefusalCode
from rexec.server.admission import Admission, source_key
from rexec.server.config import LimitsSection, parse_server_config


def _fill(adm: Admission, source: str, n: int) -> list[object]:
    members = [object() for _ in range(n)]
    for m in members:
        assert adm.enter(m, source) is None
    return members


def test_per_source_cap_leaves_room_for_others() -> None:
    adm = Admission(full=10, start=10, rate=30, per_source=3)
    held = _fill(adm, "127.0.0.2", 3)
    refusal = adm.enter(object(), "127.0.0.2")
    assert refusal is not None
    assert (refusal.code, refusal.retry_after) == (RefusalCode.BUSY, 1)
    assert (refusal.limit, refusal.value) == ("max_unauthenticated_per_source", 3)
    assert adm.enter(object(), "127.0.0.1") is None  # another source gets in
    adm.leave(held[0])
    adm.leave(held[0])  # idempotent
    assert adm.count("127.0.0.2") == 2
    assert adm.enter(object(), "127.0.0.2") is None
    assert len(adm) == 4


def test_full_refuses_everyone_and_counts_drain() -> None:
    adm = Admission(full=4, start=4, rate=30, per_source=4)
    members = [m for src in ("a", "b") for m in _fill(adm, src, 2)]
    refusal = adm.enter(object(), "c")
    assert refusal is not None and refusal.limit == "max_unauthenticated"
    for m in members:
        adm.leave(m)
    assert len(adm) == 0 and adm.count("a") == 0 and not adm._sources


def test_early_drop_probability_rises_from_rate_to_one() -> None:
    adm = Admission(full=20, start=10, rate=30, per_source=20)
    assert adm.drop_probability(9) == 0.0
    assert adm.drop_probability(10) == pytest.approx(0.30)
    assert adm.drop_probability(15) == pytest.approx(0.65)
    assert adm.drop_probability(19) == pytest.approx(0.93)
    assert adm.drop_probability(20) == 1.0


@pytest.mark.parametrize(("draw", "dropped"), [(0.29, True), (0.31, False)])
def test_early_drop_uses_the_draw(draw: float, dropped: bool) -> None:
    adm = Admission(full=20, start=10, rate=30, per_source=20, rng=lambda: draw)
    _fill(adm, "x", 10)
    refusal = adm.enter(object(), "y")
    assert (refusal is not None) is dropped
    if refusal is not None:
        assert refusal.code is RefusalCode.BUSY
        assert refusal.limit == "unauthenticated_drop_start"
        assert refusal.reason == "dropped early: 10 connections in the handshake"


def test_admission_rejects_nonsense() -> None:
    for args in ((4, 5, 30, 1), (4, 0, 30, 1), (4, 4, 101, 1), (4, 4, 30, 0)):
        with pytest.raises(ValueError):
            Admission(*args)


# ---- the source key ---------------------------------------------------------------------


def test_source_key_tcp() -> None:
    class Tcp:
        family = socket.AF_INET

    assert source_key(Tcp(), ("127.0.0.2", 4711)) == "127.0.0.2"
    assert source_key(Tcp(), ("::ffff:10.1.2.3", 1, 0, 0)) == "10.1.2.3"
    assert source_key(Tcp(), ("::1", 1, 0, 0)) == "::1"
    assert source_key(None, None) == "?"


def test_source_key_unix_is_the_peers_uid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert source_key(a, "") == f"uid:{os.getuid()}"
    if os.geteuid() != 0:
        return
    where = Path(tempfile.mkdtemp(prefix="rexec-uid-"))  # another uid must reach the socket
    path = str(where / "s")
    try:
        os.chmod(where, 0o711)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            os.chmod(path, 0o666)
            listener.listen(1)
            listener.settimeout(10)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child: connect as nobody
                try:
                    os.setuid(65534)
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.connect(path)
                    c.settimeout(10)
                    c.recv(1)
                finally:
                    os._exit(0)
            try:
                conn, _ = listener.accept()
                with conn:
                    assert source_key(conn, "") == "uid:65534"
            finally:
                os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        where.rmdir()


# ---- config -------------------------------------------------------------------------------


def test_defaults_ration_handshakes() -> None:
    limits = LimitsSection()
    assert (limits.max_unauthenticated, limits.drop_start, limits.per_source) == (64, 32, 16)
    assert (limits.unauthenticated_drop_rate, limits.first_flight_timeout) == (30, 5.0)


def test_defaults_shrink_under_a_lower_ceiling() -> None:
    limits = LimitsSection(max_unauthenticated=8, handshake_timeout=2.0)
    assert (limits.drop_start, limits.per_source, limits.first_flight_timeout) == (8, 8, 2.0)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "max_unauthenticated = 8\nunauthenticated_drop_start = 9",
            "limits: unauthenticated_drop_start (9) must not exceed max_unauthenticated (8)",
        ),
        (
            "max_unauthenticated = 8\nmax_unauthenticated_per_source = 9",
            "limits: max_unauthenticated_per_source (9) must not exceed max_unauthenticated (8)",
        ),
        (
            "hello_timeout = 11.0",
            "limits: hello_timeout (11) must not exceed handshake_timeout (10)",
        ),
        ("unauthenticated_drop_rate = 101", "limits.unauthenticated_drop_rate: "),
        ("unauthenticated_drop_rate = 30.0", "limits.unauthenticated_drop_rate: "),
        ("max_unauthenticated_per_source = 0", "limits.max_unauthenticated_per_source: "),
        ("hello_timeout = 0", "limits.hello_timeout: "),
    ],
)
def test_config_errors(toml: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as info:
        parse_server_config({"limits": tomllib.loads(toml)})
    assert message in str(info.value), str(info.value)
