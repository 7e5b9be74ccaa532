"""The tenant registry: the in-memory records the proxy reads, kept in step with the store.

Records are served from memory (`get`) so that the proxy never waits on the store; the
store is the source of truth and is consulted in the background every `cache_ttl` seconds,
which is how a change made by another replica reaches this one. Most refreshes ask the
store's change journal which tenants changed and re-read only those; the first refresh, one
every `FULL_RELOAD_SECONDS`, and any the journal cannot answer re-read every record.
A change made in this process (`remember`) wins over a refresh that read the store before it.

Two things memory knows better than the store: a state change the store could not take yet
(`hold`: a broken tenant is not served while the store is full or down), and a disconnect that
began (`forget`): the tenant is not served from the moment its key's destruction starts, and a
refresh does not bring it back even if the store could not finish destroying it.
Writes go through `writes` (`broker.writes`), which notes whether the store takes them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from broker import errors
from broker.events import emit
from broker.metrics import Metrics
from broker.outbox import Event
from broker.records import ActiveTenant, TenantRecord, TenantState
from broker.stores import SecretStore, report_unreadable
from broker.tasks import Repeating, map_all
from broker.tenant_table import TenantTable
from broker.writes import StoreWrites

SCOPE_SETS = 1024  # distinct scope sets shared among the tenants served (more: each its own)
FULL_RELOAD_SECONDS = 600.0  # a full reload at least this often repairs a missed journal entry
CHANGED_READS = 16  # store reads in flight while re-reading the tenants the journal names


class TenantRegistry:
    """Every known tenant record, in memory, refreshed from the store in the background."""

    def __init__(self, store: SecretStore, metrics: Metrics, *, cache_ttl: float = 10.0) -> None:
        self.store = store
        self.metrics = metrics
        self.cache_ttl = cache_ttl
        self.full_reload_every = max(1, int(FULL_RELOAD_SECONDS / cache_ttl))
        self.loaded = False
        self.store_problem: str | None = None
        self.writes = StoreWrites(store)  # every write, watched for a store refusing them
        self._table = TenantTable(self._count)  # the records, counted by state as they change
        self._records = self._table.records  # read here; changed only through `_table`
        # built once per record, on first use; the table drops one whose record changes
        self._served = self._table.served
        self._scope_sets: dict[frozenset[str], frozenset[str]] = {}
        self._touched: set[str] = set()
        self._held: dict[str, TenantRecord] = {}
        self._held_events: dict[str, Sequence[Event]] = {}  # saved with the held record
        self._disconnecting: dict[str, TenantRecord] = {}  # the record each disconnect hides
        self._cursor: str | None = None
        self._incremental_left = 0
        self._refresher = Repeating(self.refresh, self._refresh_delay, "tenant refresh")

    def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record (the proxy's hot path)."""
        return self._records.get(tenant)

    def active(self, tenant: str) -> ActiveTenant:
        """The tenant as the proxy serves it; refused if unknown or not active (hot path:
        one look-up, the table keeping only what was made of a tenant's current record)."""
        active = self._served.get(tenant)
        if active is not None:
            return active
        record = self._records.get(tenant)
        if record is None:
            if not self.loaded:
                raise errors.StoreUnavailable(
                    "No tenant records could be loaded from the key store yet.", tenant=tenant
                )
            raise errors.TenantUnknown(tenant=tenant)
        active = ActiveTenant.of(record)
        if active is None:
            raise not_active(record)
        active = self._shared_scopes(active)
        # Keyed by the record's own id string when it is the same id: no second copy kept.
        self._served[record.tenant if record.tenant == tenant else tenant] = active
        return active

    def _shared_scopes(self, active: ActiveTenant) -> ActiveTenant:
        """`active` with the one scope set every tenant granted the same scopes is served:
        with 50,000 tenants taking turns, the set a request reads is then in the cache."""
        scopes = self._scope_sets.get(active.scopes)
        if scopes is None:
            if len(self._scope_sets) >= SCOPE_SETS:
                return active
            scopes = self._scope_sets[active.scopes] = active.scopes
        return active if scopes is active.scopes else dataclasses.replace(active, scopes=scopes)

    def all(self, state: TenantState | None = None) -> list[TenantRecord]:
        """Every known tenant, sorted by id, optionally only those in `state` (an admin's
        listing: it walks every record; nothing on a timer calls it)."""
        records = sorted(self._records.values(), key=lambda r: r.tenant)
        return [r for r in records if state is None or r.state is state]

    def checked(self) -> tuple[str, ...]:
        """The ids of the active and broken tenants, sorted: the health checks' schedule.
        O(1) while that set is unchanged (the same tuple again)."""
        return self._table.checked()

    def remember(self, tenant: str, record: TenantRecord | None) -> bool:
        """Take a record this process just wrote, or read under the tenant's lock (None: gone).

        Returns True if the tenant was known. Callers hold the tenant's lock, so records
        arrive here in the order they were made.
        """
        self._touched.add(tenant)
        held = self._held.get(tenant)
        if held is not None and (record is None or record.version > held.version):
            del self._held[tenant]  # a newer write (or the tenant's removal) supersedes it
            self._held_events.pop(tenant, None)
        if record is None:
            known = self._table.pop(tenant) is not None
        else:
            self._disconnecting.pop(tenant, None)  # connected again
            known = tenant in self._records
            self._table.put(tenant, record)
        return known

    def forget(self, tenant: str) -> bool:
        """Stop serving `tenant` now: its disconnect begins (True if it was known).

        Until `disconnected` confirms that the store destroyed it, no refresh brings back the
        record being disconnected, and no held record of it is written. Any other record (the
        tenant connected again, here or by another replica) ends that.
        """
        hidden = self._disconnecting.get(tenant) or self._records.get(tenant)
        self._held.pop(tenant, None)
        known = self.remember(tenant, None) or hidden is not None
        if hidden is not None:
            self._disconnecting[tenant] = hidden
        return known

    def disconnected(self, tenant: str) -> None:
        """The store destroyed `tenant`: nothing is left to hide."""
        self._disconnecting.pop(tenant, None)

    def disconnecting(self, tenant: str) -> bool:
        """True while a disconnect of `tenant` that began here hides a record the store holds."""
        return tenant in self._disconnecting

    def companies(self) -> dict[str, str | None]:
        """Each tenant's company, those being disconnected included (their binding stands
        until the store confirms the disconnect)."""
        bound = {r.tenant: r.company_id for r in self._disconnecting.values()}
        bound.update((r.tenant, r.company_id) for r in self._records.values())
        return bound

    def bound_to(self, company_id: str) -> list[str]:
        """The tenants bound to `company_id`, sorted, those being disconnected included (as
        `companies`, without walking every record: an activation asks it)."""
        bound = self._table.bound_to(company_id)
        bound.update(
            r.tenant
            for r in self._disconnecting.values()
            if r.company_id == company_id and r.tenant not in self._records
        )
        return sorted(bound)

    def enforced(self, tenant: str, stored: TenantRecord | None) -> TenantRecord | None:
        """What the proxy enforces for `tenant`, given its record as just read from the store.

        A break not saved yet wins over the older stored record, and a tenant being
        disconnected is gone, whatever the store still holds.
        """
        if self._hides(tenant, stored):
            return None
        held = self._held.get(tenant)
        if held is not None and stored is not None and stored.version <= held.version:
            return held
        return stored

    async def start(self) -> None:
        """Load every record once (best effort) and start the background refresh."""
        await self.refresh()
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()

    async def refresh(self) -> bool:
        """Catch up with the store; False (and `store_problem` set) if it failed.

        The first refresh and every `full_reload_every`-th re-read every record; the others
        re-read only the tenants the store's change journal names.
        """
        self._touched.clear()
        try:
            if self._cursor is None or self._incremental_left <= 0:
                await self._reload_all(None)
            else:
                cursor, changed = await self.store.changes_since(self._cursor)
                if changed is None:
                    await self._reload_all(cursor)
                else:
                    await self._reload_some(changed)
                    self._cursor = cursor
                    self._incremental_left -= 1
        except errors.StoreError as exc:  # unavailable, or anything else the store refused
            if self.store_problem != exc.message:
                emit("store.unavailable", level=logging.WARNING, reason=exc.message)
            self.store_problem = exc.message
            return False
        if self.store_problem is not None:
            emit("store.recovered")
            # The writes that failed while the store was unreachable failed for that reason.
            self.writes.problem = None
        self.store_problem = None
        await self._save_held()
        return True

    def hold(self, record: TenantRecord, events: Sequence[Event] = ()) -> None:
        """Serve `record` (a state change the store could not take yet) until it is saved.

        A broken tenant must stop being served at once even while the store is down; the
        record is written at the next refresh that reaches the store, unless the store has
        moved on meanwhile (another replica rotated the key), in which case the store wins.
        """
        self._held[record.tenant] = record
        self._held_events[record.tenant] = events
        self.remember(record.tenant, record)

    async def _save_held(self) -> None:
        for tenant, record in list(self._held.items()):
            if self._held.get(tenant) is not record:
                continue
            try:
                stored = await self.writes.put(record, events=self._held_events.get(tenant, ()))
            except errors.StoreConflict:
                self._drop_held(tenant, record)  # the store moved on; the next refresh brings it
                continue
            except errors.StoreError:
                return  # still unreachable: try again at the next refresh
            # A change made here while the write was on its way (an activation, a disconnect)
            # already replaced the held record: it wins.
            if self._drop_held(tenant, record):
                self.remember(tenant, stored)

    def _drop_held(self, tenant: str, record: TenantRecord) -> bool:
        """Stop holding `record`; False if it was no longer the one held."""
        if self._held.get(tenant) is not record:
            return False
        del self._held[tenant]
        self._held_events.pop(tenant, None)
        return True

    async def _reload_all(self, cursor: str | None) -> None:
        """Replace memory with every record; `cursor` (if given) was read just before."""
        if cursor is None:
            # Read before the list, so a change made while the list is read is seen next time.
            cursor, _ = await self.store.changes_since(None)
        listed = await self.store.list()
        fresh = {record.tenant: record for record in listed}
        for tenant in self._touched | self._held.keys() | self._disconnecting.keys():
            kept = self._kept(tenant, fresh.get(tenant))
            if kept is None:
                fresh.pop(tenant, None)
            else:
                fresh[tenant] = kept
        self._table.replace(fresh)
        self._cursor = cursor
        self._incremental_left = self.full_reload_every - 1
        self.loaded = True

    async def _reload_some(self, tenants: list[str]) -> None:
        """Re-read the records of `tenants` (named by the change journal)."""

        async def read(tenant: str) -> TenantRecord | None:
            try:
                return await self.store.get(tenant)
            except errors.StoreIntegrityError as exc:
                report_unreadable(self.store.backend, tenant, exc)
                return None  # not served until it is fixed

        fresh = await map_all(read, tenants, limit=CHANGED_READS)
        for tenant, record in zip(tenants, fresh, strict=True):
            kept = self._kept(tenant, record)
            if kept is None:
                self._table.pop(tenant)
            else:
                self._table.put(tenant, kept)

    def _kept(self, tenant: str, fresh: TenantRecord | None) -> TenantRecord | None:
        """What memory keeps of `tenant` after a read: ours if it changed here meanwhile."""
        if self._disconnecting.get(tenant) is not None:
            if self._hides(tenant, fresh):
                return None
            del self._disconnecting[tenant]  # gone from the store, or connected again
        held = self._held.get(tenant)
        if held is not None:
            if fresh is None or fresh.version > held.version:
                del self._held[tenant]  # deleted or changed elsewhere since: the store wins
                self._held_events.pop(tenant, None)
                return fresh
            return held
        if tenant not in self._touched:
            return fresh
        mine = self._records.get(tenant)
        if mine is None or fresh is None or fresh.version <= mine.version:
            return mine
        return fresh

    def _hides(self, tenant: str, stored: TenantRecord | None) -> bool:
        """True if `stored` holds the key a disconnect under way stopped serving: by key, not
        version, since another replica's later write (a check) may carry the same key."""
        hidden = self._disconnecting.get(tenant)
        if hidden is None:
            return False
        return stored is not None and stored.api_key == hidden.api_key

    def _refresh_delay(self) -> float:
        # While the store is down, retry sooner than the TTL so recovery is quick.
        return self.cache_ttl if self.store_problem is None else min(self.cache_ttl, 1.0)

    def _count(self, state: TenantState, count: int) -> None:
        """`broker_tenants{state}`, set as the table's count of `state` changes."""
        self.metrics.tenants.labels(state=state.value).set(count)


def not_active(record: TenantRecord) -> errors.TenantNotActive:
    """The refusal a tenant earns while `record` is not active."""
    message = record.message or "This tenant has not been connected with a working key yet."
    return errors.TenantNotActive(
        message,
        tenant=record.tenant,
        state=record.state.value,
        reason=record.reason.value if record.reason is not None else None,
        since=record.view()["updated_at"],
    )
