"""What activation, checks and disconnects share: the store, the registry, per-tenant locks.

Changes are written to the store first (compare-and-set) and then to the in-memory
registry (`broker.registry`), so they are seen at once in this process; other replicas see
them when their registries next refresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broker import errors
from broker.flight import KeyedLocks
from broker.metrics import Metrics
from broker.outbox import Event, new_event
from broker.records import TenantRecord, TenantState, valid_tenant_id
from broker.registry import TenantRegistry
from broker.stores import SecretStore


class TenantBook:
    """The tenants' records as the lifecycle reads and writes them."""

    def __init__(self, store: SecretStore, registry: TenantRegistry, metrics: Metrics) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self._locks = KeyedLocks()

    def lock(self, tenant: str) -> asyncio.Lock:
        """The lock every change of `tenant` is made under."""
        return self._locks[tenant]

    async def fetch(self, tenant: str, *, remember: bool = False) -> TenantRecord:
        """The tenant's record, fresh from the store when it answers, else from memory.

        Only a caller holding the tenant's lock may `remember` what it read: an unlocked
        read can finish after a concurrent change and would put an older record back.
        """
        require_valid(tenant)
        try:
            record = await self.store.get(tenant)
        except errors.StoreUnavailable:
            record = self.registry.get(tenant)
            if record is None and not self.registry.loaded:
                raise
        else:
            # Show what the proxy enforces: a break not saved yet, a disconnect under way.
            record = self.registry.enforced(tenant, record)
            if remember:
                self.registry.remember(tenant, record)
        if record is None:
            if self.registry.disconnecting(tenant):
                raise errors.TenantUnknown(
                    "This tenant is being disconnected: the broker no longer uses its key, but"
                    " the store has not confirmed that the key is destroyed. Retry"
                    f" DELETE /v1/tenants/{tenant}.",
                    tenant=tenant,
                )
            raise errors.TenantUnknown(tenant=tenant)
        return record

    async def write(
        self,
        record: TenantRecord,
        *,
        actor: str = "admin",
        announce: Sequence[str] = (),
        caller: str | None = None,
    ) -> TenantRecord:
        """Compare-and-set `record` in the store with the events `announce` names, then
        serve it from memory: the change and its events land together or not at all."""
        events = self.events(record, actor, announce, caller)
        stored = await self.registry.writes.put(record, events=events)
        self.registry.remember(record.tenant, stored)
        return stored

    def events(
        self, record: TenantRecord, actor: str, kinds: Sequence[str], caller: str | None = None
    ) -> list[Event]:
        """The events of `kinds` about `record`, caused by `actor` (the one place they are
        built: whatever caused the change, an event carries the view, never the key);
        `caller`: the proxy's caller whose call caused it, when a callers file names it."""
        view = record.view()
        return [new_event(kind, actor, view, caller=caller) for kind in kinds]

    def transition(self, to_state: TenantState, reason: str) -> None:
        """Count a state change."""
        self.metrics.tenant_transitions.labels(to_state=to_state.value, reason=reason).inc()


def require_valid(tenant: str) -> None:
    """Refuse a malformed tenant id before anything is looked up."""
    if not valid_tenant_id(tenant):
        raise errors.TenantInvalid(tenant=tenant[:80])
