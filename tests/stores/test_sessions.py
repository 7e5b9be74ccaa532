"""Connect sessions in every store that keeps them: the SessionStore contract and the service.

Run against the local store (SQLite), OpenBao (`real`) and the in-memory test store; two
store objects on the same data are two replicas, and a link made on one works on the other.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.inprocess import MemoryBackend, MemoryStore

from broker import errors
from broker.connect_sessions import ConnectSession, ConnectSessions, SessionStore, token_hash
from broker.settings import Settings
from broker.stores.local import LocalStore

BACKENDS = ["local", pytest.param("vault", marks=pytest.mark.real), "memory"]
OpenSessions = Callable[[], Awaitable[SessionStore]]


@pytest.fixture(params=BACKENDS)
async def open_replica(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenSessions]:
    """Opens store objects on one backend's shared data (each call: another replica)."""
    opened: list[object] = []
    shared = MemoryBackend()
    prefix = "sessions-" + secrets.token_hex(6)

    async def open_one() -> SessionStore:
        store: SessionStore
        if request.param == "local":
            store = LocalStore(tmp_path / "store")
        elif request.param == "vault":
            from support.openbao_server import vault_settings

            from broker.stores.factory import open_vault_store

            server = request.getfixturevalue("openbao")
            store = open_vault_store(vault_settings(server, vault_prefix=prefix))
        else:
            store = MemoryStore(shared)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()  # type: ignore[attr-defined]


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "connect_public_url": "https://connect.example.com/",
        "connect_return_origins": "https://app.example.com",
        "connect_max_attempts": 3,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def token_of(url: str) -> str:
    assert url.startswith("https://connect.example.com/connect/")
    return url.rsplit("/", 1)[1]


def session(hash_: str, **fields: object) -> ConnectSession:
    values: dict[str, object] = {
        "id": "cs_" + secrets.token_hex(4),
        "tenant": "acme",
        "token_hash": hash_,
        "expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    values.update(fields)
    return ConnectSession(**values)  # type: ignore[arg-type]


async def test_a_session_is_stored_compare_and_set(open_replica: OpenSessions) -> None:
    store = await open_replica()
    hash_ = hashlib.sha256(secrets.token_bytes(8)).hexdigest()
    stored = await store.put_session(session(hash_, return_url="https://app.example.com/x"))
    assert stored.version >= 1
    with pytest.raises(errors.StoreConflict):
        await store.put_session(session(hash_))  # exists already
    counted = await store.put_session(replace(stored, attempts=1, last_error="key_invalid"))
    with pytest.raises(errors.StoreConflict):
        await store.put_session(replace(stored, attempts=1))  # a stale write loses
    found = await store.get_session(hash_)
    assert found == counted
    assert found is not None and found.return_url == "https://app.example.com/x"
    assert hash_ in {s.token_hash for s in await store.list_sessions()}
    assert await store.delete_session(hash_)
    assert not await store.delete_session(hash_)
    assert await store.get_session(hash_) is None


async def test_a_link_made_on_one_replica_works_on_another(open_replica: OpenSessions) -> None:
    first = ConnectSessions(await open_replica(), settings())
    second = ConnectSessions(await open_replica(), settings())
    link = await first.create("acme", return_url="https://app.example.com/done")
    assert link.url.startswith("https://connect.example.com/connect/")
    token = token_of(link.url)
    assert len(token) >= 43  # 32 random bytes, base64url
    found = await second.find(token)
    assert found is not None and found.id == link.session.id and found.tenant == "acme"
    assert [s.id for s in await second.open_for("acme")] == [link.session.id]
    assert await second.open_for("other") == []
    await second.completed(found)
    assert await first.find(token) is None  # single use


async def test_only_the_tokens_hash_is_stored(open_replica: OpenSessions) -> None:
    store = await open_replica()
    link = await ConnectSessions(store, settings()).create("acme")
    token = token_of(link.url)
    [stored] = [s for s in await store.list_sessions() if s.id == link.session.id]
    assert stored.token_hash == token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(stored.to_data()) and token not in repr(link.session.view())


async def test_the_attempt_limit_ends_a_session(open_replica: OpenSessions) -> None:
    sessions = ConnectSessions(await open_replica(), settings(connect_max_attempts=2))
    token = token_of((await sessions.create("acme")).url)
    found = await sessions.find(token)
    assert found is not None
    found = await sessions.failed(found, "key_invalid")
    assert found.attempts == 1 and found.last_error == "key_invalid"
    again = await sessions.find(token)
    assert again is not None and again.last_error == "key_invalid"
    await sessions.failed(again, "key_invalid")
    assert await sessions.find(token) is None


async def test_an_expired_session_is_gone(open_replica: OpenSessions) -> None:
    store = await open_replica()
    sessions = ConnectSessions(store, settings())
    token = secrets.token_urlsafe(32)
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.put_session(session(token_hash(token), expires_at=past))
    assert await sessions.find(token) is None
    assert await store.get_session(token_hash(token)) is None  # removed on the way
    assert await sessions.open_for("acme") == []


async def test_revoking_ends_a_session_and_an_unknown_id_is_refused(
    open_replica: OpenSessions,
) -> None:
    sessions = ConnectSessions(await open_replica(), settings())
    link = await sessions.create("acme")
    await sessions.revoke(link.session.id)
    assert await sessions.find(token_of(link.url)) is None
    with pytest.raises(errors.ConnectSessionUnknown):
        await sessions.revoke(link.session.id)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"ttl_seconds": 59}, "ttl_seconds"),
        ({"ttl_seconds": 86_401}, "ttl_seconds"),
        ({"return_url": "https://evil.example.com/x"}, "BROKER_CONNECT_RETURN_ORIGINS"),
        ({"return_url": "https://app.example.com.evil.net/"}, "BROKER_CONNECT_RETURN_ORIGINS"),
        ({"return_url": "javascript:alert(1)"}, "BROKER_CONNECT_RETURN_ORIGINS"),
    ],
)
async def test_a_bad_link_request_is_refused(kwargs: dict[str, object], problem: str) -> None:
    sessions = ConnectSessions(MemoryStore(), settings())
    with pytest.raises(errors.RequestInvalid) as refused:
        await sessions.create("acme", **kwargs)  # type: ignore[arg-type]
    assert problem in refused.value.message


