"""The registry's records by tenant, with what its background readers need kept up to date.

With every Pleo customer in one broker (50,000 tenants) nothing that runs per request, per
write or per health-check slot may walk every record. `TenantTable` holds the records and,
updated on each change rather than recounted: the number of tenants in each state (the
`broker_tenants{state}` gauge) and the ids of the tenants the health checks visit (active and
broken), sorted. That list changes only when a tenant enters or leaves those states; a write
that keeps the state (a health check's claim writes `last_checked_at`) leaves it alone, and
reading it is O(1) while nothing changed: the same tuple is handed out again. And the
tenants bound to each company, for an activation's `company_in_use` check. And what the
proxy serves each active tenant from (`served`: its `ActiveTenant`, built on first use),
dropped as its record changes, so that the proxy's read is one look-up that needs no check.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping

from broker.records import ActiveTenant, TenantRecord, TenantState

CHECKED_STATES = (TenantState.ACTIVE, TenantState.BROKEN)  # the states the health checks visit

Counted = Callable[[TenantState, int], None]  # told each state's new count when it changes


class TenantTable:
    """Records by tenant id, per-state counts and the sorted ids of the checked tenants.

    `records` is read directly (the proxy's hot path is one dictionary look-up); every change
    goes through `put`, `pop` or `replace`, which keep the rest in step.
    """

    def __init__(self, counted: Counted | None = None) -> None:
        self.records: dict[str, TenantRecord] = {}
        # tenant → the ActiveTenant made of its current record (`TenantRegistry.active` adds
        # them); an entry goes as soon as its record is replaced or removed, so one look-up
        # serves a request (with 50,000 tenants taking turns, one scattered read fewer).
        self.served: dict[str, ActiveTenant] = {}
        self.counts: dict[TenantState, int] = dict.fromkeys(TenantState, 0)
        self._counted = counted
        self._checked: list[str] = []  # sorted
        self._snapshot: tuple[str, ...] | None = ()  # `_checked` as handed out; None: stale
        self._published = False  # every state's count told once (the gauge shows them all)
        # company id → the tenants bound to it (tuples: nearly always one, and 50,000 sets
        # would cost ~12 MiB)
        self._by_company: dict[str, tuple[str, ...]] = {}

    def put(self, tenant: str, record: TenantRecord) -> None:
        """Keep `record` as the tenant's."""
        old = self.records.get(tenant)
        self.records[tenant] = record
        if old is not record:
            self.served.pop(tenant, None)
        if old is None or old.state is not record.state:
            self._moved(tenant, old.state if old is not None else None, record.state)
        before = old.company_id if old is not None else None
        if before != record.company_id:
            self._bind(tenant, before, record.company_id)

    def pop(self, tenant: str) -> TenantRecord | None:
        """Forget the tenant; its record, if it had one."""
        old = self.records.pop(tenant, None)
        self.served.pop(tenant, None)
        if old is not None:
            self._moved(tenant, old.state, None)
            self._bind(tenant, old.company_id, None)
        return old

    def replace(self, fresh: Mapping[str, TenantRecord]) -> None:
        """Hold exactly `fresh` (a full reload): everything recounted once."""
        kept = {t: a for t, a in self.served.items() if fresh.get(t) is a.record}
        self.served.clear()  # the same dict: the registry reads it directly
        self.served.update(kept)
        self.records.clear()
        self.records.update(fresh)
        counts = dict.fromkeys(TenantState, 0)
        self._by_company = {}
        for tenant, record in self.records.items():
            counts[record.state] += 1
            if record.company_id is not None:
                self._bind(tenant, None, record.company_id)
        checked = sorted(t for t, r in self.records.items() if r.state in CHECKED_STATES)
        if checked != self._checked:
            self._checked = checked
            self._snapshot = None
        for state, count in counts.items():
            if count != self.counts[state] or not self._published:
                self.counts[state] = count
                self._tell(state)

    def checked(self) -> tuple[str, ...]:
        """The ids of the active and broken tenants, sorted (the same tuple until it changes)."""
        if self._snapshot is None:
            self._snapshot = tuple(self._checked)
        return self._snapshot

    def bound_to(self, company_id: str) -> set[str]:
        """The tenants whose records are bound to `company_id`."""
        return set(self._by_company.get(company_id, ()))

    def _bind(self, tenant: str, before: str | None, after: str | None) -> None:
        if before is not None:
            rest = tuple(t for t in self._by_company[before] if t != tenant)
            if rest:
                self._by_company[before] = rest
            else:
                del self._by_company[before]
        if after is not None:
            self._by_company[after] = (*self._by_company.get(after, ()), tenant)

    def _moved(self, tenant: str, old: TenantState | None, new: TenantState | None) -> None:
        if old is not None:
            self.counts[old] -= 1
            self._tell(old)
        if new is not None:
            self.counts[new] += 1
            self._tell(new)
        was, now = old in CHECKED_STATES, new in CHECKED_STATES
        if was and not now:
            del self._checked[bisect.bisect_left(self._checked, tenant)]
            self._snapshot = None
        elif now and not was:
            bisect.insort(self._checked, tenant)
            self._snapshot = None

    def _tell(self, state: TenantState) -> None:
        if self._counted is None:
            return
        if not self._published:
            self._published = True
            for other in TenantState:
                self._counted(other, self.counts[other])
        else:
            self._counted(state, self.counts[state])
