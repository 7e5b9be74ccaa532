"""Destroying the old versions of tenants' secrets: KV v2 keeps them, and they hold old keys.

After every write each older version is destroyed, so an old key cannot be read back from
history. Destruction runs only after the new write succeeded; if it fails (or the process dies
first) the write stands, a `store.destroy_failed` event is logged, and the history is destroyed
at the tenant's next write or by the history check: the first `list` of a store (the broker's
start-up) reads every tenant's version list in the background and destroys what a crash left
(`store.history_destroyed`), and each later `list` (a full reload) retries the destroys that
failed in this process. The check reads the version lists in bulk (`broker.stores.vault_bulk`,
hvac for any it cannot answer plainly): with 50,000 tenants it is 50,000 reads after each start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from functools import partial

from broker.errors import StoreUnavailable
from broker.events import emit
from broker.stores.runner import Run
from broker.stores.vault_bulk import BulkReader, BulkReads, Unanswered
from broker.stores.vault_kv import TenantSecrets, Versions
from broker.tasks import map_all

HISTORY_CHECKS = 4  # version lists read at once by the history check (leaves slots for others)


class VersionHistory:
    """Destroys every version of a tenant's secret but the newest, now or in the background."""

    def __init__(
        self, secrets: TenantSecrets, call: Run, *, backend: str, bulk: BulkReader | None = None
    ) -> None:
        self._secrets = secrets
        self._call = call
        self._backend = backend
        self._bulk = bulk
        # Whether every tenant's versions were checked once, the tenants whose destroy failed
        # since, and the checks running in the background.
        self._checked = False
        self._checking_everything = False
        self._undestroyed: set[str] = set()
        self.checks: set[asyncio.Task[None]] = set()

    def unsure(self, tenant: str) -> None:
        """Have the next check look at `tenant` (a write or delete of it failed midway)."""
        self._undestroyed.add(tenant)

    async def destroy_below(self, tenant: str, *, below: int) -> None:
        """Destroy the versions older than `below`; log, never raise, if that fails."""
        try:
            versions = await self._call(partial(self._secrets.versions, tenant))
            # Metadata missing or restarted below us: deleted (and perhaps created anew) since.
            if versions is not None and versions.current >= below:
                older = versions.live_below(below)
                if older:
                    await self._call(partial(self._secrets.destroy, tenant, older))
        except StoreUnavailable as exc:
            self._undestroyed.add(tenant)
            emit(
                "store.destroy_failed",
                level=logging.WARNING,
                tenant=tenant,
                backend=self._backend,
                error=exc.message,
            )

    def listed(self, tenants: Iterable[str]) -> None:
        """After a full list: check every tenant the first time, else those left unsure."""
        if not self._checked and not self._checking_everything:
            self._check_later(tenants, everything=True)
        elif self._undestroyed:
            self._check_later(sorted(self._undestroyed), everything=False)

    async def close(self) -> None:
        """Stop the checks still running."""
        for task in self.checks:
            task.cancel()
        await asyncio.gather(*self.checks, return_exceptions=True)

    def _check_later(self, tenants: Iterable[str], *, everything: bool) -> None:
        if everything:
            self._checking_everything = True
        task = asyncio.create_task(
            self._check(tuple(tenants), everything), name="vault-history-check"
        )
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    async def _check(self, tenants: tuple[str, ...], everything: bool) -> None:
        try:
            if self._bulk is None:
                await map_all(self._destroy_leftovers, tenants, limit=HISTORY_CHECKS)
            else:
                async with self._bulk.session(HISTORY_CHECKS) as reads:
                    check = partial(self._destroy_leftovers, reads=reads)
                    await map_all(check, tenants, limit=HISTORY_CHECKS)
        except StoreUnavailable as exc:
            # Vault is in trouble: stop here; the next full reload checks again.
            emit(
                "store.destroy_failed",
                level=logging.WARNING,
                backend=self._backend,
                error=exc.message,
            )
        except Exception:
            logging.getLogger(__name__).exception("the Vault history check failed")
        else:
            if everything:
                self._checked = True
        finally:
            if everything:
                self._checking_everything = False

    async def _destroy_leftovers(self, tenant: str, reads: BulkReads | None = None) -> None:
        """Destroy every version of `tenant` but the newest (left by a crash or a failure)."""
        versions = await self._versions(tenant, reads)
        older = () if versions is None else versions.live_below(versions.current)
        if older:
            await self._call(partial(self._secrets.destroy, tenant, older))
            emit(
                "store.history_destroyed",
                level=logging.WARNING,
                tenant=tenant,
                backend=self._backend,
                versions=len(older),
            )
        self._undestroyed.discard(tenant)

    async def _versions(self, tenant: str, reads: BulkReads | None) -> Versions | None:
        """The tenant's version list: in bulk when it can be, else through hvac."""
        if reads is not None:
            try:
                return await reads.metadata(self._secrets.path(tenant))
            except Unanswered:
                pass
        return await self._call(partial(self._secrets.versions, tenant))