async def test_no_link_without_a_public_url() -> None:
    sessions = ConnectSessions(MemoryStore(), settings(connect_public_url=None))
    with pytest.raises(errors.ConnectDisabled):
        await sessions.create("acme")


async def test_an_unknown_or_odd_token_finds_nothing() -> None:
    sessions = ConnectSessions(MemoryStore(), settings())
    for token in ("", "x", "a" * 500, secrets.token_urlsafe(32)):
        assert await sessions.find(token) is None


@pytest.mark.real
async def test_the_vault_policy_lets_the_broker_keep_sessions(
    request: pytest.FixtureRequest,
) -> None:
    from support.openbao_server import vault_settings

    from broker.stores.factory import open_vault_store

    store = open_vault_store(vault_settings(request.getfixturevalue("openbao"), "approle"))
    try:
        sessions = ConnectSessions(store, settings())
        link = await sessions.create("policy-check")
        found = await sessions.find(token_of(link.url))
        assert found is not None
        await sessions.failed(found, "key_invalid")
        assert link.session.id in [s.id for s in await sessions.open_for("policy-check")]
        await sessions.revoke(link.session.id)
    finally:
        await store.close()


async def test_two_submissions_at_once_cannot_both_use_a_link(open_replica: OpenSessions) -> None:
    first = ConnectSessions(await open_replica(), settings())
    second = ConnectSessions(await open_replica(), settings())
    token = token_of((await first.create("acme")).url)
    seen_by_first, seen_by_second = await first.find(token), await second.find(token)
    assert seen_by_first is not None and seen_by_second is not None
    claimed = await first.claim(seen_by_first)
    with pytest.raises(errors.StoreConflict):
        await second.claim(seen_by_second)  # read before the claim: the write loses
    fresh = await second.find(token)
    assert fresh is not None and fresh.busy_until is not None
    with pytest.raises(errors.StoreConflict):
        await second.claim(fresh)  # read after it: the link is busy
    await first.failed(claimed, "key_invalid")
    again = await second.find(token)
    assert again is not None and again.busy_until is None
    await second.release(await second.claim(again))
