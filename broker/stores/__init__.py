"""Secret stores: where tenant records and their keys live.

Every store implements `SecretStore`. Writes are compare-and-set on `TenantRecord.version`:
`put(record)` succeeds only if the stored version still equals `record.version` (0 for a
tenant that must not exist yet), stores the record with version + 1 and returns it, or raises
`StoreConflict`. `delete` destroys the key material, not only the newest copy of it. Failures
to reach the backing service raise `StoreUnavailable`.
"""

from __future__ import annotations

from typing import Protocol

from broker.records import TenantRecord


class SecretStore(Protocol):
    """The seam between the tenant service and where keys are kept."""

    backend: str

    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None."""
        ...

    async def list(self) -> list[TenantRecord]:
        """Every tenant's record."""
        ...

    async def put(self, record: TenantRecord) -> TenantRecord:
        """Compare-and-set write; returns the stored record with its new version."""
        ...

    async def delete(self, tenant: str) -> bool:
        """Destroy the tenant and its key material; False if there was none."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...
