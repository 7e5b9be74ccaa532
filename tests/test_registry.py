"""TenantRegistry (broker/registry.py): the records the proxy serves, kept in step with the store.

`active`, the proxy's one read, and its refusals; refreshes (full reloads and the change
journal); what memory knows better than the store (a held break, a disconnect under way, a
write problem). Each refresh test runs on the in-memory store and on a real LocalStore (SQLite
on a temporary directory); a second store object on the same data plays another replica.
No call reaches Pleo (it is the fake, on MockTransport).
"""

from __future__ import annotations

import builtins
import secrets
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.inprocess import MemoryBackend, MemoryStore

from broker import errors
from broker.delivery import Delivery, Settlement
from broker.errors import StoreUnavailable, TenantUnknown
from broker.metrics import Metrics
from broker.outbox import Event
from broker.pleo import PleoClient
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.registry import FULL_RELOAD_SECONDS, TenantRegistry
from broker.stores import SecretStore
from broker.stores.local import LocalStore
from broker.tenants import TenantService

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"


class CountingStore:
    """Passes every call through to `inner`, counting them; `after_get` runs after each get."""

    def __init__(self, inner: SecretStore) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.calls: Counter[str] = Counter()
        self.read: builtins.list[str] = []
        self.after_get: Callable[[str], Awaitable[None]] | None = None
        self.down = False
        self.full = False  # reads work, writes fail (a full disk)

    def _count(self, op: str) -> None:
        self.calls[op] += 1
        if self.down:
            raise StoreUnavailable("the store is down")

    @property
    def read_only(self) -> str | None:
        return self.inner.read_only

    async def get(self, tenant: str) -> TenantRecord | None:
        self._count("get")
        self.read.append(tenant)
        record = await self.inner.get(tenant)
        if self.after_get is not None:
            await self.after_get(tenant)
        return record

    async def list(self) -> builtins.list[TenantRecord]:
        self._count("list")
        return await self.inner.list()

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        self._count("put")
        self._refuse_if_full()
        return await self.inner.put(record, events=events)

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        self._count("delete")
        self._refuse_if_full()
        return await self.inner.delete(tenant, events=events)

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        return await self.inner.events_after(cursor, limit, tenant)

    async def prune_events(self, before: datetime) -> int:
        return await self.inner.prune_events(before)

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        return await self.inner.claim_deliveries(holder, now=now, lease=lease, limit=limit)

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        return await self.inner.settle_deliveries(holder, settled, now=now)

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        await self.inner.release_deliveries(holder, now=now)

    async def pending_deliveries(self) -> int:
        return await self.inner.pending_deliveries()

    def _refuse_if_full(self) -> None:
        if self.full:
            raise StoreUnavailable("database or disk is full")

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        self._count("changes")
        return await self.inner.changes_since(cursor)

    async def close(self) -> None:
        await self.inner.close()


def active(tenant: str) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=ApiKey(f"pls_{secrets.token_hex(20)}"),
        company_id=f"{secrets.token_hex(4)}-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read"}),
        activated_at=T0,
        updated_at=T0,
    )


@dataclass
class Backing:
    """The data replicas share: in memory, or a LocalStore's directory."""

    kind: str
    directory: Path
    memory: MemoryBackend = field(default_factory=MemoryBackend)
    opened: builtins.list[SecretStore] = field(default_factory=list)

    def open(self, journal_size: int | None = None) -> SecretStore:
        """Another store object on this data (`journal_size`: keep only that many entries)."""
        store: SecretStore
        if self.kind == "memory":
            if journal_size is not None:
                self.memory.journal_size = journal_size
            store = MemoryStore(self.memory)
        else:
            sized: dict[str, Any] = {} if journal_size is None else {"journal_size": journal_size}
            store = LocalStore(self.directory, **sized)
        self.opened.append(store)
        return store

    def corrupt(self, tenant: str) -> None:
        """Make the tenant's record unreadable behind the store's back (no journal entry)."""
        if self.kind == "memory":
            self.memory.unreadable.add(tenant)
            return
        with sqlite3.connect(self.directory / "tenants.db") as conn:
            (sealed,) = conn.execute(
                "SELECT sealed_key FROM tenants WHERE tenant = ?", (tenant,)
            ).fetchone()
            damaged = bytearray(sealed)
            damaged[-1] ^= 0x01
            conn.execute(
                "UPDATE tenants SET sealed_key = ? WHERE tenant = ?", (bytes(damaged), tenant)
            )
        conn.close()


