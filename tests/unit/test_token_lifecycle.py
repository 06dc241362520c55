"""Token lifecycle in the store (expiry, rotation, revocation, policy) and the usage files."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from rexec.errors import ConfigError
from rexec.server.auth import (
    EXPIRED,
    RETIRED,
    REVOKED,
    TokenStore,
    parse_duration,
    parse_expiry,
)
from rexec.server.policy import Policy
from rexec.server.usage import FLUSH_INTERVAL, LastUsed, Learned, read_last_used, read_learned


def store_at(tmp_path: Path) -> TokenStore:
    return TokenStore.load(tmp_path / "tokens.json")


def test_expiry_policy_and_listing_survive_a_reload(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    later = time.time() + 3600
    policy = Policy.build(allow=["ls ..."], from_=["127.0.0.1"])
    token = store.add("a", expires=later, policy=policy)
    again = store_at(tmp_path)
    assert again.lookup(token.key_id) == token.secret
    assert again.policy_for(token.key_id) == policy
    (info,) = again.entries()
    assert info.expires is not None and info.expires.endswith("Z")
    assert info.policy == "allow='ls ...' from=127.0.0.1/32"
    doc = json.loads((tmp_path / "tokens.json").read_text())
    assert doc["tokens"][0]["policy"] == {"allow": ["ls ..."], "from": ["127.0.0.1/32"]}


def test_old_stores_still_load_and_unknown_keys_are_still_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.add("a")
    doc = json.loads(store.path.read_text())
    assert set(doc["tokens"][0]) == {"name", "key_id", "secret", "created"}
    doc["tokens"][0]["expiry"] = "2030-01-01T00:00:00Z"
    store.path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"unknown keys \['expiry'\]"):
        store_at(tmp_path)


def test_an_expired_token_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    token = store.add("old", expires=time.time() - 1)
    fresh = store.add("new", expires=time.time() + 60)
    assert store.lookup(token.key_id) is None
    assert store.invalid_reason(token.key_id, time.time()) == EXPIRED
    assert store.lookup(fresh.key_id) == fresh.secret
    assert store.invalid_reason(fresh.key_id, time.time() + 61) == EXPIRED
    assert store.name_for(token.key_id) == "old"  # still listed, for the logs


def test_rotate_with_overlap_accepts_both_then_only_the_new(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    old = store.add("a", policy=Policy.build(max_timeout=9))
    new = store.rotate("a", overlap=3600)
    assert new.key_id != old.key_id and new.secret != old.secret
    assert store.lookup(old.key_id) == old.secret
    assert store.lookup(new.key_id) == new.secret
    assert store.name_for(old.key_id) == store.name_for(new.key_id) == "a"
    assert store.policy_for(old.key_id) == Policy.build(max_timeout=9)
    later = time.time() + 3601
    assert store.invalid_reason(old.key_id, later) == RETIRED
    assert store.invalid_reason(new.key_id, later) is None
    (info,) = store.entries()
    assert info.key_id == new.key_id.hex() and info.previous[0][0] == old.key_id.hex()
    # a reload keeps the old secret for the overlap; a rotation without overlap drops it
    assert store_at(tmp_path).lookup(old.key_id) == old.secret
    newest = store.rotate(new.key_id.hex(), overlap=0)
    assert store.invalid_reason(new.key_id, time.time()) == REVOKED
    assert store.lookup(old.key_id) == old.secret  # its own overlap is not cut short
    assert store.lookup(newest.key_id) == newest.secret


def test_rotated_out_secrets_leave_the_file_after_their_overlap(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    old = store.add("a")
    store.rotate("a", overlap=0.01)
    assert old.key_id.hex() in store.path.read_text()
    time.sleep(0.05)
    store.add("b")  # any write prunes
    assert old.key_id.hex() not in store.path.read_text()


def test_revoke_by_name_or_key_id(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    a, b = store.add("a"), store.add("b")
    assert store.revoke("a").key_id == a.key_id.hex()
    assert store.invalid_reason(a.key_id, time.time()) == REVOKED
    assert store.lookup(a.key_id) is None
    assert store.revoke(b.key_id.hex()).name == "b"
    assert store.entries() == []
    with pytest.raises(ConfigError, match="no token named 'zz'"):
        store.revoke("zz")


def test_update_policy_and_expiry(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    token = store.add("a", expires=time.time() + 60)
    info = store.update("a", policy=Policy.build(learn=True))
    assert info.policy == "learn" and info.expires is not None
    info = store.update("a", expires=None)
    assert info.expires is None and info.policy == "learn"
    assert store_at(tmp_path).policy_for(token.key_id) == Policy.build(learn=True)


def test_a_server_that_is_not_root_refuses_run_as_tokens_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(tmp_path)
    plain = store.add("plain")
    run_as = store.add("ops", policy=Policy.build(run_as="nobody"))
    import rexec.server.auth as auth

    real = auth.check_run_as  # as if the server ran as uid 1000 (the files stay root's)
    monkeypatch.setattr(auth, "check_run_as", lambda policy, _uid: real(policy, 1000))
    served = TokenStore.load(store.path, serving=True)
    assert served.lookup(plain.key_id) == plain.secret
    assert served.lookup(run_as.key_id) is None
    reason = served.invalid_reason(run_as.key_id, time.time())
    assert reason is not None and "needs a server running as root" in reason
    assert "needs a server running as root" in served.disabled["ops"]
    assert TokenStore.load(store.path).lookup(run_as.key_id) == run_as.secret  # the CLI


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("2d", 172800), ("1w", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_expiry(text, 1000.0) == 1000.0 + seconds


@pytest.mark.parametrize("text", ["", "x", "-5m", "5y", "inf", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_expiry_dates() -> None:
    assert parse_expiry("2030-01-31", 0) == 1896048000.0
    assert parse_expiry("2030-01-31T12:00:00Z", 0) == 1896048000.0 + 43200
    assert parse_expiry("2030-01-31T13:00:00+01:00", 0) == 1896048000.0 + 43200
    with pytest.raises(ConfigError, match="invalid date"):
        parse_expiry("2030-13-01", 0)


# ---- usage side files ----------------------------------------------------------------


def test_last_used_is_flushed_at_most_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json.used"
    used = LastUsed(path)
    used.touch("a", 1_000_000.0)
    used.maybe_flush(1_000_000.0)
    assert read_last_used(path) == {"a": "1970-01-12T13:46:40Z"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    used.touch("b", 1_000_001.0)
    used.maybe_flush(1_000_001.0)  # too soon: only in memory
    assert "b" not in read_last_used(path)
    used.maybe_flush(1_000_000.0 + FLUSH_INTERVAL)
    assert set(read_last_used(path)) == {"a", "b"}
    other = LastUsed(path)  # another server sharing the store: merged, not replaced
    other.touch("c", 1_000_002.0)
    other.flush()
    assert set(read_last_used(path)) == {"a", "b", "c"}
    assert read_last_used(tmp_path / "none") == {}


def test_learned_records_each_distinct_request_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json.learned"
    learned = Learned(path)
    assert learned.record("a", ["ls", "-l"], None)
    assert not learned.record("a", ["ls", "-l"], None)
    assert learned.record("a", None, "ls; touch x")
    assert learned.record("b", ["id"], None)
    assert Learned(path).record("a", ["ls", "-l"], None)  # a restarted server: readers dedupe
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_learned(path, "a") == [("ls", "-l"), "ls; touch x"]
    assert read_learned(path, "b") == [("id",)]
    assert read_learned(tmp_path / "none", "a") == []
    path.write_text('{"token": "a", "argv": "ls"}\n')
    with pytest.raises(ConfigError, match="not a valid learned record"):
        read_learned(path, "a")
