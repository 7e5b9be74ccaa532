"""The SecretStore contract, run against every backend in STORE_BACKENDS.

To add a backend: append its name to STORE_BACKENDS and a branch to `open_backend` that
returns a store on the data `data` names: empty when first opened, shared by every store
opened on the same `data` (it may pull fixtures with `request.getfixturevalue`).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.errors import StoreConflict
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.stores import SecretStore, local
from broker.stores.local import LocalStore

STORE_BACKENDS = ["local", "vault"]

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


async def open_backend(
    name: str, request: pytest.FixtureRequest, data: Path, *, journal_size: int | None = None
) -> SecretStore:
    """A store of the backend `name` on the data `data` names (empty when first opened)."""
    if name == "local":
        # The master key file is made in `data`, so later stores on `data` share it.
        return LocalStore(data, journal_size=journal_size or local.JOURNAL_SIZE)
    if name == "vault":
        from support.openbao_server import OpenBao

        from broker.stores import vault
        from broker.stores.factory import open_vault_store

        server: OpenBao = request.getfixturevalue("openbao")
        prefix = "contract-" + hashlib.sha256(str(data).encode()).hexdigest()[:16]
        return open_vault_store(
            server.settings(vault_prefix=prefix), journal_size=journal_size or vault.JOURNAL_SIZE
        )
    raise ValueError(f"no store backend named {name!r}")


OpenStore = Callable[..., Awaitable[SecretStore]]


@pytest.fixture(params=STORE_BACKENDS)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores of one backend: `await open_store("name", journal_size=n)`; closes them."""
    opened: list[SecretStore] = []

    async def open_on(data: str = "store", *, journal_size: int | None = None) -> SecretStore:
        store = await open_backend(
            request.param, request, tmp_path / data, journal_size=journal_size
        )
        opened.append(store)
        return store

    try:
        yield open_on
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> SecretStore:
    return await open_store()


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
            client_id="d8b8a6d4-3c4b-4b8e-8b2e-1f2a3d4e5f6a",
            application_name="Acme ERP — Ünïcode",
            installation_status="PENDING_INTEGRATION",
            installation_synced_at=T0 + timedelta(days=2),
            installation_error="Pleo answered HTTP 503 while updating the installation",
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


# -- the change journal ------------------------------------------------------------------------


async def test_changes_since_no_cursor_means_reload_and_then_nothing_changed(
    store: SecretStore,
) -> None:
    await store.put(active("acme"))

    cursor, changed = await store.changes_since(None)
    again, unchanged = await store.changes_since(cursor)
    still, nothing = await store.changes_since(again)

    assert changed is None
    assert unchanged == [] and nothing == []
    assert isinstance(cursor, str) and again == still


async def test_changes_since_names_each_put_and_deleted_tenant_once(store: SecretStore) -> None:
    acme = await store.put(active("acme"))
    await store.put(active("globex"))
    cursor, _ = await store.changes_since(None)

    acme = await store.put(acme.evolve(message="checked"))
    await store.put(acme.evolve(message="checked again"))
    await store.delete("globex")
    await store.put(active("initech"))
    after, changed = await store.changes_since(cursor)

    assert changed is not None
    assert sorted(changed) == ["acme", "globex", "initech"]
    assert await store.changes_since(after) == (after, [])


async def test_failed_writes_are_not_changes(store: SecretStore) -> None:
    first = await store.put(active("acme"))
    await store.put(first.evolve(message="newer"))
    cursor, _ = await store.changes_since(None)

    with pytest.raises(StoreConflict):
        await store.put(first.evolve(message="stale"))
    with pytest.raises(StoreConflict):
        await store.put(active("acme"))
    assert await store.delete("never-existed") is False

    assert (await store.changes_since(cursor))[1] == []


async def test_a_cursor_is_good_for_another_store_on_the_same_data(
    open_store: OpenStore,
) -> None:
    mine, theirs = await open_store(), await open_store()
    await mine.put(active("acme"))
    cursor, _ = await mine.changes_since(None)

    await theirs.put(active("globex"))
    await theirs.delete("acme")
    seen_there = await theirs.changes_since(cursor)
    seen_here = await mine.changes_since(cursor)

    assert seen_here == seen_there
    assert seen_here[1] is not None and sorted(seen_here[1]) == ["acme", "globex"]


async def test_concurrent_writes_through_two_stores_all_reach_the_journal(
    open_store: OpenStore,
) -> None:
    first, second = await open_store(), await open_store()
    cursor, _ = await first.changes_since(None)
    names = [f"tenant-{n:02d}" for n in range(24)]

    await asyncio.gather(
        *((first if n % 2 else second).put(active(name)) for n, name in enumerate(names))
    )

    _, changed = await second.changes_since(cursor)
    assert changed is not None and sorted(changed) == names


async def test_a_cursor_from_other_data_is_refused(open_store: OpenStore) -> None:
    here, elsewhere = await open_store("here"), await open_store("elsewhere")
    await here.put(active("acme"))
    await elsewhere.put(active("acme"))
    foreign, _ = await elsewhere.changes_since(None)

    cursor, changed = await here.changes_since(foreign)

    assert changed is None
    assert cursor != foreign
    assert (await here.changes_since(cursor))[1] == []


async def test_a_garbled_cursor_is_refused(store: SecretStore) -> None:
    await store.put(active("acme"))
    cursor, _ = await store.changes_since(None)
    backend, instance, revision = cursor.split(":")
    garbled = [
        "",
        "garbage",
        f"{backend}:{instance}",
        f"{backend}:{instance}:{revision}:0",
        f"{backend}:{instance}:-1",
        f"{backend}:{instance}:x",
        f"{backend}:{instance}:{int(revision) + 1}",  # ahead of the journal: a restored store
        f"{backend}:{instance}0:{revision}",
        f"other:{instance}:{revision}",
    ]

    for text in garbled:
        assert await store.changes_since(text) == (cursor, None), text


async def test_a_cursor_older_than_the_journal_is_refused(open_store: OpenStore) -> None:
    store = await open_store(journal_size=3)
    start, _ = await store.changes_since(None)
    await store.put(active("t1"))
    after_first, _ = await store.changes_since(start)
    await store.put(active("t2"))
    await store.put(active("t3"))

    assert (await store.changes_since(start))[1] == ["t1", "t2", "t3"]

    await store.put(active("t4"))

    assert (await store.changes_since(start))[1] is None
    assert (await store.changes_since(after_first))[1] == ["t2", "t3", "t4"]
