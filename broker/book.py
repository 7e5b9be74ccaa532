"""What activation, checks and disconnects share: the store, the registry, per-tenant locks.

Changes are written to the store first (compare-and-set) and then to the in-memory
registry (`broker.registry`), so they are seen at once in this process; other replicas see
them when their registries next refresh.
"""

from __future__ import annotations

import asyncio

from broker import errors
from broker.flight import KeyedLocks
from broker.metrics import Metrics
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

    async def write(self, record: TenantRecord) -> TenantRecord:
        """Compare-and-set `record` in the store, then serve it from memory."""
        stored = await self.registry.put(record)
        self.registry.remember(record.tenant, stored)
        return stored

    def transition(self, to_state: TenantState, reason: str) -> None:
        """Count a state change."""
        self.metrics.tenant_transitions.labels(to_state=to_state.value, reason=reason).inc()


def require_valid(tenant: str) -> None:
    """Refuse a malformed tenant id before anything is looked up."""
    if not valid_tenant_id(tenant):
        raise errors.TenantInvalid(tenant=tenant[:80])