@pytest.fixture(params=["memory", "sqlite"])
async def backing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backing]:
    shared = Backing(request.param, tmp_path / "store")
    yield shared
    for store in shared.opened:
        await store.close()


@pytest.fixture
def pleo(pleo_client: PleoClient) -> PleoClient:
    return pleo_client  # on the fake Pleo: refresh never calls it


@pytest.fixture
def mine(backing: Backing) -> CountingStore:
    """The store of the service under test."""
    return CountingStore(backing.open())


@pytest.fixture
def other(mine: CountingStore, backing: Backing) -> SecretStore:
    """Another replica's store on the same data."""
    return backing.open()


def service(store: SecretStore, pleo: PleoClient, cache_ttl: float = 10.0) -> TenantService:
    return TenantService(store, pleo, Metrics(), cache_ttl=cache_ttl)


async def test_changes_by_another_replica_are_read_from_the_journal(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    unchanged = [await other.put(active(f"tenant-{n:02d}")) for n in range(40)]
    acme = await other.put(active("acme"))
    await other.put(active("globex"))
    tenants = service(mine, pleo)
    assert await tenants.registry.refresh()
    assert mine.calls["list"] == 1 and len(tenants.registry.all()) == 42
    mine.read.clear()

    broken = await other.put(acme.evolve(state=TenantState.BROKEN, message="revoked"))
    await other.delete("globex")
    initech = await other.put(active("initech"))
    assert await tenants.registry.refresh()

    assert mine.calls["list"] == 1
    assert sorted(mine.read) == ["acme", "globex", "initech"]
    assert tenants.registry.get("acme") == broken
    assert tenants.registry.get("globex") is None
    assert tenants.registry.get("initech") == initech
    assert [r for r in tenants.registry.all() if r.tenant.startswith("tenant-")] == unchanged
    gauge = tenants.metrics.registry.get_sample_value
    assert gauge("broker_tenants", {"state": "active"}) == 41
    assert gauge("broker_tenants", {"state": "broken"}) == 1


async def test_a_refresh_with_nothing_changed_reads_no_record(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    await other.put(active("acme"))
    tenants = service(mine, pleo)
    await tenants.registry.refresh()
    before = tenants.registry.all()

    assert await tenants.registry.refresh()

    assert (mine.calls["list"], mine.calls["get"]) == (1, 0)
    assert tenants.registry.all() == before


async def test_a_cursor_the_journal_no_longer_reaches_means_a_full_list(
    backing: Backing, mine: CountingStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo)
    await tenants.registry.refresh()
    busy = backing.open(journal_size=2)  # prunes the journal to 2 entries
    written = [await busy.put(active(f"t{n}")) for n in range(3)]

    assert await tenants.registry.refresh()

    assert mine.calls["list"] == 2
    assert mine.calls["get"] == 0
    assert tenants.registry.all() == written


async def test_a_full_reload_comes_every_full_reload_every_refreshes(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo, cache_ttl=FULL_RELOAD_SECONDS / 3)
    assert tenants.registry.full_reload_every == 3
    await other.put(active("acme"))

    lists = []
    for _ in range(7):
        assert await tenants.registry.refresh()
        lists.append(mine.calls["list"])

    assert lists == [1, 1, 1, 2, 2, 2, 3]
    assert [record.tenant for record in tenants.registry.all()] == ["acme"]


async def test_a_change_made_here_while_refreshing_is_not_undone(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    acme = await other.put(active("acme"))
    tenants = service(mine, pleo)
    await tenants.registry.refresh()
    await other.put(acme.evolve(message="changed elsewhere"))

    async def disconnect_meanwhile(tenant: str) -> None:
        mine.after_get = None
        await tenants.disconnect(tenant)

    mine.after_get = disconnect_meanwhile
    assert await tenants.registry.refresh()

    assert mine.read == ["acme", "acme"]  # the refresh's read, then the disconnect's own
    assert tenants.registry.get("acme") is None
    assert await other.get("acme") is None


async def test_a_store_outage_while_catching_up_keeps_what_memory_holds(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    acme = await other.put(active("acme"))
    tenants = service(mine, pleo)
    await tenants.registry.refresh()
    changed = await other.put(acme.evolve(message="changed elsewhere"))

    mine.down = True
    assert await tenants.registry.refresh() is False
    assert tenants.registry.store_problem == "the store is down"
    assert tenants.registry.get("acme") == acme

    mine.down = False
    assert await tenants.registry.refresh()
    assert tenants.registry.store_problem is None
    assert tenants.registry.get("acme") == changed
    assert mine.calls["list"] == 1


async def test_an_unreadable_record_is_skipped_not_fatal(
    mine: CountingStore,
    other: SecretStore,
    pleo: PleoClient,
    backing: Backing,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = await other.put(active("acme"))
    await other.put(active("globex"))
    backing.corrupt("globex")
    tenants = service(mine, pleo)
    assert await tenants.registry.refresh()  # a full reload: globex is reported and left out
    assert tenants.registry.get("acme") == good
    assert tenants.registry.get("globex") is None
    assert tenants.registry.store_problem is None

    initech = await other.put(active("initech"))  # the journal now names initech...
    await other.put(active("hooli"))
    backing.corrupt("hooli")  # ...and hooli, which no longer decrypts
    assert await tenants.registry.refresh()  # incremental: the bad one is dropped, the rest served
    assert tenants.registry.get("initech") == initech
    assert tenants.registry.get("hooli") is None
    assert tenants.registry.get("acme") == good
    unreadable = [r for r in caplog.records if r.getMessage() == "store.record_unreadable"]
    assert {getattr(r, "fields", {}).get("tenant") for r in unreadable} == {"globex", "hooli"}


async def test_a_break_the_store_cannot_take_is_served_at_once_and_saved_later(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo)
    acme = await mine.put(active("acme"))
    assert await tenants.registry.refresh()
    mine.down = True
    broken = await tenants.key_rejected(acme)
    assert broken.state is TenantState.BROKEN
    assert tenants.registry.get("acme") == broken  # no longer served, though nothing was written
    assert not await tenants.registry.refresh()  # the store is still down: the break is kept
    assert tenants.registry.get("acme") == broken
    mine.down = False
    assert await tenants.registry.refresh()  # back: the held break is written
    stored = await mine.inner.get("acme")
    assert stored is not None and stored.state is TenantState.BROKEN
    assert stored.reason is not None and stored.reason.value == "key_rejected"
    assert await tenants.registry.refresh()
    assert tenants.registry.get("acme") == stored


async def held_break(mine: CountingStore, pleo: PleoClient) -> tuple[TenantService, TenantRecord]:
    """A service whose `acme` broke (Pleo's 401) while the store was down: the break is held
    in memory, unsaved. The store is still down on return."""
    tenants = service(mine, pleo)
    acme = await mine.put(active("acme"))
    assert await tenants.registry.refresh()
    mine.down = True
    await tenants.key_rejected(acme)
    return tenants, acme


async def test_a_held_break_yields_to_a_rotation_made_elsewhere(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    tenants, acme = await held_break(mine, pleo)
    rotated = await other.put(acme.evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}")))
    mine.down = False
    assert await tenants.registry.refresh()
    assert (
        tenants.registry.get("acme") == rotated
    )  # the new key is served; the old break is dropped
    stored = await mine.inner.get("acme")
    assert stored == rotated


async def test_a_change_made_while_a_held_break_is_saved_wins(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants, acme = await held_break(mine, pleo)
    mine.down = False
    rotated = acme.evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}"), version=acme.version + 2)
    put = mine.put

    async def put_while_a_rotation_lands(
        record: TenantRecord, *, events: Sequence[Event] = ()
    ) -> TenantRecord:
        stored = await put(record, events=events)
        tenants.registry.remember("acme", rotated)  # made in this process meanwhile
        return stored

    mine.put = put_while_a_rotation_lands  # type: ignore[method-assign]
    assert await tenants.registry.refresh()  # the held break is saved, the refresh completes
    assert tenants.registry.get("acme") == rotated


# -- what memory knows better than the store (issue 8, items 15 and 18) ---------------------------
# The same with a real full disk and a real interrupted Vault disconnect, end to end:
# stores/test_local.py and stores/test_vault.py.


async def test_writes_failing_make_a_write_problem_until_one_succeeds(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo)
    acme = await mine.put(active("acme"))
    assert await tenants.registry.refresh()
    mine.full = True

    broken = await tenants.key_rejected(acme)

    assert tenants.write_problem == "database or disk is full"
    assert await tenants.registry.refresh()  # reads work: the store is readable, still not writable
    assert tenants.registry.store_problem is None
    assert tenants.write_problem == "database or disk is full"
    assert await tenants.fetch("acme") == broken  # what the proxy enforces, not the store
    assert await tenants.fetch("acme", remember=True) == broken
    assert tenants.registry.get("acme") == broken
    mine.full = False
    assert await tenants.registry.refresh()  # the held break is written
    assert tenants.write_problem is None
    saved = await mine.inner.get("acme")
    assert saved is not None and saved.state is TenantState.BROKEN
    assert await tenants.fetch("acme") == saved


async def test_a_write_problem_of_an_outage_ends_with_the_outage(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants, _ = await held_break(mine, pleo)
    mine.down = False
    mine.full = True  # the held break cannot be written when the outage ends...
    assert await tenants.registry.refresh()
    assert tenants.write_problem == "database or disk is full"
    mine.full = False
    mine.down = True
    assert not await tenants.registry.refresh()
    mine.down = False
    assert await tenants.registry.refresh()  # ...an outage that ends takes its write failures along
    assert tenants.write_problem is None


async def test_a_disconnect_the_store_failed_keeps_the_tenant_gone_until_it_is_retried(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants, acme = await held_break(mine, pleo)
    mine.full, mine.down = True, False

    with pytest.raises(StoreUnavailable, match="stopped using this tenant's key"):
        await tenants.disconnect("acme")

    assert tenants.registry.get("acme") is None
    assert await tenants.registry.refresh() and await tenants.registry.refresh()
    assert (
        tenants.registry.get("acme") is None
    )  # the store still holds it; memory does not serve it
    with pytest.raises(TenantUnknown, match="being disconnected"):
        await tenants.fetch("acme")
    mine.full = False
    assert await tenants.registry.refresh()
    assert await mine.inner.get("acme") == acme  # the held break was not written back
    await tenants.disconnect("acme")  # the retry
    assert await mine.inner.get("acme") is None
    with pytest.raises(TenantUnknown):
        await tenants.disconnect("acme")


async def failed_disconnect(
    mine: CountingStore, pleo: PleoClient
) -> tuple[TenantService, TenantRecord]:
    """A service whose disconnect of `acme` failed (a full disk): the key is no longer
    served, the store still holds the record, and the disk has room again."""
    tenants = service(mine, pleo)
    acme = await mine.put(active("acme"))
    assert await tenants.registry.refresh()
    mine.full = True
    with pytest.raises(StoreUnavailable):
        await tenants.disconnect("acme")
    mine.full = False
    return tenants, acme


async def test_a_tenant_connected_again_elsewhere_ends_a_failed_disconnect(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    tenants, acme = await failed_disconnect(mine, pleo)
    assert await tenants.registry.refresh()
    assert tenants.registry.get("acme") is None

    reconnected = await other.put(acme.evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}")))
    assert await tenants.registry.refresh()

    assert tenants.registry.get("acme") == reconnected
    assert await tenants.fetch("acme") == reconnected


async def test_a_failed_disconnect_keeps_hiding_the_key_when_another_replica_writes_it(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    # The operator was told the key is no longer used: a later write of the same key by
    # another replica (its check, say) must not bring it back into service here.
    tenants, acme = await failed_disconnect(mine, pleo)
    await other.put(acme.evolve(last_checked_at=T0.replace(year=2031)))
    assert await tenants.registry.refresh()
    assert tenants.registry.get("acme") is None


async def test_a_company_stays_bound_while_its_tenants_disconnect_is_unfinished(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants, acme = await failed_disconnect(mine, pleo)
    assert tenants.registry.companies()["acme"] == acme.company_id


# -- active: the proxy's one read --------------------------------------------------------


def _active(tenant: str = "acme", key: str = "pik_" + "k" * 40) -> TenantRecord:
    return TenantRecord(
        tenant=tenant, state=TenantState.ACTIVE, api_key=ApiKey(key), company_id=COMPANY
    )


async def _registry(*records: TenantRecord) -> TenantRegistry:
    store = MemoryStore()
    for record in records:
        await store.put(record)
    return TenantRegistry(store, Metrics())


async def test_before_the_first_load_an_unknown_tenant_is_store_unavailable() -> None:
    with pytest.raises(errors.StoreUnavailable):
        (await _registry()).active("acme")


async def test_an_unknown_tenant_is_tenant_unknown() -> None:
    registry = await _registry()
    await registry.refresh()
    with pytest.raises(errors.TenantUnknown):
        registry.active("acme")


async def test_a_broken_tenant_is_not_active_with_its_reason() -> None:
    broken = _active().evolve(state=TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED)
    registry = await _registry(broken)
    await registry.refresh()
    with pytest.raises(errors.TenantNotActive) as caught:
        registry.active("acme")
    assert caught.value.to_body()["error"]["reason"] == "key_rejected"


async def test_a_pending_tenant_is_not_active_with_its_message() -> None:
    pending = TenantRecord(
        tenant="acme", state=TenantState.PENDING, api_key=None, message="the key lacks scopes"
    )
    registry = await _registry(pending)
    await registry.refresh()
    with pytest.raises(errors.TenantNotActive, match="the key lacks scopes") as caught:
        registry.active("acme")
    assert caught.value.to_body()["error"]["state"] == "pending"


async def test_the_active_tenant_is_built_once_per_record() -> None:
    registry = await _registry(_active())
    await registry.refresh()
    first = registry.active("acme")
    assert registry.active("acme") is first
    rotated = _active(key="pik_" + "r" * 40)
    registry.remember("acme", rotated)
    second = registry.active("acme")
    assert second is not first
    assert second.record is rotated
    registry.remember("acme", None)
    with pytest.raises(errors.TenantUnknown):
        registry.active("acme")


async def test_a_store_down_at_start_is_the_store_problem_until_it_answers() -> None:
    store = MemoryStore()
    await store.put(_active())
    registry = TenantRegistry(store, Metrics())
    store.down = True
    assert await registry.refresh() is False
    assert registry.store_problem == "the store is down"
    with pytest.raises(errors.StoreUnavailable):
        registry.active("acme")
    store.down = False
    assert await registry.refresh()
    assert registry.store_problem is None
    assert registry.active("acme").company_id == COMPANY


async def test_the_tenant_gauge_counts_states() -> None:
    broken = _active("globex").evolve(state=TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED)
    registry = await _registry(_active("acme"), broken, _active("initech"))
    await registry.refresh()
    gauge = registry.metrics.registry.get_sample_value
    assert gauge("broker_tenants", {"state": "active"}) == 2
    assert gauge("broker_tenants", {"state": "broken"}) == 1
    assert gauge("broker_tenants", {"state": "pending"}) == 0


# -- what the gauge and the health checks read, kept up to date as records change --------
# With 50,000 tenants nothing per write or per health-check slot may walk every record: the
# registry keeps the per-state counts and the sorted ids of the checked tenants as it goes.
# After every kind of change both must equal what a walk over every record finds.


def walked(registry: TenantRegistry) -> tuple[dict[str, float], tuple[str, ...]]:
    """The gauge and the checked tenants as a walk over every record finds them."""
    records = registry.all()
    counts = {s.value: float(sum(r.state is s for r in records)) for s in TenantState}
    checked = tuple(r.tenant for r in records if r.state is not TenantState.PENDING)
    return counts, checked


def kept(registry: TenantRegistry) -> tuple[dict[str, float | None], tuple[str, ...]]:
    """The gauge as exported and the checked tenants as the registry keeps them."""
    gauge = registry.metrics.registry.get_sample_value
    counts = {s.value: gauge("broker_tenants", {"state": s.value}) for s in TenantState}
    return counts, registry.checked()


def pending(tenant: str) -> TenantRecord:
    return TenantRecord(tenant=tenant, state=TenantState.PENDING, api_key=None, message="no key")


async def test_the_gauge_and_the_checked_tenants_follow_every_change(
    mine: CountingStore, other: SecretStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo)
    registry = tenants.registry

    def agree(step: str) -> None:
        assert kept(registry) == walked(registry), step
        companies = registry.companies()  # a walk over every record
        for company in {*companies.values(), "7b2c1e34-none"} - {None}:
            assert company is not None
            expected = sorted(t for t, c in companies.items() if c == company)
            assert registry.bound_to(company) == expected, step

    acme = await other.put(active("acme"))
    await other.put(pending("initech"))
    await other.put(active("globex"))
    assert await registry.refresh()
    agree("the first load")
    assert registry.checked() == ("acme", "globex")

    hooli = await tenants.book.write(active("hooli"))
    agree("a tenant connected here")
    await tenants.book.write(hooli.evolve(state=TenantState.BROKEN, message="revoked"))
    agree("a break written here")
    await tenants.book.write(
        (await mine.get("hooli") or hooli).evolve(state=TenantState.ACTIVE, message=None)
    )
    agree("a recovery written here")

    await other.put(acme.evolve(state=TenantState.BROKEN, message="revoked elsewhere"))
    await other.put(active("initech").evolve(version=1))
    await other.delete("globex")
    await other.put(pending("umbrella"))
    assert await registry.refresh()
    agree("changes by another replica, read from the journal")
    assert registry.checked() == ("acme", "hooli", "initech")

    await tenants.disconnect("hooli")
    agree("a disconnect")
    assert "hooli" not in registry.checked()

    acme_now = await mine.get("acme")
    assert acme_now is not None
    mine.down = True
    await tenants.key_rejected(acme_now.evolve(state=TenantState.ACTIVE))
    agree("a break held while the store is down")
    mine.down = False
    assert await registry.refresh()
    agree("the held break saved")

    mine.full = True
    with pytest.raises(StoreUnavailable):
        await tenants.disconnect("initech")
    agree("a disconnect the store failed")
    mine.full = False
    assert await registry.refresh()
    agree("a refresh that keeps the failed disconnect hidden")

    registry._incremental_left = 0  # the next refresh is a full reload
    await other.put(pending("wayne"))
    assert await registry.refresh()
    agree("a full reload")
    registry.remember("umbrella", None)
    agree("a tenant gone, read under its lock")


async def test_a_claim_that_writes_only_last_checked_at_keeps_the_checked_tenants(
    mine: CountingStore, pleo: PleoClient
) -> None:
    tenants = service(mine, pleo)
    registry = tenants.registry
    for n in range(5):
        await mine.put(active(f"t{n}"))
    assert await registry.refresh()
    before = registry.checked()

    record = await mine.get("t2")
    assert record is not None
    await tenants.book.write(record.evolve(last_checked_at=T0 + timedelta(hours=1)))
    assert await registry.refresh()

    assert registry.checked() is before  # the same tuple: nothing rebuilt, nothing walked
    await tenants.book.write(active("t9"))
    assert registry.checked() == (*before, "t9")


async def test_the_gauge_shows_every_state_from_the_first_load() -> None:
    registry = await _registry()
    await registry.refresh()
    counts, checked = kept(registry)
    assert counts == {"pending": 0, "active": 0, "broken": 0} and checked == ()


async def test_tenants_granted_the_same_scopes_are_served_one_set_of_them() -> None:
    """50,000 tenants taking turns read one shared scope set, not one each."""
    scopes = ["export-jobs:read", "export-jobs:write"]
    acme, globex = (_active(name).evolve(scopes=frozenset(scopes)) for name in ("acme", "globex"))
    assert acme.scopes == globex.scopes and acme.scopes is not globex.scopes
    registry = await _registry(acme, globex, _active("initech").evolve(scopes=frozenset()))
    await registry.refresh()
    first, second = registry.active("acme"), registry.active("globex")
    assert first.scopes is second.scopes
    assert first.scopes == frozenset(scopes) and first.record.scopes == frozenset(scopes)
    assert registry.active("initech").scopes == frozenset()
    assert registry.active("acme") is first  # built once
