"""Migrating tenants from the local store to Vault (a real OpenBao)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.openbao_server import OpenBao

from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.stores.factory import open_vault_store
from broker.stores.local import LocalStore
from broker.stores.migrate import MigrationReport, migrate
from broker.stores.vault import VaultStore

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalStore]:
    store = LocalStore(tmp_path / "store", master_key=os.urandom(32))
    yield store
    await store.close()


@pytest.fixture
async def vault(openbao: OpenBao) -> AsyncIterator[VaultStore]:
    store = open_vault_store(openbao.settings(vault_prefix=f"migrate-{secrets.token_hex(6)}"))
    yield store
    await store.close()


def records() -> list[TenantRecord]:
    base = TenantRecord(
        tenant="",
        state=TenantState.ACTIVE,
        api_key=None,
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read"}),
        activated_at=T0,
        updated_at=T0,
    )
    return [
        base.evolve(tenant=f"tenant-{n}", api_key=ApiKey(f"pls_{secrets.token_hex(20)}"))
        for n in range(4)
    ] + [
        base.evolve(tenant="waiting", state=TenantState.PENDING, message="Key not accepted."),
        base.evolve(
            tenant="gone-bad",
            state=TenantState.BROKEN,
            reason=BrokenReason.KEY_REJECTED,
            api_key=ApiKey(f"pls_{secrets.token_hex(20)}"),
        ),
    ]


def without_versions(listed: list[TenantRecord]) -> list[TenantRecord]:
    return sorted((r.evolve(version=0) for r in listed), key=lambda r: r.tenant)


@pytest.mark.real
async def test_migration_copies_every_tenant_and_a_rerun_changes_nothing(
    local: LocalStore, vault: VaultStore, capsys: pytest.CaptureFixture[str]
) -> None:
    for record in records():
        await local.put(record)

    first = await migrate(local, vault)
    second = await migrate(local, vault)

    assert first == MigrationReport(copied=6, updated=0, unchanged=0)
    assert second == MigrationReport(copied=0, updated=0, unchanged=6)
    assert without_versions(await vault.list()) == without_versions(await local.list())
    assert all(record.version == 1 for record in await vault.list())
    output = capsys.readouterr()
    for record in records():
        if record.api_key is not None:
            assert record.api_key.reveal() not in output.out + output.err


@pytest.mark.real
async def test_a_changed_source_record_updates_the_target(
    local: LocalStore, vault: VaultStore
) -> None:
    for record in records():
        await local.put(record)
    await migrate(local, vault)
    before = await local.get("tenant-2")
    assert before is not None
    rotated = await local.put(
        before.evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}"), updated_at=T0 + timedelta(1))
    )

    report = await migrate(local, vault)

    assert report == MigrationReport(copied=0, updated=1, unchanged=5)
    migrated = await vault.get("tenant-2")
    assert migrated == rotated.evolve(version=2)


@pytest.mark.real
async def test_tenants_only_in_the_target_are_kept(local: LocalStore, vault: VaultStore) -> None:
    await local.put(records()[0])
    only_in_vault = await vault.put(records()[1].evolve(tenant="vault-only"))

    report = await migrate(local, vault)

    assert report == MigrationReport(copied=1)
    assert await vault.get("vault-only") == only_in_vault
