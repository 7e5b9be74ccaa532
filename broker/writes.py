"""Writes to the store, watched: whether the store takes writes is what readiness reports.

A store can be readable and still refuse every write (a full disk, a read-only mount, a Vault
policy gone wrong): the last write's failure is kept as `problem` until a write succeeds, and
`/readyz` says `degraded` meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from broker import errors
from broker.events import emit
from broker.outbox import Event
from broker.records import TenantRecord
from broker.stores import SecretStore


class StoreWrites:
    """The store's `put` and `delete`, noting whether the store takes writes."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self.problem: str | None = None  # why the last write failed, until one succeeds

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        """`store.put` with the change's events."""
        try:
            stored = await self.store.put(record, events=events)
        except errors.StoreUnavailable as exc:
            self._failed(exc)
            raise
        self.problem = None
        return stored

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        """`store.delete` with its events."""
        try:
            existed = await self.store.delete(tenant, events=events)
        except errors.StoreUnavailable as exc:
            self._failed(exc)
            raise
        self.problem = None
        return existed

    def _failed(self, exc: errors.StoreUnavailable) -> None:
        if self.problem != exc.message:
            emit("store.write_failed", level=logging.WARNING, reason=exc.message)
        self.problem = exc.message
