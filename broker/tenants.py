"""The tenant service: activation, rotation, checks and state changes (docs/contract.md, "Tenants").

What Pleo's answer means is decided by the pure rules of `broker.rules`; this module does
the I/O around them (Pleo, the store, the registry, events and metrics). Reads go to the
registry (`TenantService.registry`) directly.

Changes are written to the store first (compare-and-set) and then to the in-memory
registry (`broker.registry`), so they are seen at once in this process; other replicas see
them when their registries next refresh.

Invariants kept here:
- a failed validation never replaces a working key (an active tenant stays on its old key);
- a brand-new tenant whose first key fails is kept `pending` with the message, without a key;
- one re-introspection per tenant at a time (single flight), however many requests ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from broker import errors, rules
from broker.events import emit
from broker.flight import KeyedLocks, SingleFlight
from broker.metrics import Metrics
from broker.pleo import Introspection, PleoClient, explain
from broker.records import (
    ApiKey,
    BrokenReason,
    TenantRecord,
    TenantState,
    utcnow,
    valid_tenant_id,
)
from broker.registry import TenantRegistry
from broker.rules import Requirements
from broker.stores import SecretStore

FORBIDDEN_RECHECK_COOLDOWN = 5.0  # seconds a 403 re-check that found the key fine stands


class TenantService:
    """Owns every tenant's lifecycle; reads are served by its `registry`."""

    def __init__(
        self,
        store: SecretStore,
        pleo: PleoClient,
        metrics: Metrics,
        *,
        requirements: Requirements | None = None,
        cache_ttl: float = 10.0,
    ) -> None:
        self.store = store
        self.pleo = pleo
        self.metrics = metrics
        self.requirements = requirements if requirements is not None else Requirements()
        self.registry = TenantRegistry(store, metrics, cache_ttl=cache_ttl)
        self._locks = KeyedLocks()
        self._binding = asyncio.Lock()
        self._forbidden_checked: dict[str, float] = {}
        self._checks: SingleFlight[TenantRecord] = SingleFlight()

    # -- reading --------------------------------------------------------------------------

    @property
    def write_problem(self) -> str | None:
        """Why the store takes no writes (read-only, or the last write failed), or None."""
        return self.store.read_only or self.registry.write_problem

    async def fetch(self, tenant: str, *, remember: bool = False) -> TenantRecord:
        """The tenant's record, fresh from the store when it answers, else from memory.

        Only a caller holding the tenant's lock may `remember` what it read: an unlocked
        read can finish after a concurrent change and would put an older record back.
        """
        _require_valid(tenant)
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

    # -- activation and rotation ---------------------------------------------------------

    async def activate(
        self, tenant: str, api_key: ApiKey, *, allow_company_change: bool = False
    ) -> TenantRecord:
        """Validate `api_key` with Pleo and make it the tenant's key."""
        _require_valid(tenant)
        async with self._lock(tenant):
            try:
                record = await self._activate(tenant, api_key, allow_company_change)
            except errors.BrokerError as exc:
                self.metrics.activations.labels(result=exc.code).inc()
                emit(
                    "tenant.activation_failed",
                    level=logging.WARNING,
                    tenant=tenant,
                    code=exc.code,
                    message=exc.message,
                )
                raise
        self.metrics.activations.labels(result="ok").inc()
        return record

    async def _activate(
        self, tenant: str, api_key: ApiKey, allow_company_change: bool
    ) -> TenantRecord:
        current = await self.store.get(tenant)
        try:
            info = await self._introspect(api_key)
        except errors.ActivationError as exc:
            await self._remember_failure(tenant, current, exc)
            raise
        # Validation and the write happen under one lock for all tenants, so that two
        # activations of different tenants with keys of one company cannot both pass the
        # company_in_use check while the other is being written.
        async with self._binding:
            others = {
                other.tenant: other.company_id
                for other in self.registry.all()
                if other.tenant != tenant
            }
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
            stored = await self._bind(tenant, api_key, info, company_id, current)
        return stored

    async def _bind(
        self,
        tenant: str,
        api_key: ApiKey,
        info: Introspection,
        company_id: str,
        current: TenantRecord | None,
    ) -> TenantRecord:
        """Store the validated key and bind the company (docs/contract.md, "Tenants")."""
        self._forbidden_checked.pop(tenant, None)  # a new key earns a fresh 403 check
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
        stored = await self._write(record)
        fields: dict[str, Any] = {"tenant": tenant, "company_id": company_id}
        if current is not None and current.api_key is not None:
            emit("tenant.key_rotated", previous_state=current.state.value, **fields)
            if current.company_id != company_id:
                emit("tenant.company_changed", previous_company_id=current.company_id, **fields)
        else:
            emit("tenant.activated", **fields)
        if current is None or current.state is not TenantState.ACTIVE:
            self._transition(TenantState.ACTIVE, "activated")
        else:
            self._transition(TenantState.ACTIVE, "rotated")
        return stored

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
            await self._write(pending)
            if current is None:
                self._transition(TenantState.PENDING, exc.code)

    # -- checks and failure detection ----------------------------------------------------

    async def check(self, tenant: str) -> TenantRecord:
        """Re-introspect the tenant's key now and apply what Pleo says (POST …/check)."""
        _require_valid(tenant)
        return await self._checks.run(tenant, lambda: self._check(tenant))

    async def recheck_after_forbidden(self, tenant: str) -> TenantRecord:
        """Pleo answered 403 for this tenant: find out whether the key or its rights changed.

        A 403 within `FORBIDDEN_RECHECK_COOLDOWN` seconds of the last such check that found
        the key fine is taken as a resource-level denial without asking Pleo again: routine
        403s (another company's object, say) must not double the traffic to Pleo.
        """
        checked_at = self._forbidden_checked.get(tenant)
        current = self.registry.get(tenant)
        if (
            checked_at is not None
            and current is not None
            and current.state is TenantState.ACTIVE
            and time.monotonic() - checked_at < FORBIDDEN_RECHECK_COOLDOWN
        ):
            return current
        record = await self._checks.run(tenant, lambda: self._check(tenant))
        if record.state is TenantState.ACTIVE:
            self._forbidden_checked[tenant] = time.monotonic()
        return record

    async def key_rejected(self, record: TenantRecord) -> TenantRecord:
        """Pleo answered 401 to a call made with `record`'s key: the tenant is broken at once."""
        async with self._lock(record.tenant):
            current = self.registry.get(record.tenant)
            if current is None or current.api_key != record.api_key:
                return current or record  # rotated or removed meanwhile: not this key's fault
            if current.state is TenantState.BROKEN:
                return current
            try:
                return await self._break(current, BrokenReason.KEY_REJECTED)
            except errors.StoreConflict:
                # Another replica changed the tenant (a rotation, most likely): re-read it and
                # break it only if it still holds the rejected key.
                fresh = await self.fetch(record.tenant, remember=True)
                if fresh.api_key != record.api_key or fresh.state is TenantState.BROKEN:
                    return fresh
                return await self._break(fresh, BrokenReason.KEY_REJECTED)

    async def _check(self, tenant: str) -> TenantRecord:
        async with self._lock(tenant):
            record = await self.fetch(tenant, remember=True)
            if record.api_key is None:
                return record  # pending: there is no key to check
            now = utcnow()
            info: Introspection | None
            try:
                info = await self.pleo.introspect(record.api_key)
            except errors.PleoKeyRejected:
                info = None
            except errors.PleoError as exc:
                raise explain(exc, tenant=tenant) from exc
            verdict = rules.judge_check(record, info, self.requirements, now)
            if isinstance(verdict, rules.Broken):
                return await self._break(
                    record,
                    verdict.reason,
                    scopes=verdict.scopes,
                    missing=verdict.missing,
                    company_id_now=verdict.key_company_id,
                )
            updated = await self._write(verdict.record)
            if verdict.recovered:
                emit("tenant.recovered", tenant=tenant, company_id=record.company_id)
                self._transition(TenantState.ACTIVE, "recovered")
            return updated

    async def _break(
        self,
        record: TenantRecord,
        reason: BrokenReason,
        *,
        scopes: frozenset[str] | None = None,
        missing: tuple[str, ...] = (),
        company_id_now: str | None = None,
    ) -> TenantRecord:
        now = utcnow()
        already = record.state is TenantState.BROKEN and record.reason is reason
        broken = record.evolve(
            state=TenantState.BROKEN,
            reason=reason,
            message=BROKEN_MESSAGES[reason],
            scopes=scopes if scopes is not None else record.scopes,
            missing_scopes=missing,
            updated_at=record.updated_at if already else now,
            last_checked_at=now,
        )
        saved = True
        try:
            updated = await self._write(broken)
        except errors.StoreUnavailable:
            # Pleo refuses this key: stop using it now, store or no store.
            self.registry.hold(broken)
            updated, saved = broken, False
        if not already:
            fields: dict[str, Any] = {
                "tenant": record.tenant,
                "reason": reason.value,
                "saved": saved,
            }
            if company_id_now is not None:
                fields["key_company_id"] = company_id_now
            emit("tenant.broken", level=logging.WARNING, company_id=record.company_id, **fields)
            self._transition(TenantState.BROKEN, reason.value)
        return updated

    # -- disconnect ----------------------------------------------------------------------

    async def disconnect(self, tenant: str) -> None:
        """Forget the tenant and destroy its key material."""
        _require_valid(tenant)
        async with self._lock(tenant):
            # Stop using the key before its destruction starts: if the store fails midway (or
            # answers too late), the proxy must not go on injecting a key that may be gone.
            known = self.registry.forget(tenant)
            try:
                existed = await self.registry.delete(tenant)
            except errors.StoreUnavailable as exc:
                emit(
                    "tenant.disconnect_incomplete",
                    level=logging.WARNING,
                    tenant=tenant,
                    error=exc.message,
                )
                retry = f"Retry DELETE /v1/tenants/{tenant}."
                if not known:
                    raise errors.StoreUnavailable(f"{exc.message} {retry}", tenant=tenant) from exc
                raise errors.StoreUnavailable(
                    "The broker stopped using this tenant's key, but the store could not confirm"
                    f" its destruction: {exc.message} {retry}",
                    tenant=tenant,
                ) from exc
            self.registry.disconnected(tenant)
            if not existed and not known:
                raise errors.TenantUnknown(tenant=tenant)
            emit("tenant.disconnected", tenant=tenant)

    # -- helpers -------------------------------------------------------------------------

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks[tenant]

    async def _write(self, record: TenantRecord) -> TenantRecord:
        stored = await self.registry.put(record)
        self.registry.remember(record.tenant, stored)
        return stored

    def _transition(self, to_state: TenantState, reason: str) -> None:
        self.metrics.tenant_transitions.labels(to_state=to_state.value, reason=reason).inc()


BROKEN_MESSAGES = {
    BrokenReason.KEY_REJECTED: (
        "Pleo no longer accepts this tenant's key (it was revoked, rotated or expired)."
        " Ask the customer for the new key from Pleo → Settings → Integrations and reconnect."
    ),
    BrokenReason.PERMISSION_LOST: (
        "This tenant's key lost permissions the integration needs. Ask the customer to grant"
        " them again in Pleo (or reinstall the integration) and reconnect with the new key."
    ),
    BrokenReason.COMPANY_CHANGED: (
        "This tenant's key now belongs to a different Pleo company. Reconnect with a key"
        " from the tenant's own company."
    ),
}


def _require_valid(tenant: str) -> None:
    if not valid_tenant_id(tenant):
        raise errors.TenantInvalid(tenant=tenant[:80])
