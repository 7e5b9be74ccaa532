"""A SecretStore wrapper that counts every operation in `broker_store_operations_total`."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from broker.delivery import Delivery, Settlement
from broker.errors import StoreConflict
from broker.metrics import Metrics
from broker.outbox import Event
from broker.records import TenantRecord
from broker.stores import SecretStore

T = TypeVar("T")


class InstrumentedStore:
    """Counts operations by backend, op and result (`ok`, `conflict` or `error`)."""

    def __init__(self, inner: SecretStore, metrics: Metrics) -> None:
        self.inner = inner
        self.backend = inner.backend
        self._counter = metrics.store_operations

    @property
    def read_only(self) -> str | None:
        return self.inner.read_only

    async def _count(self, op: str, call: Awaitable[T]) -> T:
        try:
            result = await call
        except StoreConflict:
            self._counter.labels(backend=self.backend, op=op, result="conflict").inc()
            raise
        except Exception:
            self._counter.labels(backend=self.backend, op=op, result="error").inc()
            raise
        self._counter.labels(backend=self.backend, op=op, result="ok").inc()
        return result

    async def get(self, tenant: str) -> TenantRecord | None:
        return await self._count("get", self.inner.get(tenant))

    async def list(self) -> list[TenantRecord]:
        return await self._count("list", self.inner.list())

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        return await self._count("put", self.inner.put(record, events=events))

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        return await self._count("delete", self.inner.delete(tenant, events=events))

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        return await self._count("events", self.inner.events_after(cursor, limit, tenant))

    async def prune_events(self, before: datetime) -> int:
        return await self._count("prune_events", self.inner.prune_events(before))

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        claim = self.inner.claim_deliveries(holder, now=now, lease=lease, limit=limit)
        return await self._count("claim_deliveries", claim)

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        settle = self.inner.settle_deliveries(holder, settled, now=now)
        return await self._count("settle_deliveries", settle)

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        await self._count("release_deliveries", self.inner.release_deliveries(holder, now=now))

    async def pending_deliveries(self) -> int:
        return await self._count("pending_deliveries", self.inner.pending_deliveries())

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        return await self._count("changes", self.inner.changes_since(cursor))

    async def close(self) -> None:
        await self.inner.close()
