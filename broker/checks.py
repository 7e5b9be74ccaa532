"""Checks and failure detection: what Pleo's answers say about a tenant's key.

Pleo's 401 on a proxied call breaks the tenant at once (`key_rejected`); a 403 and
`POST …/check` re-introspect the key, one check per tenant at a time however many ask
(single flight), and `broker.rules.judge_check` says what the answer means.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker import errors, rules
from broker.book import TenantBook, require_valid
from broker.events import emit
from broker.flight import SingleFlight
from broker.installation import InstallationSync
from broker.pleo import Introspection, PleoClient, explain
from broker.records import BrokenReason, TenantRecord, TenantState, utcnow
from broker.rules import Requirements

FORBIDDEN_RECHECK_COOLDOWN = 5.0  # seconds a 403 re-check that found the key fine stands


class Checks:
    """Re-introspection on demand and after a 403; breakage after a 401."""

    def __init__(
        self,
        book: TenantBook,
        pleo: PleoClient,
        requirements: Requirements,
        *,
        installation: InstallationSync | None = None,
    ) -> None:
        self.book = book
        self.installation = installation  # a check retries a failed installation sync
        self.pleo = pleo
        self.requirements = requirements
        self._forbidden_checked: dict[str, float] = {}
        self._checks: SingleFlight[TenantRecord] = SingleFlight()

    def key_replaced(self, tenant: str) -> None:
        """A new key became the tenant's: its next 403 earns a fresh check."""
        self._forbidden_checked.pop(tenant, None)

    async def check(self, tenant: str, *, actor: str = "admin") -> TenantRecord:
        """Re-introspect the tenant's key now and apply what Pleo says (POST …/check).

        Checks of one tenant share one flight: the events name the actor of the first.
        """
        require_valid(tenant)
        return await self._checks.run(tenant, lambda: self._check(tenant, actor))

    async def recheck_after_forbidden(
        self, tenant: str, *, caller: str | None = None
    ) -> TenantRecord:
        """Pleo answered 403 for this tenant: find out whether the key or its rights changed.

        A 403 within `FORBIDDEN_RECHECK_COOLDOWN` seconds of the last such check that found
        the key fine is taken as a resource-level denial without asking Pleo again: routine
        403s (another company's object, say) must not double the traffic to Pleo.
        """
        checked_at = self._forbidden_checked.get(tenant)
        current = self.book.registry.get(tenant)
        if (
            checked_at is not None
            and current is not None
            and current.state is TenantState.ACTIVE
            and time.monotonic() - checked_at < FORBIDDEN_RECHECK_COOLDOWN
        ):
            return current
        record = await self._checks.run(tenant, lambda: self._check(tenant, "proxy", caller))
        if record.state is TenantState.ACTIVE:
            self._forbidden_checked[tenant] = time.monotonic()
        return record

    async def key_rejected(
        self, record: TenantRecord, *, caller: str | None = None
    ) -> TenantRecord:
        """Pleo answered 401 to a call made with `record`'s key: the tenant is broken at once."""
        async with self.book.lock(record.tenant):
            current = self.book.registry.get(record.tenant)
            if current is None or current.api_key != record.api_key:
                return current or record  # rotated or removed meanwhile: not this key's fault
            if current.state is TenantState.BROKEN:
                return current
            try:
                return await self._break(current, REJECTED, "proxy", caller)
            except errors.StoreConflict:
                # Another replica changed the tenant (a rotation, most likely): re-read it and
                # break it only if it still holds the rejected key.
                fresh = await self.book.fetch(record.tenant, remember=True)
                if fresh.api_key != record.api_key or fresh.state is TenantState.BROKEN:
                    return fresh
                return await self._break(fresh, REJECTED, "proxy", caller)

    async def _check(self, tenant: str, actor: str, caller: str | None = None) -> TenantRecord:
        async with self.book.lock(tenant):
            record = await self.book.fetch(tenant, remember=True)
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
                return await self._break(record, verdict, actor, caller)
            announce = ["tenant.recovered"] if verdict.recovered else []
            if verdict.scopes_changed:
                announce.append("tenant.scopes_changed")
            updated = await self.book.write(
                verdict.record, actor=actor, announce=announce, caller=caller
            )
            if verdict.recovered:
                emit("tenant.recovered", tenant=tenant, company_id=record.company_id)
                self.book.transition(TenantState.ACTIVE, "recovered")
            if self.installation is not None and self.installation.due(updated, actor):
                updated = await self.installation.retry(updated, actor)
            return updated

    async def _break(
        self, record: TenantRecord, verdict: rules.Broken, actor: str, caller: str | None = None
    ) -> TenantRecord:
        reason, scopes, company_id_now = verdict.reason, verdict.scopes, verdict.key_company_id
        now = utcnow()
        already = record.state is TenantState.BROKEN and record.reason is reason
        broken = record.evolve(
            state=TenantState.BROKEN,
            reason=reason,
            message=BROKEN_MESSAGES[reason],
            scopes=scopes if scopes is not None else record.scopes,
            missing_scopes=verdict.missing,
            updated_at=record.updated_at if already else now,
            last_checked_at=now,
        )
        saved = True
        announce = [] if already else ["tenant.broken"]
        try:
            updated = await self.book.write(broken, actor=actor, announce=announce, caller=caller)
        except errors.StoreUnavailable:
            # Pleo refuses this key: stop using it now, store or no store; its event is saved
            # with it when the store takes the write.
            self.book.registry.hold(broken, self.book.events(broken, actor, announce, caller))
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
            self.book.transition(TenantState.BROKEN, reason.value)
        return updated


REJECTED = rules.Broken(BrokenReason.KEY_REJECTED)

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
