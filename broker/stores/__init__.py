"""Secret stores: where tenant records and their keys live.

Every store implements `SecretStore`. Writes are compare-and-set on `TenantRecord.version`:
`put(record)` succeeds only if the stored version still equals `record.version` (0 for a
tenant that must not exist yet), stores the record with version + 1 and returns it, or raises
`StoreConflict`. `delete` destroys the key material, not only the newest copy of it. A store
that can be read but not written (a read-only file system) opens anyway, says why in
`read_only`, and answers every write with `StoreUnavailable`. Failures
to reach the backing service raise `StoreUnavailable`. A record that cannot be read back
(wrong master key, tampered or hand-edited) makes `get` raise `StoreIntegrityError`; `list`
skips it and reports it (`report_unreadable`), so one bad record never hides the others.

Every store also keeps a change journal (`broker.stores.journal`), so that a reader can
follow other processes' writes without re-reading every tenant:
`changes_since(cursor)` returns a new opaque cursor and the ids of the tenants put or deleted
since `cursor`, or `None` for "cannot tell, reload everything" (no cursor, a cursor from
another database, journal or backend, a garbled one, or one older than the entries the journal
still holds). Called again with the cursor it returned and no write in between, it returns an
empty list. It costs one or two round-trips to the backing service, whatever the number of
tenants. A reader that reloads everything reads the cursor before calling `list()`, so a
change made while the list is read is reported again next time. A cursor is good for any
store object on the same database or Vault prefix (replicas share them).

Every store also keeps the event log (`broker.outbox`): `put` and `delete` take the events
of the change and store them atomically with it (a failed write leaves none);
`events_after(cursor, limit, tenant)` reads them in order, each once, with an opaque cursor
(`ValueError` for one that is not the store's); `prune_events(before)` drops old ones.

Every store also keeps the webhook delivery state of those events (`broker.delivery`), so it
survives restarts and is shared by replicas: `claim_deliveries` leases to one holder each
tenant's oldest event not delivered or given up yet, once due; `settle_deliveries` records how
the holder's attempts ended (ignored once its lease has run out); `pending_deliveries` counts
the events not delivered or given up.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from broker.delivery import Delivery, Settlement
from broker.errors import StoreIntegrityError
from broker.events import emit
from broker.outbox import Event
from broker.records import TenantRecord


def report_unreadable(backend: str, tenant: str, exc: StoreIntegrityError) -> None:
    """Log a record `list` had to skip (its tenant is not served until it is fixed)."""
    emit(
        "store.record_unreadable",
        level=logging.ERROR,
        backend=backend,
        tenant=tenant,
        reason=exc.message,
    )


class SecretStore(Protocol):
    """The seam between the tenant service and where keys are kept."""

    backend: str

    @property
    def read_only(self) -> str | None:
        """None, or why this store takes no writes at all (opened read-only)."""
        ...

    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None."""
        ...

    async def list(self) -> list[TenantRecord]:
        """Every tenant's record."""
        ...

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        """Compare-and-set write (with its events); returns the stored record."""
        ...

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        """Destroy the tenant and its key material (writing `events`); False if none."""
        ...

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        """Up to `limit` events after `cursor`, oldest first, and the cursor to go on from."""
        ...

    async def prune_events(self, before: datetime) -> int:
        """Forget the events older than `before`; how many."""
        ...

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        """Up to `limit` events due for delivery (one a tenant, its oldest), leased to `holder`
        until `now + lease`; none while another holder's lease runs."""
        ...

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        """Record how `holder`'s attempts ended (nothing if its lease ran out); the ids of
        the events whose settlement was recorded."""
        ...

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        """Give up `holder`'s lease (it stops): its unsettled events are due again at once."""
        ...

    async def pending_deliveries(self) -> int:
        """How many events are neither delivered nor given up."""
        ...

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...
