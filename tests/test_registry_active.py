"""TenantRegistry.active: the proxy's one read, with the refusals it earns."""

from __future__ import annotations

import builtins

import pytest
from prometheus_client import CollectorRegistry

from broker import errors
from broker.metrics import Metrics
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.registry import TenantRegistry

COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"


class ListedStore:
    """A store that lists the records it was given (all `active` needs)."""

    backend = "listed"
    read_only: str | None = None

    def __init__(self, *records: TenantRecord) -> None:
        self.records = {r.tenant: r for r in records}

    async def get(self, tenant: str) -> TenantRecord | None:
        return self.records.get(tenant)

    async def list(self) -> builtins.list[TenantRecord]:
        return builtins.list(self.records.values())

    async def put(self, record: TenantRecord) -> TenantRecord:
        self.records[record.tenant] = record
        return record

    async def delete(self, tenant: str) -> bool:
        return self.records.pop(tenant, None) is not None

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        return "0", None

    async def close(self) -> None:
        return None


def _active(tenant: str = "acme", key: str = "pik_" + "k" * 40) -> TenantRecord:
    return TenantRecord(
        tenant=tenant, state=TenantState.ACTIVE, api_key=ApiKey(key), company_id=COMPANY
    )


def _registry(*records: TenantRecord) -> TenantRegistry:
    return TenantRegistry(ListedStore(*records), Metrics(CollectorRegistry()))


def test_before_the_first_load_an_unknown_tenant_is_store_unavailable() -> None:
    with pytest.raises(errors.StoreUnavailable):
        _registry().active("acme")


async def test_an_unknown_tenant_is_tenant_unknown() -> None:
    registry = _registry()
    await registry.refresh()
    with pytest.raises(errors.TenantUnknown):
        registry.active("acme")


async def test_a_broken_tenant_is_not_active_with_its_reason() -> None:
    broken = _active().evolve(state=TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED)
    registry = _registry(broken)
    await registry.refresh()
    with pytest.raises(errors.TenantNotActive) as caught:
        registry.active("acme")
    assert caught.value.to_body()["error"]["reason"] == "key_rejected"


async def test_the_active_tenant_is_built_once_per_record() -> None:
    registry = _registry(_active())
    await registry.refresh()
    first = registry.active("acme")
    assert registry.active("acme") is first
    rotated = _active(key="pik_" + "r" * 40)
    registry.remember("acme", rotated)
    second = registry.active("acme")
    assert second is not first
    assert second.record is rotated
    registry.remember("acme", None)
    with pytest.raises(errors.TenantUnknown):
        registry.active("acme")
