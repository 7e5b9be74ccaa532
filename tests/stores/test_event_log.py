"""The event log every store keeps (`SecretStore.put/delete(events=…)`, `events_after`,
`prune_events`): written atomically with its change, read back in order, each event once."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.inprocess import MemoryBackend, MemoryStore

from broker.errors import StoreConflict, StoreUnavailable
from broker.outbox import Event, new_event
from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores import SecretStore
from broker.stores.local import LocalStore

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
OpenStore = Callable[[], Awaitable[SecretStore]]


def vault_store(request: pytest.FixtureRequest, data: Path) -> SecretStore:
    from support.openbao_server import OpenBao

    from broker.stores.factory import open_vault_store

    server: OpenBao = request.getfixturevalue("openbao")
    prefix = "events-" + hashlib.sha256(str(data).encode()).hexdigest()[:16]
    return open_vault_store(server.settings(vault_prefix=prefix))


@pytest.fixture(
    params=["memory", "local", pytest.param("vault", marks=pytest.mark.real)],
)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores (replicas) on one backend's data; closes them."""
    opened: list[SecretStore] = []
    shared = MemoryBackend()

    async def open_one() -> SecretStore:
        store: SecretStore
        if request.param == "memory":
            store = MemoryStore(shared)
        elif request.param == "local":
            store = LocalStore(tmp_path / "store")
        else:
            store = vault_store(request, tmp_path / "store")
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> SecretStore:
    return await open_store()


def active(tenant: str) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=ApiKey(f"pls_{secrets.token_hex(16)}"),
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        activated_at=T0,
        updated_at=T0,
    )


def event(
    record: TenantRecord, kind: str = "tenant.activated", now: datetime | None = None
) -> Event:
    return new_event(kind, "admin", record.view(), now=now)


async def everything(store: SecretStore, tenant: str | None = None, page: int = 2) -> list[Event]:
    """The whole feed, read `page` events at a time."""
    found: list[Event] = []
    cursor: str | None = None
    while True:
        events, cursor = await store.events_after(cursor, page, tenant)
        if not events:
            return found
        found += events


async def test_events_are_read_back_in_write_order_each_once(store: SecretStore) -> None:
    acme, globex = active("acme"), active("globex")
    written = [event(acme)]
    acme = await store.put(acme, events=written[-1:])
    written.append(event(globex))
    await store.put(globex, events=written[-1:])
    two = [event(acme, "tenant.key_rotated"), event(acme, "tenant.company_changed")]
    written += two
    await store.put(acme, events=two)
    assert [e.id for e in await everything(store)] == [e.id for e in written]
    assert [e.body() for e in await everything(store, page=100)] == [e.body() for e in written]


async def test_the_feed_filters_by_tenant_and_goes_on_from_its_cursor(store: SecretStore) -> None:
    acme, globex = active("acme"), active("globex")
    first = event(acme)
    acme = await store.put(acme, events=[first])
    await store.put(globex, events=[event(globex)])
    assert [e.id for e in await everything(store, "acme")] == [first.id]
    events, cursor = await store.events_after(None, 10)
    assert len(events) == 2
    assert await store.events_after(cursor, 10) == ([], cursor)
    later = event(acme, "tenant.broken")
    await store.put(acme, events=[later])
    assert (await store.events_after(cursor, 10))[0] == [later]


async def test_a_write_that_fails_leaves_no_event(store: SecretStore) -> None:
    acme = await store.put(active("acme"))
    with pytest.raises(StoreConflict):
        await store.put(active("acme"), events=[event(acme)])  # version 0: exists already
    with pytest.raises(StoreConflict):
        await store.put(acme.evolve(version=7), events=[event(acme)])
    assert not await store.delete("nobody", events=[event(active("nobody"))])
    assert await everything(store) == []


async def test_a_delete_writes_its_event(store: SecretStore) -> None:
    acme = await store.put(active("acme"))
    gone = new_event("tenant.disconnected", "cli", acme.view())
    assert await store.delete("acme", events=[gone])
    assert await everything(store) == [gone]


