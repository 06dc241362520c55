"""Token store (modes, atomic writes, reload), the failure limiter and the AUTH proof."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from rexec.errors import ConfigError
from rexec.protocol.token import format_token
from rexec.server.auth import AuthRateLimiter, TokenStore, auth_proof, verify_auth_proof


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_text(token_text: str) -> str:
    return token_text.rsplit(":", 1)[1]


# --- load / add / lookup -----------------------------------------------------------------


def test_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "tokens.json")
    assert len(store) == 0
    assert store.entries() == []
    assert store.lookup(b"\0" * 8) is None
    assert not (tmp_path / "tokens.json").exists()  # loading never creates


def test_add_creates_file_0600_in_dir_0700(tmp_path: Path) -> None:
    path = tmp_path / "state/sub/tokens.json"
    store = TokenStore.load(path)
    token = store.add("laptop")
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    [entry] = doc["tokens"]
    assert set(entry) == {"name", "key_id", "secret", "created"}
    assert entry["name"] == "laptop"
    assert entry["key_id"] == token.key_id.hex()
    assert entry["secret"] == secret_text(format_token(token))
    assert entry["created"].endswith("Z")
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]  # no temp file left


def test_add_lookup_name_for_and_entries(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    a = store.add("a")
    b = store.add("b.c-d_1")
    assert store.lookup(a.key_id) == a.secret
    assert store.lookup(b.key_id) == b.secret
    assert store.name_for(b.key_id) == "b.c-d_1"
    assert store.name_for(b"\1" * 8) is None
    infos = store.entries()
    assert [(i.name, i.key_id) for i in infos] == [
        ("a", a.key_id.hex()),
        ("b.c-d_1", b.key_id.hex()),
    ]
    # a fresh load sees the same thing
    again = TokenStore.load(tmp_path / "t.json")
    assert again.lookup(a.key_id) == a.secret
    assert again.entries() == infos


def test_listing_and_repr_never_show_secrets(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    token = store.add("x")
    secret = secret_text(format_token(token))
    shown = repr(store) + repr(store.entries()) + str(store.entries())
    assert secret not in shown
    assert token.secret.hex() not in shown


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 65, "ü", "a:b"])
def test_add_refuses_bad_names(tmp_path: Path, name: str) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    with pytest.raises(ConfigError, match="invalid token name"):
        store.add(name)
    assert not (tmp_path / "t.json").exists()


def test_add_refuses_duplicate_names(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    store.add("ci")
    with pytest.raises(ConfigError, match="a token named 'ci' already exists"):
        store.add("ci")
    assert len(TokenStore.load(tmp_path / "t.json")) == 1


def test_add_sees_tokens_written_by_another_process(tmp_path: Path) -> None:
    one = TokenStore.load(tmp_path / "t.json")
    two = TokenStore.load(tmp_path / "t.json")
    one.add("first")
    two.add("second")  # re-reads under the lock: "first" is not lost
    assert [e.name for e in TokenStore.load(tmp_path / "t.json").entries()] == ["first", "second"]
    with pytest.raises(ConfigError, match="already exists"):
        two.add("first")


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            TokenStore.load(path).add(f"t{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(e.name for e in TokenStore.load(path).entries()) == sorted(
        f"t{i}" for i in range(16)
    )


def test_remove(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    a = store.add("a")
    b = store.add("b")
    assert store.remove("a") is True
    assert store.remove("a") is False
    assert store.lookup(a.key_id) is None
    assert TokenStore.load(tmp_path / "t.json").lookup(b.key_id) == b.secret


# --- modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "t.json"
    TokenStore.load(path).add("a")
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        TokenStore.load(path)
    assert f"mode {mode:04o}" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_load_accepts_0600_and_0400(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    token = TokenStore.load(path).add("a")
    for mode in (0o600, 0o400):
        path.chmod(mode)
        assert TokenStore.load(path).lookup(token.key_id) == token.secret


def test_add_refuses_to_rewrite_an_unsafe_store(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    TokenStore.load(path).add("a")
    store = TokenStore.load(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        store.add("b")


# --- malformed files ---------------------------------------------------------------------

GOOD_ID = "00112233445566ff"
GOOD_SECRET = "A" * 43


def entry(**over: object) -> dict[str, object]:
    e: dict[str, object] = {
        "name": "a",
        "key_id": GOOD_ID,
        "secret": GOOD_SECRET,
        "created": "2024-01-01T00:00:00Z",
    }
    e.update(over)
    return e


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{", "invalid JSON"),
        (b"\xff", "invalid JSON"),
        ([], "expected an object with keys 'version' and 'tokens'"),
        ({"version": 1}, "expected an object with keys"),
        ({"version": 2, "tokens": []}, "unsupported version 2"),
        ({"version": 1, "tokens": {}}, "tokens: must be a list"),
        ({"version": 1, "tokens": [3]}, "tokens[0]: must be an object"),
        ({"version": 1, "tokens": [entry(extra=1)]}, "tokens[0]: missing keys [], unknown keys"),
        (
            {"version": 1, "tokens": [{"name": "a"}]},
            "missing keys ['created', 'key_id', 'secret']",
        ),
        ({"version": 1, "tokens": [entry(name="a b")]}, "tokens[0]: name must match"),
        ({"version": 1, "tokens": [entry(key_id="XYZ")]}, "tokens[0] ('a'): malformed token"),
        ({"version": 1, "tokens": [entry(secret="short")]}, "tokens[0] ('a'): malformed token"),
        ({"version": 1, "tokens": [entry(secret=5)]}, "tokens[0] ('a'): key_id and secret must"),
        ({"version": 1, "tokens": [entry(created=5)]}, "tokens[0] ('a'): created must be"),
        (
            {"version": 1, "tokens": [entry(), entry(key_id="ffffffffffffffff")]},
            "tokens[1] ('a'): name is used twice",
        ),
        (
            {"version": 1, "tokens": [entry(), entry(name="b")]},
            "tokens[1] ('b'): key_id is used twice",
        ),
    ],
)
def test_malformed_store_names_the_entry(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "t.json"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        TokenStore.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert GOOD_SECRET not in str(info.value)


def test_store_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "t.json").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        TokenStore.load(tmp_path / "t.json")


# --- reload ------------------------------------------------------------------------------


def test_reload_if_changed_picks_up_new_tokens(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    server = TokenStore.load(path)
    assert server.reload_if_changed() is False
    token = TokenStore.load(path).add("new")  # `rexec token new` in another process
    assert server.lookup(token.key_id) is None
    assert server.reload_if_changed() is True
    assert server.lookup(token.key_id) == token.secret
    assert server.reload_if_changed() is False


def test_own_writes_do_not_trigger_reload(tmp_path: Path) -> None:
    store = TokenStore.load(tmp_path / "t.json")
    store.add("a")
    assert store.reload_if_changed() is False


def test_reload_keeps_old_tokens_when_the_new_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    token = TokenStore.load(path).add("a")
    server = TokenStore.load(path)
    tmp = tmp_path / "broken"
    tmp.write_text("{not json")
    tmp.chmod(0o600)
    os.replace(tmp, path)
    with pytest.raises(ConfigError, match="invalid JSON"):
        server.reload_if_changed()
    assert server.lookup(token.key_id) == token.secret
    assert server.reload_if_changed() is False  # reported once per version of the file
    path.chmod(0o644)  # a mode change alone does not change (inode, size, mtime)...
    os.utime(path, ns=(1, 1))  # ...so make it look new, and unsafe
    with pytest.raises(ConfigError, match="mode 0644"):
        server.reload_if_changed()
    assert server.lookup(token.key_id) == token.secret
    path.unlink()
    fixed = TokenStore.load(path)  # recreate a valid store
    other = fixed.add("b")
    assert server.reload_if_changed() is True
    assert server.lookup(token.key_id) is None
    assert server.lookup(other.key_id) == other.secret


def test_deleting_the_store_revokes_everything(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    token = TokenStore.load(path).add("a")
    server = TokenStore.load(path)
    path.unlink()
    assert server.reload_if_changed() is True
    assert server.lookup(token.key_id) is None


def test_write_is_atomic_old_or_new_never_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.json"
    store = TokenStore.load(path)
    first = store.add("a")
    before = path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.add("b")
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # the temp file is gone
    assert TokenStore.load(path).lookup(first.key_id) == first.secret


# --- rate limiter ------------------------------------------------------------------------


def test_limiter_refuses_after_max_failures_within_window() -> None:
    lim = AuthRateLimiter(3, 60.0)
    for i in range(3):
        assert lim.allowed("10.0.0.1", 100.0 + i)
        lim.record_failure("10.0.0.1", 100.0 + i)
    assert not lim.allowed("10.0.0.1", 103.0)
    assert lim.allowed("10.0.0.2", 103.0)  # per address
    assert not lim.allowed("10.0.0.1", 159.9)
    assert lim.allowed("10.0.0.1", 160.0)  # the first failure has left the window
    assert lim.allowed("10.0.0.1", 162.0)


def test_limiter_sliding_window() -> None:
    lim = AuthRateLimiter(2, 10.0)
    lim.record_failure("a", 0.0)
    lim.record_failure("a", 9.0)
    assert not lim.allowed("a", 9.5)
    assert lim.allowed("a", 10.0)  # the one at 0.0 expired, the one at 9.0 remains
    lim.record_failure("a", 10.0)
    assert not lim.allowed("a", 10.0)
    assert lim.allowed("a", 19.0)


def test_limiter_memory_per_address_is_bounded() -> None:
    lim = AuthRateLimiter(5, 60.0)
    for i in range(10_000):
        lim.record_failure("a", float(i) / 1000)
    assert len(lim._failures["a"]) == 5


def test_limiter_evicts_expired_then_oldest() -> None:
    lim = AuthRateLimiter(1, 10.0, max_entries=100)
    for i in range(100):
        lim.record_failure(f"old{i}", 0.0)
    assert len(lim) == 100
    lim.record_failure("new", 50.0)  # all old entries expired: pruned
    assert len(lim) == 1
    for i in range(200):
        lim.record_failure(f"x{i}", 60.0 + i / 1000)
    assert len(lim) == 100  # capped: least recently failed evicted
    assert not lim.allowed("x199", 61.0)
    assert lim.allowed("x0", 61.0)


def test_limiter_forgets_expired_addresses_on_check_and_prune() -> None:
    lim = AuthRateLimiter(2, 10.0)
    lim.record_failure("a", 0.0)
    lim.record_failure("b", 5.0)
    assert lim.allowed("a", 20.0)
    assert len(lim) == 1
    lim.prune(20.0)
    assert len(lim) == 0


def test_limiter_arguments_checked() -> None:
    with pytest.raises(ValueError):
        AuthRateLimiter(0, 1.0)
    with pytest.raises(ValueError):
        AuthRateLimiter(1, 0.0)


# --- proof -------------------------------------------------------------------------------


def test_auth_proof_is_hmac_sha256_of_label_and_hash() -> None:
    secret, hh = b"s" * 32, b"h" * 32
    expected = hmac.new(secret, b"rexec/2 client-auth" + hh, hashlib.sha256).digest()
    assert auth_proof(secret, hh) == expected
    assert verify_auth_proof(secret, hh, expected)
    assert not verify_auth_proof(secret, hh, expected[:-1] + bytes([expected[-1] ^ 1]))
    assert not verify_auth_proof(b"t" * 32, hh, expected)
    assert not verify_auth_proof(secret, b"g" * 32, expected)
    assert not verify_auth_proof(secret, hh, b"")
