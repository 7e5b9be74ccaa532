"""Copying every tenant from one store to another (`broker tenants migrate`).

The source wins: a tenant missing from the target is created, one that differs is replaced
with a compare-and-set write on the target's version, and one that is equal (ignoring the
stores' own version numbers) is left alone, so a second run changes nothing. Tenants that
exist only in the target are kept. Nothing is printed or logged; the report holds counts only.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.records import TenantRecord
from broker.stores import SecretStore
from broker.tasks import map_all

MIGRATION_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """How many tenants a migration created, replaced and left as they were in the target."""

    copied: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def total(self) -> int:
        return self.copied + self.updated + self.unchanged


async def migrate(source: SecretStore, target: SecretStore) -> MigrationReport:
    """Copy every tenant of `source` into `target`; safe to run again."""
    wanted = await source.list()
    existing = {record.tenant: record for record in await target.list()}
    outcomes: list[str] = []

    async def copy(record: TenantRecord) -> None:
        current = existing.get(record.tenant)
        if current is not None and current.evolve(version=0) == record.evolve(version=0):
            outcomes.append("unchanged")
            return
        await target.put(record.evolve(version=current.version if current else 0))
        outcomes.append("copied" if current is None else "updated")

    await map_all(copy, wanted, limit=MIGRATION_CONCURRENCY)
    return MigrationReport(
        copied=outcomes.count("copied"),
        updated=outcomes.count("updated"),
        unchanged=outcomes.count("unchanged"),
    )
