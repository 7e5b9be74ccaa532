"""The tenant service: the one door to every tenant's lifecycle (docs/contract.md, "Tenants").

What Pleo's answer means is decided by the pure rules of `broker.rules`; the I/O around them
lives in `broker.activation` (activation and rotation), `broker.checks` (checks and failure
detection) and here (disconnect), over the records of `broker.book`. Reads go to the registry
(`TenantService.registry`) directly.
"""

from __future__ import annotations

import logging

from broker import errors
from broker.activation import Activation
from broker.book import TenantBook, require_valid
from broker.checks import Checks
from broker.events import emit
from broker.installation import InstallationSync
from broker.metrics import Metrics
from broker.pleo import PleoClient
from broker.records import ApiKey, TenantRecord, TenantState
from broker.registry import TenantRegistry
from broker.rules import Requirements
from broker.stores import SecretStore


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
        installation_status: str = "ACTIVATED",
    ) -> None:
        self.store = store
        self.pleo = pleo
        self.metrics = metrics
        self.requirements = requirements if requirements is not None else Requirements()
        self.registry = TenantRegistry(store, metrics, cache_ttl=cache_ttl)
        self.book = TenantBook(store, self.registry, metrics)
        self.installation = InstallationSync(self.book, pleo, installation_status)
        self.checks = Checks(self.book, pleo, self.requirements, installation=self.installation)
        self.installation.key_rejected = self.checks.key_rejected
        self.activation = Activation(
            self.book,
            pleo,
            self.requirements,
            new_key=self.checks.key_replaced,
            installation=self.installation,
        )

    @property
    def write_problem(self) -> str | None:
        """Why the store takes no writes (read-only, or the last write failed), or None."""
        return self.store.read_only or self.registry.writes.problem

    async def fetch(self, tenant: str, *, remember: bool = False) -> TenantRecord:
        """The tenant's record, fresh from the store when it answers, else from memory."""
        return await self.book.fetch(tenant, remember=remember)

    async def activate(
        self,
        tenant: str,
        api_key: ApiKey,
        *,
        allow_company_change: bool = False,
        actor: str = "admin",
    ) -> TenantRecord:
        """Validate `api_key` with Pleo and make it the tenant's key (`actor`: who asked,
        as its events name it: `admin`, `cli` or `connect_session:<id>`)."""
        return await self.activation.activate(
            tenant, api_key, allow_company_change=allow_company_change, actor=actor
        )

    async def check(self, tenant: str, *, actor: str = "admin") -> TenantRecord:
        """Re-introspect the tenant's key now and apply what Pleo says (POST …/check);
        `actor` is `admin`, `cli` or `health_check`."""
        return await self.checks.check(tenant, actor=actor)

    async def recheck_after_forbidden(
        self, tenant: str, *, caller: str | None = None
    ) -> TenantRecord:
        """Pleo answered 403 for this tenant: find out whether the key or its rights changed
        (`caller`: the proxy's caller, named by the events, docs/decisions.md)."""
        return await self.checks.recheck_after_forbidden(tenant, caller=caller)

    async def key_rejected(
        self, record: TenantRecord, *, caller: str | None = None
    ) -> TenantRecord:
        """Pleo answered 401 to a call made with `record`'s key: the tenant is broken at once."""
        return await self.checks.key_rejected(record, caller=caller)

    async def disconnect(
        self, tenant: str, *, actor: str = "admin", uninstall: bool = False
    ) -> str:
        """Forget the tenant and destroy its key material; `tenant.disconnected` is written
        with the deletion, its data the tenant as it was last seen. First its installation
        in Pleo is set `INACTIVE`, or with `uninstall` deleted (`broker.installation`); what
        became of it is answered (`broker.installation.DISCONNECT_OUTCOMES`)."""
        require_valid(tenant)
        rejected: list[TenantRecord] = []
        try:
            return await self._disconnect(tenant, actor, uninstall, rejected)
        except errors.TenantNotActive:
            # The uninstall found Pleo rejecting the key: like any 401, it breaks the tenant
            # (`key_rejected` takes the tenant's lock, so only once it is released).
            for record in rejected:
                await self.checks.key_rejected(record)
            raise

    async def _disconnect(
        self, tenant: str, actor: str, uninstall: bool, rejected: list[TenantRecord]
    ) -> str:
        async with self.book.lock(tenant):
            last_seen = await self._last_seen(tenant)
            # The event's view shows the installation as the disconnect left it.
            try:
                seen, outcome = await self.installation.on_disconnect(
                    last_seen, uninstall=uninstall
                )
            except errors.TenantNotActive as exc:
                if isinstance(exc.__cause__, errors.PleoKeyRejected):
                    rejected.append(last_seen)
                raise
            events = self.book.events(seen, actor, ["tenant.disconnected"])
            # Stop using the key before its destruction starts: if the store fails midway (or
            # answers too late), the proxy must not go on injecting a key that may be gone.
            known = self.registry.forget(tenant)
            try:
                existed = await self.registry.writes.delete(tenant, events=events)
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
            return outcome

    async def _last_seen(self, tenant: str) -> TenantRecord:
        """The tenant as a disconnect finds it: from the store (its installation is changed
        with the key the store holds, not one up to BROKER_CACHE_TTL stale in memory), else,
        when the store does not answer, from memory."""
        try:
            known = self.registry.enforced(tenant, await self.store.get(tenant))
        except errors.StoreError:
            known = self.registry.get(tenant)
        else:
            if known is not None:  # read under the tenant's lock: memory may take it
                self.registry.remember(tenant, known)
        return known or TenantRecord(tenant, TenantState.PENDING, None)
