"""The SecretStore contract, run against every backend in STORE_BACKENDS.

To add a backend: append its name to STORE_BACKENDS and a branch to `open_backend` that
returns a fresh, empty store (it may pull fixtures with `request.getfixturevalue`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.errors import StoreConflict
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.stores import SecretStore
from broker.stores.local import LocalStore

STORE_BACKENDS = ["local", "vault"]

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


async def open_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> SecretStore:
    """A fresh, empty store of the backend `name`."""
    if name == "local":
        return LocalStore(tmp_path / "store", master_key=os.urandom(32))
    if name == "vault":
        from openbao_server import OpenBao

        from broker.stores.vault import VaultStore

        server: OpenBao = request.getfixturevalue("openbao")
        return VaultStore(server.settings(vault_prefix=f"contract-{secrets.token_hex(6)}"))
    raise ValueError(f"no store backend named {name!r}")


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SecretStore]:
    opened = await open_backend(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


def new_key() -> ApiKey:
    return ApiKey(f"pls_{secrets.token_hex(16)}_{secrets.token_hex(8)}")


def active(tenant: str, **changes: object) -> TenantRecord:
    record = TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=new_key(),
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read", "export-jobs:write"}),
        activated_at=T0,
        updated_at=T0,
        last_checked_at=T0,
    )
    return record.evolve(**changes)


async def test_unknown_tenant_is_none_and_empty_store_lists_nothing(store: SecretStore) -> None:
    assert await store.get("nobody") is None
    assert await store.list() == []


async def test_put_of_a_new_tenant_stores_version_1(store: SecretStore) -> None:
    record = active("acme")

    stored = await store.put(record)

    assert stored == record.evolve(version=1)
    assert await store.get("acme") == stored


@pytest.mark.parametrize(
    "record",
    [
        TenantRecord(
            tenant="full.record_1-x",
            state=TenantState.BROKEN,
            api_key=ApiKey("pls_" + "ab" * 40 + "_ünïcode"),
            company_id="00000000-0000-4000-8000-000000000001",
            scopes=frozenset({"export-jobs:read", "vendors:write", "tag-groups:read"}),
            missing_scopes=("vendors:write", "export-jobs:read"),
            reason=BrokenReason.PERMISSION_LOST,
            message="Pleo stopped granting 'vendors:write' — reconnect with a new key.",
            activated_at=T0,
            updated_at=T0 + timedelta(days=3, seconds=7),
            last_checked_at=T0 + timedelta(days=3),
        ),
        TenantRecord(
            tenant="pending",
            state=TenantState.PENDING,
            api_key=None,
            message="Pleo did not accept this key. Copy the whole key and try again.",
            updated_at=T0,
        ),
        TenantRecord(tenant="0", state=TenantState.ACTIVE, api_key=ApiKey("k"), updated_at=T0),
    ],
    ids=["every-field", "pending-without-key", "minimal"],
)
async def test_every_field_round_trips(store: SecretStore, record: TenantRecord) -> None:
    stored = await store.put(record)

    read = await store.get(record.tenant)

    assert read == record.evolve(version=1) == stored
    assert read is not None
    assert read.view() == record.view()


async def test_put_with_the_current_version_replaces_the_record(store: SecretStore) -> None:
    first = await store.put(active("acme"))
    rotated_key = new_key()

    second = await store.put(first.evolve(api_key=rotated_key, updated_at=T0 + timedelta(hours=1)))
    third = await store.put(
        second.evolve(state=TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED)
    )

    assert (first.version, second.version, third.version) == (1, 2, 3)
    read = await store.get("acme")
    assert read == third
    assert read is not None
    assert read.api_key == rotated_key


async def test_put_with_a_stale_version_conflicts_and_changes_nothing(store: SecretStore) -> None:
    first = await store.put(active("acme"))
    second = await store.put(first.evolve(message="newer"))

    with pytest.raises(StoreConflict):
        await store.put(first.evolve(message="stale", api_key=new_key()))

    assert await store.get("acme") == second


async def test_put_of_version_0_on_an_existing_tenant_conflicts(store: SecretStore) -> None:
    existing = await store.put(active("acme"))

    with pytest.raises(StoreConflict):
        await store.put(active("acme"))

    assert await store.get("acme") == existing


async def test_put_with_a_version_of_a_missing_tenant_conflicts(store: SecretStore) -> None:
    with pytest.raises(StoreConflict):
        await store.put(active("ghost", version=4))

    assert await store.get("ghost") is None


async def test_delete_removes_only_that_tenant(store: SecretStore) -> None:
    await store.put(active("acme"))
    other = await store.put(active("globex"))

    assert await store.delete("acme") is True

    assert await store.get("acme") is None
    assert await store.list() == [other]
    assert await store.delete("acme") is False
    assert await store.delete("never-existed") is False


async def test_a_deleted_tenant_can_be_created_again(store: SecretStore) -> None:
    first = await store.put(active("acme"))
    await store.delete("acme")
    again = active("acme", company_id="11111111-2222-4333-8444-555555555555")

    with pytest.raises(StoreConflict):
        await store.put(first)
    stored = await store.put(again)

    assert stored.version == 1
    assert await store.get("acme") == stored


async def test_list_returns_every_tenant(store: SecretStore) -> None:
    records = [
        active(f"tenant-{n:02d}", state=TenantState.PENDING, api_key=None)
        if n % 5 == 0
        else active(f"tenant-{n:02d}")
        for n in range(30)
    ]
    stored = [await store.put(record) for record in records]

    listed = await store.list()

    assert sorted(listed, key=lambda r: r.tenant) == stored


async def test_concurrent_creates_of_one_tenant_let_exactly_one_win(store: SecretStore) -> None:
    candidates = [active("acme", message=f"candidate {n}") for n in range(8)]

    results = await asyncio.gather(*(store.put(c) for c in candidates), return_exceptions=True)

    winners = [r for r in results if isinstance(r, TenantRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, StoreConflict) for r in results if r is not winners[0])
    assert await store.get("acme") == winners[0]


async def test_concurrent_updates_of_one_version_let_exactly_one_win(store: SecretStore) -> None:
    base = await store.put(active("acme"))
    # Every candidate differs from the others in every field, so a mix would be visible.
    candidates = [
        base.evolve(
            state=TenantState.BROKEN if n % 2 else TenantState.ACTIVE,
            api_key=new_key(),
            company_id=f"{n:08d}-0000-4000-8000-000000000000",
            scopes=frozenset({f"scope-{n}:read"}),
            missing_scopes=(f"scope-{n}:write",),
            reason=BrokenReason.COMPANY_CHANGED if n % 2 else None,
            message=f"candidate {n}",
            activated_at=T0 + timedelta(minutes=n),
            updated_at=T0 + timedelta(hours=n),
            last_checked_at=T0 + timedelta(seconds=n),
        )
        for n in range(1, 9)
    ]

    results = await asyncio.gather(*(store.put(c) for c in candidates), return_exceptions=True)

    winners = [r for r in results if isinstance(r, TenantRecord)]
    assert len(winners) == 1
    assert sum(isinstance(r, StoreConflict) for r in results) == len(candidates) - 1
    winner = winners[0]
    assert winner.version == 2
    assert winner in [c.evolve(version=2) for c in candidates]
    assert await store.get("acme") == winner
