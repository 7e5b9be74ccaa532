"""The Vault/OpenBao store: one KV v2 secret per tenant, compare-and-set on its version.

A tenant lives at `<mount>/data/<prefix>/tenants/<tenant>`; the record's `version` is the KV v2
version of that secret, and every write carries `cas=<version read>` (0: must not exist), so
Vault itself refuses a stale write. KV v2 keeps old versions: after every write each older
version is destroyed, so an old key cannot be read back from history (and what a failure or a
crash left is destroyed later: `broker.stores.vault_history`).

`delete` takes several calls and may stop after any of them, so it first writes a tombstone as
the newest version: from then on the tenant reads as gone (`get` None, absent from `list`), and a
writer still holding an older version cannot write it back (its check-and-set fails). Then every
older version is destroyed and the metadata deleted. A tenant whose newest version is a
tombstone, destroyed or soft-deleted is no tenant: `put` with version 0 writes over it (with
check-and-set on that newest version, so concurrent creators still let exactly one win), and
`delete` again finishes the job.

hvac is synchronous: every call runs in a bounded thread pool (`BlockingRunner`), one call per
thread slot, each bounded by the timeout (also the HTTP timeout). Transport errors, timeouts, a
sealed Vault and 5xx answers become `StoreUnavailable`. A full `list` reads the records with
the data plane's client (`broker.wire_pool`) instead, as many at once as there are threads,
and falls back to hvac for any record that read cannot answer plainly
(`broker.stores.vault_bulk`): 50,000 tenants in seconds.

The change journal is one more secret, `<mount>/data/<prefix>/journal`: see
`broker.stores.vault_journal`. Events travel in the tenant's secret (`outbox`) and are copied
to the event log under `<mount>/data/<prefix>/events/`: see `broker.stores.vault_events`.
The KV v2 calls themselves: `broker.stores.vault_kv`.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import hvac
import hvac.exceptions
import requests

from broker.connect_sessions import ConnectSession
from broker.delivery import Delivery, Settlement
from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.events import emit
from broker.outbox import Event, stamp
from broker.records import TenantRecord, valid_tenant_id
from broker.stores import report_unreadable
from broker.stores.runner import BlockingRunner
from broker.stores.vault_auth import TokenKeeper, VaultLogin
from broker.stores.vault_bulk import BulkReader, BulkReads, Unanswered
from broker.stores.vault_delivery import VaultDelivery
from broker.stores.vault_events import CLOCK_SKEW, EventLog, outbox, pending
from broker.stores.vault_history import VersionHistory
from broker.stores.vault_journal import (
    JOURNAL_SIZE,
    JOURNAL_SIZE_LIMIT,
    JOURNAL_VERSIONS_KEPT,
    VaultJournal,
)
from broker.stores.vault_kv import (
    SecretData,
    TenantSecrets,
    decode,
    encode,
    is_tombstone,
    tombstone,
)
from broker.stores.vault_sessions import SessionSecrets
from broker.tasks import map_all

__all__ = ["JOURNAL_SIZE", "JOURNAL_VERSIONS_KEPT", "VaultOptions", "VaultStore"]

T = TypeVar("T")

DELETE_ATTEMPTS = 5  # tombstone writes tried while other writers keep changing the tenant
OUTBOX_RESCUED_ON_READ = timedelta(days=1)  # older outboxes wait for the tenant's next write

_SERVER_TROUBLE = (
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.UnexpectedError,
    hvac.exceptions.VaultNotInitialized,
)


@dataclass(frozen=True, slots=True)
class VaultOptions:
    """Where the store keeps its secrets, and how hard it may drive Vault."""

    mount: str = "secret"
    prefix: str = "pleo-broker"
    timeout: float = 5.0  # seconds for one Vault call (the client's HTTP timeout too)
    threads: int = 8  # Vault calls in flight at once
    journal_size: int = JOURNAL_SIZE
    event_retention: timedelta = timedelta(days=30)  # older outbox events are not logged again

    def __post_init__(self) -> None:
        if not 1 <= self.journal_size <= JOURNAL_SIZE_LIMIT:
            raise ValueError(f"the journal keeps 1 to {JOURNAL_SIZE_LIMIT} entries")


class VaultStore:
    """Tenant records in HashiCorp Vault or OpenBao (KV v2)."""

    backend = "vault"
    read_only: str | None = None

    def __init__(
        self,
        client: hvac.Client,
        credentials: VaultLogin,
        options: VaultOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        options = options if options is not None else VaultOptions()
        self._client = client
        self._kv = client.secrets.kv.v2
        self._mount = options.mount.strip("/")
        prefix = options.prefix.strip("/")
        self._base = f"{prefix}/tenants"
        self._secrets = TenantSecrets(self._kv, mount=self._mount, base=self._base)
        self._threads = options.threads
        self._runner = BlockingRunner(
            "vault-store",
            workers=options.threads,
            timeout=options.timeout,
            translate=partial(_translate_trouble, timeout=options.timeout),
        )
        self._keeper = TokenKeeper(client, credentials, self._runner.run, clock=clock)
        self._bulk = BulkReader(
            client, self._keeper.ensure, mount=self._mount, timeout=options.timeout
        )
        self._journal = VaultJournal(
            self._kv,
            self._call,
            mount=self._mount,
            path=f"{prefix}/journal",
            size=options.journal_size,
        )
        self._sessions = SessionSecrets(
            self._kv, mount=self._mount, base=f"{prefix}/connect-sessions"
        )
        self._history = VersionHistory(
            self._secrets, self._call, backend=self.backend, bulk=self._bulk
        )
        self._events = EventLog(self._kv, self._call, mount=self._mount, base=f"{prefix}/events")
        self._retention = options.event_retention
        self._delivery = VaultDelivery(
            self._kv, self._call, self._events, mount=self._mount, path=f"{prefix}/delivery"
        )
        self._where = f"{client.url} {self._mount}/{self._base}"

    def __repr__(self) -> str:
        return f"VaultStore({self._where!r})"

    async def get(self, tenant: str) -> TenantRecord | None:
        if not valid_tenant_id(tenant):
            return None
        return await self._record(
            tenant, await self._call(lambda: self._secrets.read(tenant, None))
        )

    async def _record(
        self, tenant: str, found: tuple[SecretData, int] | None
    ) -> TenantRecord | None:
        """The record a read of the tenant's newest version found (None: no tenant)."""
        if found is not None:
            await self._rescue(found[0])
        if found is None or is_tombstone(found[0]):
            return None
        return decode(tenant, *found)

    async def list(self) -> builtins.list[TenantRecord]:
        names = await self._call(self._secrets.names)
        async with self._bulk.session(self._threads) as reads:
            records = await map_all(partial(self._list_one, reads), names, limit=self._threads)
        self._history.listed(names)
        return [record for record in records if record is not None]

    async def _list_one(self, reads: BulkReads, tenant: str) -> TenantRecord | None:
        """One tenant of a full list: read in bulk, else through hvac (its retries and
        errors); a record that cannot be read is reported and skipped, not fatal."""
        try:
            try:
                found = await reads.read(self._secrets.path(tenant))
            except Unanswered:
                return await self.get(tenant)
            return await self._record(tenant, found)
        except StoreIntegrityError as exc:
            report_unreadable(self.backend, tenant, exc)
            return None

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        tenant = record.tenant
        if not valid_tenant_id(tenant):
            raise ValueError("not a valid tenant id")
        try:
            version, events = await self._put(tenant, encode(record), events, record.version)
        except StoreUnavailable:
            self._history.unsure(tenant)  # it may have landed, answered too late: check it
            raise
        if version > 1:
            # Every older version is obsolete: destroy them all on every write, not only on a
            # rotation, so a key a failed destroy left behind goes at the next write (even
            # one made by another process or after a restart).
            await self._history.destroy_below(tenant, below=version)
        await self._journal.record(tenant, backend=self.backend)
        await self._log(events)
        return record.evolve(version=version)

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        if not valid_tenant_id(tenant):
            return False
        try:
            buried = await self._tombstone_and_bury(tenant, events)
        except StoreUnavailable:
            self._history.unsure(tenant)  # the history check destroys what is left
            raise
        return buried

    async def _tombstone_and_bury(self, tenant: str, events: Sequence[Event]) -> bool:
        laid = await self._lay_tombstone(tenant, events)
        if laid is None:
            return False
        tombstone_version, events = laid
        try:
            # Burying destroys the tombstone and the events it carries: log them first.
            await self._events.append(events)
            await self._bury(tenant, tombstone_version)
        finally:
            # Even if the rest failed, replicas re-read the tenant, find the tombstone and
            # stop using its key within their cache TTL.
            await self._journal.record(tenant, backend=self.backend)
        return True

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        """A new cursor and the tenants changed since `cursor`, or None: reload everything."""
        return await self._journal.changes_since(cursor, backend=self.backend)

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        """Up to `limit` events after `cursor`, oldest first, and the cursor to go on from."""
        return await self._events.read(cursor, limit, tenant)

    async def prune_events(self, before: datetime) -> int:
        """Forget the events older than `before` (whole chunks of the log); how many."""
        return await self._events.prune(before)

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        """Take the delivery lease (check-and-set) and return the events due."""
        return await self._delivery.claim(holder, now, lease, limit)

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        """Record how `holder`'s attempts ended, while it holds the lease; the ids recorded."""
        return await self._delivery.settle(holder, settled, now)

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        """Give up `holder`'s lease (check-and-set), so another replica goes on at once."""
        await self._delivery.release(holder)

    async def pending_deliveries(self) -> int:
        """The events neither delivered nor given up."""
        return await self._delivery.pending()

    async def _log(self, events: Sequence[Event]) -> None:
        """Copy a written change's events to the log; if that fails they wait in its outbox."""
        try:
            await self._events.append(events)
        except StoreUnavailable as exc:
            emit(
                "store.events_pending", level=logging.WARNING, events=len(events), error=exc.message
            )

    async def _rescue(self, data: dict[str, object]) -> None:
        """Log the recent events a read secret carries (a copy a crash interrupted)."""
        waiting = _younger(pending(data), OUTBOX_RESCUED_ON_READ)
        if waiting:
            await self._log(waiting)

    async def _carry(self, tenant: str, version: int) -> builtins.list[Event]:
        """The events a version about to be replaced still has to log: copied now, else
        (the log failing) returned, for the replacing write to carry in its outbox."""
        found = await self._call(partial(self._secrets.read, tenant, version))
        if found is None:
            return []  # destroyed or deleted: nothing left to carry
        return await self._copy_or_carry(found[0])

    async def _copy_or_carry(self, data: dict[str, object]) -> builtins.list[Event]:
        # Older events were logged and pruned long ago (or would have been): not again.
        waiting = _younger(pending(data), self._retention - CLOCK_SKEW)
        if not waiting:
            return []
        try:
            await self._events.append(waiting)
        except StoreUnavailable as exc:
            emit(
                "store.events_pending",
                level=logging.WARNING,
                events=len(waiting),
                error=exc.message,
            )
            return waiting
        return []

    async def put_session(self, session: ConnectSession) -> ConnectSession:
        return await self._call(partial(self._sessions.write, session))

    async def get_session(self, token_hash: str) -> ConnectSession | None:
        return await self._call(partial(self._sessions.read, token_hash))

    async def list_sessions(self) -> builtins.list[ConnectSession]:
        found = [await self.get_session(name) for name in await self._call(self._sessions.names)]
        return [session for session in found if session is not None]

    async def delete_session(self, token_hash: str) -> bool:
        return await self._call(partial(self._sessions.forget, token_hash))

    async def close(self) -> None:
        await self._history.close()
        await self._runner.close()
        self._client.adapter.close()

    async def _put(
        self, tenant: str, data: dict[str, object], events: Sequence[Event], cas: int
    ) -> tuple[int, builtins.list[Event]]:
        """Write `data` and `events` with check-and-set, carrying forward the events the
        replaced version still has to log; the new version and the events it carries."""
        carried = await self._carry(tenant, cas) if cas > 0 else []
        try:
            return await self._write_carrying(tenant, data, [*carried, *events], cas)
        except StoreConflict:
            if cas != 0:
                raise
            # "Must not exist" holds too for a tenant whose disconnect was interrupted.
            gone_at = await self._gone_at(tenant)
            if gone_at is None:
                raise
            carried = await self._carry(tenant, gone_at)  # the tombstone's, say
            return await self._write_carrying(tenant, data, [*carried, *events], gone_at)

    async def _write_carrying(
        self, tenant: str, data: dict[str, object], events: builtins.list[Event], cas: int
    ) -> tuple[int, builtins.list[Event]]:
        write = partial(self._secrets.write, tenant, {**data, **outbox(events)}, cas)
        return await self._call(write), events

    async def _lay_tombstone(
        self, tenant: str, events: Sequence[Event]
    ) -> tuple[int, builtins.list[Event]] | None:
        """Write a tombstone as the tenant's newest version; its version and the events it
        carries (None: no tenant). A tombstone laid already (a disconnect that stopped
        midway) is kept, with its events: a retry does not announce the disconnect again."""
        for _ in range(DELETE_ATTEMPTS):
            versions = await self._call(partial(self._secrets.versions, tenant))
            if versions is None:
                return None
            found = None
            if versions.current_readable:
                found = await self._call(partial(self._secrets.read, tenant, versions.current))
            if found is not None and is_tombstone(found[0]):
                return versions.current, _younger(pending(found[0]), self._retention - CLOCK_SKEW)
            carried = await self._copy_or_carry(found[0]) if found is not None else []
            try:
                # The point of no return: from here on the tenant reads as gone everywhere.
                return await self._write_carrying(
                    tenant, tombstone(), [*carried, *events], versions.current
                )
            except StoreConflict:
                continue  # written meanwhile: bury the newer version
        raise StoreConflict(
            f"Tenant {tenant!r} kept changing while it was being disconnected; retry.",
            tenant=tenant,
        )

    async def _gone_at(self, tenant: str) -> int | None:
        """The newest version of a tenant that reads as gone (tombstone, destroyed), or None."""
        versions = await self._call(partial(self._secrets.versions, tenant))
        if versions is None or versions.current == 0:
            return None
        if not versions.current_readable:
            return versions.current
        found = await self._call(partial(self._secrets.read, tenant, versions.current))
        if found is None or is_tombstone(found[0]):
            return versions.current
        return None

    async def _bury(self, tenant: str, tombstone_version: int) -> None:
        """Destroy every version below the tombstone, then the metadata (unless rewritten)."""
        versions = await self._call(partial(self._secrets.versions, tenant))
        if versions is None:
            return  # another disconnect finished it
        older = versions.live_below(tombstone_version)
        if older:
            await self._call(partial(self._secrets.destroy, tenant, older))
        if versions.current == tombstone_version:  # else connected again: keep the new record
            await self._call(partial(self._secrets.forget, tenant))

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run one Vault call with a valid token; after a 403, log in again and retry once."""
        await self._keeper.ensure()
        generation = self._keeper.generation
        try:
            try:
                return await self._runner.run(fn)
            except hvac.exceptions.Forbidden:
                await self._keeper.relogin(generation)
            return await self._runner.run(fn)
        except hvac.exceptions.Forbidden as exc:
            raise StoreUnavailable(
                "Vault denied the broker access; check the broker's Vault policy and prefix."
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise StoreUnavailable("Vault rejected the broker's request.") from exc


def _younger(events: builtins.list[Event], than: timedelta) -> builtins.list[Event]:
    """The events made less than `than` ago."""
    since = stamp(datetime.now(UTC) - than)
    return [event for event in events if event.timestamp >= since]


def _translate_trouble(exc: Exception, *, timeout: float) -> Exception | None:
    """The `StoreUnavailable` for a transport failure, a timeout or a server in trouble."""
    if isinstance(exc, TimeoutError | requests.Timeout):
        return StoreUnavailable(f"Vault did not answer within {timeout:g} seconds.")
    if isinstance(exc, requests.RequestException):
        return StoreUnavailable("Vault could not be reached.")
    if isinstance(exc, hvac.exceptions.VaultDown):
        return StoreUnavailable("Vault is sealed or down (503).")
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return StoreUnavailable("Vault is rate-limiting the broker (429).")
    if isinstance(exc, _SERVER_TROUBLE):
        return StoreUnavailable("Vault answered with a server error.")
    return None