async def test_a_replica_reads_the_same_feed(open_store: OpenStore) -> None:
    one, two = await open_store(), await open_store()
    acme = active("acme")
    written = event(acme)
    await one.put(acme, events=[written])
    assert await everything(two) == [written]


async def test_old_events_are_pruned(store: SecretStore) -> None:
    now = datetime.now(UTC)
    acme = active("acme")
    old = event(acme, now=now - timedelta(days=40))
    acme = await store.put(acme, events=[old])
    new = event(acme, "tenant.broken", now=now)
    await store.put(acme, events=[new])
    await store.prune_events(now - timedelta(days=30))
    remaining = await everything(store)
    assert new in remaining
    if store.backend != "vault":  # Vault drops whole chunks of the log, never the newest
        assert remaining == [new]


@pytest.mark.parametrize("cursor", ["garbage", "-1", "1.2.3", "x" * 80])
async def test_a_cursor_the_store_did_not_make_is_refused(store: SecretStore, cursor: str) -> None:
    if store.backend == "vault" and cursor == "1.2.3":
        cursor = "a.b"
    with pytest.raises(ValueError):
        await store.events_after(cursor, 10)


@pytest.mark.real
async def test_vault_an_event_whose_copy_to_the_log_failed_is_logged_once_later(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record write landed with the event in its outbox, the copy to the log did not
    (the broker died or Vault went away in between): a replica's read rescues it, and the
    next write of the tenant does not log it a second time."""
    from broker.stores import vault_events

    writer, reader = vault_store(request, tmp_path), vault_store(request, tmp_path)
    try:
        real_write = vault_events.EventLog._write

        def lost(*args: object, **kwargs: object) -> bool:
            raise StoreUnavailable("Vault went away")

        monkeypatch.setattr(vault_events.EventLog, "_write", lost)
        acme = active("acme")
        first = event(acme)
        acme = await writer.put(acme, events=[first])  # the change stands
        assert await everything(reader) == []
        monkeypatch.setattr(vault_events.EventLog, "_write", real_write)
        assert await reader.get("acme") == acme  # a replica's refresh reads it: rescued
        assert await everything(reader) == [first]
        second = event(acme, "tenant.broken")
        await writer.put(acme, events=[second])
        assert [e.id for e in await everything(reader)] == [first.id, second.id]
    finally:
        await writer.close()
        await reader.close()


async def test_local_a_change_whose_event_cannot_be_written_is_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction: if the event insert fails, the record write is rolled back too."""
    import sqlite3

    from broker.stores import sqlite_events

    store = LocalStore(tmp_path / "store")
    try:
        acme = await store.put(active("acme"))

        def fails(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(sqlite_events, "insert", fails)
        broken = acme.evolve(state=TenantState.BROKEN)
        with pytest.raises(StoreUnavailable):
            await store.put(broken, events=[event(broken, "tenant.broken")])
        with pytest.raises(StoreUnavailable):
            await store.delete("acme", events=[event(acme, "tenant.disconnected")])
        assert await store.get("acme") == acme
    finally:
        await store.close()


async def test_replicas_writing_at_once_log_every_event_once(open_store: OpenStore) -> None:
    """Enough events to fill more than one chunk of Vault's log, from two replicas racing."""
    import asyncio

    one, two = await open_store(), await open_store()
    written: dict[str, list[Event]] = {}

    async def churn(store: SecretStore, tenant: str) -> None:
        record = active(tenant)
        for kind in ["tenant.activated", *["tenant.key_rotated"] * 7]:
            events = [event(record, kind), event(record, "tenant.scopes_changed")]
            written.setdefault(tenant, []).extend(events)
            record = await store.put(record, events=events)

    await asyncio.gather(churn(one, "t0"), churn(two, "t1"), churn(one, "t2"))
    logged = await everything(two, page=7)
    assert len(logged) == len({e.id for e in logged}) == 48
    for tenant, events in written.items():
        assert [e.id for e in logged if e.tenant == tenant] == [e.id for e in events]
