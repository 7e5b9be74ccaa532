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

import contextlib
import logging
from typing import Any

from broker import errors
from broker.book import TenantBook, require_valid
from broker.events import emit
from broker.pleo import PleoClient
from broker.records import TenantRecord, TenantState, utcnow

STATUSES = ("ACTIVATED", "INACTIVE", "AUTHORIZED", "PENDING_INTEGRATION", "ERROR")
CHANGED = "tenant.installation_changed"


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

    def due(self, record: TenantRecord) -> bool:
        """Whether a check should retry: an active tenant whose last sync failed. (A tenant
        activated before the broker kept installations is synced by its next activation or
        installation change, not by checks: periodic checks keep to their rate.)"""
        return (
            record.state is TenantState.ACTIVE
            and record.api_key is not None
            and record.installation_error is not None
        )

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
        if failure is not None:
            raise errors.PleoUnavailable(
                f"Pleo did not take the installation's status: {failure}. The broker keeps"
                " the wanted status and retries on the tenant's next check.",
                tenant=tenant,
            )
        return record

    async def sync(
        self,
        record: TenantRecord,
        status: str,
        metadata: dict[str, Any] | None,
        actor: str,
    ) -> tuple[TenantRecord, str | None]:
        """Put `record`'s installation in `status`; the record as written, and why Pleo
        failed (None: it did not). A store failure keeps the record as it was."""
        assert record.api_key is not None
        failure: str | None = None
        try:
            change = await self.pleo.put_installation(
                record.api_key, status, metadata_for(record.tenant, metadata)
            )
        except errors.PleoError as exc:
            failure = exc.message
            updated = record.evolve(installation_status=status, installation_error=failure)
            announce: list[str] = []
            emit(
                "tenant.installation_sync_failed",
                level=logging.WARNING,
                tenant=record.tenant,
                status=status,
                error=failure,
            )
        else:
            updated = record.evolve(
                installation_status=status,
                installation_synced_at=utcnow(),
                installation_error=None,
            )
            announce = [CHANGED] if change.changed else []
            if change.changed:
                emit(CHANGED, tenant=record.tenant, status=status, previous=change.previous)
        with contextlib.suppress(errors.StoreError):
            return await self.book.write(updated, actor=actor, announce=announce), failure
        return record, failure

    async def on_disconnect(self, record: TenantRecord, *, uninstall: bool) -> TenantRecord:
        """Before a disconnect forgets `record`: set its installation `INACTIVE` (a failure
        is logged, the disconnect goes on), or with `uninstall` delete it in Pleo, which
        revokes the key's access there too (a failure stops the disconnect: retry it).
        The record as the disconnect's events show it."""
        if record.api_key is None:
            return record
        try:
            if uninstall:
                await self.pleo.delete_installation(record.api_key)
                emit("tenant.installation_deleted", tenant=record.tenant)
                return record.evolve(installation_status="INACTIVE", installation_error=None)
            change = await self.pleo.put_installation(
                record.api_key, "INACTIVE", metadata_for(record.tenant), create=False
            )
        except errors.PleoError as exc:
            if uninstall:
                raise errors.PleoUnavailable(
                    f"Pleo did not delete the installation ({exc.message}); the tenant is still"
                    f" connected. Retry DELETE /v1/tenants/{record.tenant}?uninstall=true.",
                    tenant=record.tenant,
                ) from exc
            emit(
                "tenant.installation_sync_failed",
                level=logging.WARNING,
                tenant=record.tenant,
                status="INACTIVE",
                error=exc.message,
            )
            return record.evolve(installation_error=exc.message)
        if change.status is None:
            return record  # Pleo has no installation for the key: nothing to set inactive
        return record.evolve(installation_status="INACTIVE", installation_error=None)
