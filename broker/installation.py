"""The customer's installation in Pleo, kept in step with the tenant.

README, "The installation in Pleo", tells operators and integrations how to use it.

The broker owns each customer's key, so it owns the installation Pleo keeps for it: after a
valid activation or rotation it makes sure the installation exists in
`BROKER_INSTALLATION_STATUS_ON_ACTIVATION` with `metadata.externalConfigurationId` = the
tenant; the integration moves it through its own sync (`PUT /v1/tenants/{t}/installation`);
a disconnect sets it `INACTIVE` or deletes it. A failure to sync never undoes an activation:
the record keeps the wanted status and the error, and the next check retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from broker import errors
from broker.book import TenantBook, require_valid
from broker.events import emit
from broker.pleo import PleoClient
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState, utcnow
from broker.registry import not_active

STATUSES = ("ACTIVATED", "INACTIVE", "AUTHORIZED", "PENDING_INTEGRATION", "ERROR")
CHANGED = "tenant.installation_changed"
# What an activation's first write records, so that a sync whose own write is lost is
# retried by the next check (`due`).
NOT_SYNCED = "Not synced with Pleo yet."
DISCONNECT_TIMEOUT = 5.0  # seconds a disconnect waits for Pleo, the key still in use
RATE_LIMITED_PAUSE = 60.0  # seconds checks leave a 429 without a usable Retry-After alone
# What a disconnect did to the installation (`X-Broker-Installation` on DELETE's 204): set
# INACTIVE, deleted, none there (or no key), Pleo failed (logged), or the key Pleo rejects.
DISCONNECT_OUTCOMES = ("inactive", "deleted", "none", "failed", "key_rejected")


def metadata_for(tenant: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata the broker sends: the integration's, with the tenant named."""
    return {**(given or {}), "externalConfigurationId": tenant}


def require_status(status: object) -> str:
    """`status` if it is one of Pleo's installation statuses, else `request_invalid`."""
    if not isinstance(status, str) or status not in STATUSES:
        raise errors.RequestInvalid("status must be one of: " + ", ".join(STATUSES))
    return status


