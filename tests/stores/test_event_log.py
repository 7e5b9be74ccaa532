"""The event log every store keeps (`SecretStore.put/delete(events=…)`, `events_after`,
`prune_events`): written atomically with its change, read back in order, each event once."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.store_replicas import OpenStore, vault_store

from broker.errors import StoreConflict, StoreUnavailable
from broker.events import LOGGER_NAME
from broker.outbox import Event, new_event
from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores import SecretStore
from broker.stores.local import LocalStore

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


@pytest.fixture
async def store(store_replicas: OpenStore) -> SecretStore:
    return await store_replicas()


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


async def test_a_replica_reads_the_same_feed(store_replicas: OpenStore) -> None:
    one, two = await store_replicas(), await store_replicas()
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


async def test_replicas_writing_at_once_log_every_event_once(store_replicas: OpenStore) -> None:
    """Enough events to fill more than one chunk of Vault's log, from two replicas racing."""
    import asyncio

    one, two = await store_replicas(), await store_replicas()
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


# Review findings on the Vault store's outbox (docs/decisions.md, "Outbox carried forward").


class LoggedEvents(logging.Handler):
    """Collects the names of the broker's log events while installed."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(str(getattr(record, "event", "")))


@pytest.fixture
def logged() -> Iterator[LoggedEvents]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = LoggedEvents(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def vault(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SecretStore]:
    store = vault_store(request, tmp_path / "store")
    try:
        yield store
    finally:
        await store.close()


class LogOutage:
    """Makes every append to Vault's event log fail while `down` (the tenants stay writable)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from broker.stores import vault_events

        self.down = False
        real = vault_events.EventLog._write

        def write(log: object, *args: object) -> bool:
            if self.down:
                raise StoreUnavailable("Vault went away")
            return real(log, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(vault_events.EventLog, "_write", write)


@pytest.mark.real
async def test_vault_a_disconnect_keeps_the_events_waiting_in_the_version_it_replaces(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = LogOutage(monkeypatch)
    acme = await vault.put(active("acme"))
    outage.down = True
    broken = acme.evolve(state=TenantState.BROKEN)
    waiting = event(broken, "tenant.broken")
    await vault.put(broken, events=[waiting])  # the change stands; its event waits
    outage.down = False
    gone = event(broken, "tenant.disconnected")
    assert await vault.delete("acme", events=[gone])
    assert [e.id for e in await everything(vault)] == [waiting.id, gone.id]


@pytest.mark.real
async def test_vault_a_reconnect_after_an_interrupted_disconnect_keeps_its_event(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tombstone landed, its copy to the log did not; connecting the tenant again
    writes over the tombstone (cas=0) and destroys it, but not its event."""
    outage = LogOutage(monkeypatch)
    acme = active("acme")
    first = event(acme)
    acme = await vault.put(acme, events=[first])
    outage.down = True
    gone = event(acme, "tenant.disconnected")
    with pytest.raises(StoreUnavailable):
        await vault.delete("acme", events=[gone])
    outage.down = False
    again = active("acme")
    back = event(again)
    await vault.put(again, events=[back])
    assert [e.id for e in await everything(vault)] == [first.id, gone.id, back.id]


@pytest.mark.real
@pytest.mark.parametrize("stops", ["log", "bury"])
async def test_vault_a_retried_disconnect_writes_one_disconnected_event(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch, stops: str
) -> None:
    """The first attempt stopped after its tombstone (before or after logging its event);
    the retry, which no longer knows the tenant, reuses the tombstone's event."""
    from broker.stores.vault import VaultStore

    outage = LogOutage(monkeypatch)
    acme = await vault.put(active("acme"))
    real_bury = VaultStore._bury

    async def bury_fails(*args: object) -> None:
        raise StoreUnavailable("Vault went away")

    if stops == "log":
        outage.down = True
    else:
        monkeypatch.setattr(VaultStore, "_bury", bury_fails)
    gone = event(acme, "tenant.disconnected")
    with pytest.raises(StoreUnavailable):
        await vault.delete("acme", events=[gone])
    outage.down = False
    monkeypatch.setattr(VaultStore, "_bury", real_bury)
    assert await vault.get("acme") is None
    placeholder = TenantRecord("acme", TenantState.PENDING, None)
    assert await vault.delete("acme", events=[event(placeholder, "tenant.disconnected")])
    assert await everything(vault) == [gone]
    assert gone.data["company_id"] == acme.company_id
    assert not await vault.delete("acme", events=[event(placeholder, "tenant.disconnected")])
    assert await everything(vault) == [gone]


async def test_a_disconnect_retried_after_it_completed_writes_no_second_event(
    store: SecretStore,
) -> None:
    """Every store: the second DELETE finds nothing, so it writes nothing."""
    acme = await store.put(active("acme"))
    gone = event(acme, "tenant.disconnected")
    assert await store.delete("acme", events=[gone])
    placeholder = TenantRecord("acme", TenantState.PENDING, None)
    assert not await store.delete("acme", events=[event(placeholder, "tenant.disconnected")])
    assert await everything(store) == [gone]


@pytest.mark.real
async def test_vault_a_put_succeeds_while_the_event_log_fails_and_logs_its_events_later(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch, logged: LoggedEvents
) -> None:
    outage = LogOutage(monkeypatch)
    outage.down = True
    acme = active("acme")
    first = event(acme)
    acme = await vault.put(acme, events=[first])
    broken = acme.evolve(state=TenantState.BROKEN)
    second = event(broken, "tenant.broken")
    broken = await vault.put(broken, events=[second])  # the version it replaces waits too
    assert await vault.get("acme") == broken
    assert "store.events_pending" in logged.names
    assert await everything(vault) == []
    outage.down = False
    third = event(broken, "tenant.recovered")
    await vault.put(broken.evolve(state=TenantState.ACTIVE), events=[third])
    assert [e.id for e in await everything(vault)] == [first.id, second.id, third.id]


@pytest.mark.real
async def test_vault_a_put_does_not_log_again_events_older_than_the_retention(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outbox event older than the retention was logged and pruned long ago (or would
    have been): the tenant's next write does not put it back at the head of the feed."""
    outage = LogOutage(monkeypatch)
    outage.down = True
    acme = active("acme")
    ancient = event(acme, now=datetime.now(UTC) - timedelta(days=31))
    acme = await vault.put(acme, events=[ancient])
    outage.down = False
    recent = event(acme, "tenant.key_rotated")
    await vault.put(acme, events=[recent])
    assert [e.id for e in await everything(vault)] == [recent.id]


@pytest.mark.real
async def test_vault_a_retried_delete_request_announces_the_disconnect_once(
    vault: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the tenant service: the retry no longer knows the tenant (it forgot it at the
    first attempt, and the store reads it as gone), yet the one event shows it as it was."""
    from broker.metrics import Metrics
    from broker.pleo import PleoClient
    from broker.stores.vault import VaultStore
    from broker.tenants import TenantService

    pleo = PleoClient("http://127.0.0.1:9")  # unreachable: the installation stays as it was
    service = TenantService(vault, pleo, Metrics())
    try:
        acme = await vault.put(active("acme"))
        assert await service.registry.refresh()
        real_bury = VaultStore._bury

        async def bury_fails(*args: object) -> None:
            raise StoreUnavailable("Vault went away")

        monkeypatch.setattr(VaultStore, "_bury", bury_fails)
        with pytest.raises(StoreUnavailable):
            await service.disconnect("acme")
        monkeypatch.setattr(VaultStore, "_bury", real_bury)
        await service.disconnect("acme")  # the caller retries DELETE
        (gone,) = await everything(vault)
        # As it was, with why its installation in Pleo could not be set inactive.
        unreachable = "Pleo could not be reached (ConnectError)"
        expected = acme.evolve(installation_error=unreachable).view()
        assert (gone.type, gone.data) == ("tenant.disconnected", expected)
    finally:
        await pleo.aclose()
