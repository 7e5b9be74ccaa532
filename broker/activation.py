"""Activation and rotation: a key validated with Pleo before it becomes a tenant's.

Invariants kept here:
- a failed validation never replaces a working key (an active tenant stays on its old key);
- a brand-new tenant whose first key fails is kept `pending` with the message, without a key;
- one company, one tenant: validation and the write happen under one lock for all tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from broker import errors, rules
from broker.book import TenantBook, require_valid
from broker.events import emit
from broker.installation import InstallationSync
from broker.pleo import Introspection, PleoClient, explain
from broker.records import ApiKey, TenantRecord, TenantState, utcnow
from broker.rules import Requirements


class Activation:
    """`PUT /v1/tenants/{tenant}/key`: validate, bind the company, store, announce."""

    def __init__(
        self,
        book: TenantBook,
        pleo: PleoClient,
        requirements: Requirements,
        *,
        new_key: Callable[[str], None],
        installation: InstallationSync | None = None,
    ) -> None:
        self.book = book
        self.installation = installation  # syncs Pleo's installation after an activation
        self.pleo = pleo
        self.requirements = requirements
        self._new_key = new_key  # told of every key that becomes a tenant's
        self._binding = asyncio.Lock()

    async def activate(
        self,
        tenant: str,
        api_key: ApiKey,
        *,
        allow_company_change: bool = False,
        actor: str = "admin",
    ) -> TenantRecord:
        """Validate `api_key` with Pleo and make it the tenant's key."""
        require_valid(tenant)
        async with self.book.lock(tenant):
            try:
                record = await self._activate(tenant, api_key, allow_company_change, actor)
            except errors.BrokerError as exc:
                self.book.metrics.activations.labels(result=exc.code).inc()
                emit(
                    "tenant.activation_failed",
                    level=logging.WARNING,
                    tenant=tenant,
                    code=exc.code,
                    message=exc.message,
                )
                raise
            if self.installation is not None:
                # A failure here never undoes the activation: the view shows it, and the
                # next check retries.
                record = await self.installation.after_activation(record, actor)
        self.book.metrics.activations.labels(result="ok").inc()
        return record

    async def _activate(
        self, tenant: str, api_key: ApiKey, allow_company_change: bool, actor: str
    ) -> TenantRecord:
        current = await self.book.store.get(tenant)
        try:
            info = await self._introspect(api_key)
        except errors.ActivationError as exc:
            await self._remember_failure(tenant, current, exc)
            raise
        # Validation and the write happen under one lock for all tenants, so that two
        # activations of different tenants with keys of one company cannot both pass the
        # company_in_use check while the other is being written.
        async with self._binding:
            # Only the tenants bound to the key's company: a look-up, not a walk of them all.
            company = info.company_id
            bound = self.book.registry.bound_to(company) if company is not None else []
            others: dict[str, str | None] = {t: company for t in bound if t != tenant}
            try:
                company_id = rules.validate_key(
                    info,
                    self.requirements,
                    current,
                    others,
                    allow_company_change=allow_company_change,
                )
            except errors.ActivationError as exc:
                await self._remember_failure(tenant, current, exc)
                raise
            record = self._bind(tenant, api_key, info, company_id, current)
            if self.installation is not None:
                # Written "not synced yet": should the sync's own write be lost, a check
                # retries it (InstallationSync.due).
                record = self.installation.unsynced(record)
            stored = await self.book.write(
                record, actor=actor, announce=announced(current, company_id, actor)
            )
        self._announce(tenant, current, company_id)
        return stored

    def _bind(
        self,
        tenant: str,
        api_key: ApiKey,
        info: Introspection,
        company_id: str,
        current: TenantRecord | None,
    ) -> TenantRecord:
        """The record binding the validated key and the company (docs/contract.md, "Tenants")."""
        self._new_key(tenant)
        now = utcnow()
        record = TenantRecord(
            tenant=tenant,
            state=TenantState.ACTIVE,
            api_key=api_key,
            company_id=company_id,
            scopes=info.scopes,
            activated_at=now,
            updated_at=now,
            last_checked_at=now,
            version=current.version if current is not None else 0,
            client_id=info.client_id,
            application_name=info.application_name,
        )
        return record

    def _announce(self, tenant: str, current: TenantRecord | None, company_id: str) -> None:
        """Log the change (its events went to the store with it) and count it."""
        fields: dict[str, Any] = {"tenant": tenant, "company_id": company_id}
        if current is not None and current.api_key is not None:
            emit("tenant.key_rotated", previous_state=current.state.value, **fields)
            if current.company_id != company_id:
                emit("tenant.company_changed", previous_company_id=current.company_id, **fields)
        else:
            emit("tenant.activated", **fields)
        if current is None or current.state is not TenantState.ACTIVE:
            self.book.transition(TenantState.ACTIVE, "activated")
        else:
            self.book.transition(TenantState.ACTIVE, "rotated")

    async def _introspect(self, api_key: ApiKey) -> Introspection:
        try:
            return await self.pleo.introspect(api_key)
        except errors.PleoError as exc:
            raise explain(exc) from exc

    async def _remember_failure(
        self, tenant: str, current: TenantRecord | None, exc: errors.ActivationError
    ) -> None:
        """Keep a brand-new (or still pending) tenant as `pending` with the reason."""
        if current is not None and current.state is not TenantState.PENDING:
            return
        now = utcnow()
        missing = tuple(exc.details.get("missing_scopes", ()))
        pending = TenantRecord(
            tenant=tenant,
            state=TenantState.PENDING,
            api_key=None,
            message=exc.message,
            missing_scopes=missing,
            updated_at=now,
            last_checked_at=now,
            version=current.version if current is not None else 0,
        )
        with contextlib.suppress(errors.StoreConflict, errors.StoreUnavailable):
            await self.book.write(pending)
            if current is None:
                self.book.transition(TenantState.PENDING, exc.code)


def announced(current: TenantRecord | None, company_id: str, actor: str) -> list[str]:
    """The events an activation by `actor` announces (docs/contract.md, "Events")."""
    kinds = ["tenant.activated"]
    if current is not None and current.api_key is not None:
        kinds = ["tenant.key_rotated"]
        if current.company_id != company_id:
            kinds.append("tenant.company_changed")
        if current.state is TenantState.BROKEN:
            kinds.append("tenant.recovered")  # a broken tenant works again, on its new key
    if actor.startswith("connect_session:"):
        kinds.append("connect_session.completed")
    return kinds