class InstallationSync:
    """Puts tenants' installations in Pleo in the status the broker keeps them in."""

    def __init__(self, book: TenantBook, pleo: PleoClient, on_activation: str) -> None:
        self.book = book
        self.pleo = pleo
        self.on_activation = require_status(on_activation)
        # Breaks a tenant whose key Pleo rejected (`Checks.key_rejected`; takes the lock).
        self.key_rejected: Callable[[TenantRecord], Awaitable[TenantRecord]] | None = None
        self.clock: Callable[[], float] = time.monotonic
        self.disconnect_timeout = DISCONNECT_TIMEOUT
        # What keeps checks from retrying a tenant's failed sync (this replica's memory):
        # the key Pleo answered a permanent 4xx for (until an activation or an admin PUT
        # syncs again), and the time a 429's back-off ends.
        self._refused: dict[str, ApiKey] = {}
        self._paused_until: dict[str, float] = {}

    def unsynced(self, record: TenantRecord) -> TenantRecord:
        """`record` as an activation first writes it: its installation due for a sync."""
        return record.evolve(
            installation_status=self.on_activation,
            installation_synced_at=None,
            installation_error=NOT_SYNCED,
        )

    def due(self, record: TenantRecord, actor: str = "admin") -> bool:
        """Whether a check by `actor` should retry: an active tenant whose last sync failed
        (or whose sync was never saved, `NOT_SYNCED`). Not a 403's re-check on the proxy's
        path (the health check retries, once a round), not after a permanent 4xx with the same
        key, not while a 429 from the installation calls is being honoured. (A tenant
        activated before the broker kept installations is synced by its next activation or
        installation change, not by checks: periodic checks keep to their rate.)"""
        if not (
            record.state is TenantState.ACTIVE
            and record.api_key is not None
            and record.installation_error is not None
            and actor != "proxy"
        ):
            return False
        if self._refused.get(record.tenant) == record.api_key:
            return False
        return self.clock() >= self._paused_until.get(record.tenant, 0.0)

    async def after_activation(self, record: TenantRecord, actor: str) -> TenantRecord:
        """Sync a freshly activated tenant (its lock held); never raises."""
        record, _ = await self.sync(record, self.on_activation, None, actor)
        return record

    async def retry(self, record: TenantRecord, actor: str) -> TenantRecord:
        """A check's retry of a failed (or never made) sync (its lock held); never raises."""
        status = record.installation_status or self.on_activation
        record, _ = await self.sync(record, status, None, actor)
        return record

    async def set_status(
        self, tenant: str, status: object, metadata: object, *, actor: str = "admin"
    ) -> TenantRecord:
        """`PUT /v1/tenants/{tenant}/installation`: the integration's own transition, sent
        with the tenant's key; raises `pleo_unavailable` (the view keeps the error)."""
        require_valid(tenant)
        wanted = require_status(status)
        if metadata is not None and not isinstance(metadata, dict):
            raise errors.RequestInvalid("metadata must be a JSON object when given.")
        async with self.book.lock(tenant):
            record = await self.book.fetch(tenant, remember=True)
            if record.state is not TenantState.ACTIVE or record.api_key is None:
                raise errors.TenantNotActive(
                    "Only an active tenant's installation can be changed: its key is needed.",
                    tenant=tenant,
                    state=record.state.value,
                )
            record, failure = await self.sync(record, wanted, metadata, actor)
        if isinstance(failure, errors.PleoKeyRejected) and self.key_rejected is not None:
            # Like any other 401: the tenant is broken at once, and answers as the proxy does.
            raise not_active(await self.key_rejected(record)) from failure
        if failure is not None:
            raise errors.PleoUnavailable(
                f"Pleo did not take the installation's status: {failure.message}. The broker"
                " keeps the wanted status and retries on the tenant's next check, but not the"
                " metadata: send the metadata again once Pleo answers.",
                tenant=tenant,
            )
        return record

    async def sync(
        self,
        record: TenantRecord,
        status: str,
        metadata: dict[str, Any] | None,
        actor: str,
    ) -> tuple[TenantRecord, errors.PleoError | None]:
        """Put `record`'s installation in `status`; the record as written, and why Pleo
        failed (None: it did not). A store failure keeps the record as it was."""
        api_key = _key_of(record)
        failure: errors.PleoError | None = None
        try:
            change = await self.pleo.put_installation(
                api_key, status, metadata_for(record.tenant, metadata)
            )
        except errors.PleoError as exc:
            failure = exc
            updated = record.evolve(installation_status=status, installation_error=exc.message)
            self._hold_back(record, exc)
            announce: list[str] = []
            emit(
                "tenant.installation_sync_failed",
                level=logging.WARNING,
                tenant=record.tenant,
                status=status,
                error=exc.message,
            )
        else:
            self._refused.pop(record.tenant, None)
            self._paused_until.pop(record.tenant, None)
            updated = record.evolve(
                installation_status=status,
                installation_synced_at=utcnow(),
                installation_error=None,
            )
            announce = [CHANGED] if change.changed else []
            if change.changed:
                emit(CHANGED, tenant=record.tenant, status=status, previous=change.previous)
        return await self._save(record, updated, announce, actor), failure

    def _hold_back(self, record: TenantRecord, failure: errors.PleoError) -> None:
        """Keep checks from retrying what cannot work yet: a permanent 4xx (401/403 break
        the tenant instead; 429 waits), or a 429 until its Retry-After has passed."""
        self._refused.pop(record.tenant, None)
        self._paused_until.pop(record.tenant, None)
        answered = failure.details.get("answered")
        if answered == 429:
            wait = failure.details.get("retry_after") or RATE_LIMITED_PAUSE
            self._paused_until[record.tenant] = self.clock() + wait
        elif (
            isinstance(failure, errors.PleoUnexpectedAnswer)
            and isinstance(answered, int)
            and 400 <= answered < 500
            and record.api_key is not None
        ):
            self._refused[record.tenant] = record.api_key

    async def _save(
        self, record: TenantRecord, updated: TenantRecord, announce: list[str], actor: str
    ) -> TenantRecord:
        """Write a sync's result with its events. The store down: held until it answers
        (`TenantRegistry.hold`). A version conflict: written again over the tenant as it is
        now, or, if it is gone or bound to another company, the change undone in Pleo."""
        try:
            return await self.book.write(updated, actor=actor, announce=announce)
        except errors.StoreConflict:
            return await self._after_conflict(record, updated, announce, actor)
        except errors.StoreUnavailable:
            self.book.registry.hold(updated, self.book.events(updated, actor, announce))
            return updated
        except errors.StoreError:
            return record  # the first write's NOT_SYNCED (or error) has the next check retry

    async def _after_conflict(
        self, record: TenantRecord, updated: TenantRecord, announce: list[str], actor: str
    ) -> TenantRecord:
        try:
            fresh = await self.book.store.get(record.tenant)
        except errors.StoreError:
            return record
        if fresh is None or fresh.company_id != record.company_id:
            await self._undo(record)
            return record
        if fresh.api_key != record.api_key:
            return fresh  # rotated meanwhile: its own activation synced the installation
        again = fresh.evolve(
            installation_status=updated.installation_status,
            installation_synced_at=updated.installation_synced_at,
            installation_error=updated.installation_error,
        )
        try:
            return await self.book.write(again, actor=actor, announce=announce)
        except errors.StoreError:
            return fresh

    async def _undo(self, record: TenantRecord) -> None:
        """A sync raced a disconnect (or a company change) on another replica: put the
        installation it may have re-activated back to `INACTIVE`, with the key that did it."""
        api_key = _key_of(record)
        try:
            await self.pleo.put_installation(
                api_key, "INACTIVE", metadata_for(record.tenant), create=False
            )
        except errors.PleoError as exc:
            emit(
                "tenant.installation_sync_failed",
                level=logging.WARNING,
                tenant=record.tenant,
                status="INACTIVE",
                error=exc.message,
            )
            return
        emit(
            "tenant.installation_undone",
            level=logging.WARNING,
            tenant=record.tenant,
            why="the tenant was disconnected or changed on another replica during the sync",
        )

    async def on_disconnect(
        self, record: TenantRecord, *, uninstall: bool
    ) -> tuple[TenantRecord, str]:
        """Before a disconnect forgets `record`: set its installation `INACTIVE` (a failure
        is logged, the disconnect goes on), or with `uninstall` delete it in Pleo, which
        revokes the key's access there too (a failure stops the disconnect: retry it; a key
        Pleo rejects stops it with `tenant_not_active`: see `uninstall_refused`). Pleo is
        waited for at most `disconnect_timeout` seconds. The record as the disconnect's
        events show it, and what became of the installation (`DISCONNECT_OUTCOMES`)."""
        self._refused.pop(record.tenant, None)
        self._paused_until.pop(record.tenant, None)
        if record.api_key is None:
            return record, "none"
        if record.state is TenantState.BROKEN and record.reason is BrokenReason.KEY_REJECTED:
            if uninstall:
                raise uninstall_refused(record.tenant)
            return record, "key_rejected"  # Pleo refuses the key: nothing can be set with it
        if uninstall:
            return await self._uninstall(record, record.api_key)
        return await self._set_inactive(record, record.api_key)

    async def _uninstall(self, record: TenantRecord, key: ApiKey) -> tuple[TenantRecord, str]:
        try:
            async with self._briefly():
                existed = await self.pleo.delete_installation(key)
        except errors.PleoKeyRejected as exc:
            raise uninstall_refused(record.tenant) from exc
        except errors.PleoError as exc:
            raise errors.PleoUnavailable(
                f"Pleo did not delete the installation ({exc.message}); the tenant is still"
                f" connected. Retry DELETE /v1/tenants/{record.tenant}?uninstall=true.",
                tenant=record.tenant,
            ) from exc
        if not existed:
            return record, "none"
        emit("tenant.installation_deleted", tenant=record.tenant)
        return record.evolve(installation_status="INACTIVE", installation_error=None), "deleted"

    async def _set_inactive(self, record: TenantRecord, key: ApiKey) -> tuple[TenantRecord, str]:
        try:
            async with self._briefly():
                change = await self.pleo.put_installation(
                    key, "INACTIVE", metadata_for(record.tenant), create=False
                )
        except errors.PleoError as exc:
            emit(
                "tenant.installation_sync_failed",
                level=logging.WARNING,
                tenant=record.tenant,
                status="INACTIVE",
                error=exc.message,
            )
            return record.evolve(installation_error=exc.message), "failed"
        if change.status is None:
            return record, "none"  # Pleo has no installation for the key
        return record.evolve(installation_status="INACTIVE", installation_error=None), "inactive"

    @contextlib.asynccontextmanager
    async def _briefly(self) -> AsyncIterator[None]:
        """Bound a disconnect's Pleo calls: the key stays in use while they wait."""
        try:
            async with asyncio.timeout(self.disconnect_timeout):
                yield
        except TimeoutError as exc:
            raise errors.PleoUnreachable(
                f"Pleo did not answer within {self.disconnect_timeout:g} s"
            ) from exc


def uninstall_refused(tenant: str) -> errors.TenantNotActive:
    """The refusal of `?uninstall=true` for a tenant whose key Pleo no longer accepts: no
    retry can succeed, so it says what can."""
    return errors.TenantNotActive(
        "This tenant's key no longer works in Pleo, so the broker cannot delete the"
        " installation there. Remove it in Pleo → Settings → Integrations, or disconnect"
        f" without uninstall (DELETE /v1/tenants/{tenant}).",
        tenant=tenant,
        state=TenantState.BROKEN.value,
        reason=BrokenReason.KEY_REJECTED.value,
    )


def _key_of(record: TenantRecord) -> ApiKey:
    """The key of a record its caller already knows has one (a checked invariant: the
    container runs with asserts compiled out)."""
    if record.api_key is None:
        raise RuntimeError(f"tenant {record.tenant!r} has no key to sync its installation with")
    return record.api_key
