"""The test helpers themselves: the in-memory store keeps the store contract, the fake Pleo
answers as Pleo does, and an OpenBao that fails to start leaves no process behind."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import openbao_persistent, openbao_server
from support.inprocess import FakePleo, MemoryBackend, MemoryStore
from support.openbao_persistent import PersistentOpenBao
from support.openbao_server import OpenBao

from broker import errors
from broker.pleo import PleoClient
from broker.records import ApiKey, TenantRecord, TenantState

COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"


def _record(tenant: str = "acme", version: int = 0) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=ApiKey("pik_" + "k" * 40),
        company_id=COMPANY,
        version=version,
    )


async def test_the_memory_store_writes_compare_and_set() -> None:
    store = MemoryStore()
    first = await store.put(_record())
    assert first.version == 1
    with pytest.raises(errors.StoreConflict):
        await store.put(_record())  # version 0: the tenant must not exist yet
    second = await store.put(first.evolve(message="changed"))
    assert second.version == 2 and await store.get("acme") == second
    with pytest.raises(errors.StoreConflict):
        await store.put(first)  # stale
    assert await store.delete("acme") is True
    assert await store.delete("acme") is False
    assert await store.get("acme") is None


async def test_the_memory_store_journal_follows_the_contract() -> None:
    store = MemoryStore(MemoryBackend(journal_size=2))
    replica = store.replica()
    start, changed = await store.changes_since(None)
    assert changed is None  # no cursor: reload everything
    await replica.put(_record("acme"))
    await replica.put(_record("globex"))
    cursor, changed = await store.changes_since(start)
    assert changed == ["acme", "globex"]
    assert await store.changes_since(cursor) == (cursor, [])
    for tenant in ("t1", "t2", "t3"):
        await replica.put(_record(tenant))
    assert (await store.changes_since(cursor))[1] is None  # older than the journal holds
    assert (await store.changes_since("sqlite:x:1"))[1] is None  # another backend's cursor
    assert (await store.changes_since("garbled"))[1] is None
    assert (await MemoryStore().changes_since(cursor))[1] is None  # another database


async def test_the_memory_store_switches_fail_as_real_stores_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    await store.put(_record("acme"))
    await store.put(_record("globex"))
    store.corrupt("globex")
    with pytest.raises(errors.StoreIntegrityError):
        await store.get("globex")
    assert [r.tenant for r in await store.list()] == ["acme"]
    assert any(r.getMessage() == "store.record_unreadable" for r in caplog.records)
    store.full = True
    assert await store.get("acme") is not None
    with pytest.raises(errors.StoreUnavailable, match="full"):
        await store.delete("acme")
    store.full, store.read_only_reason = False, "the file system is read-only"
    assert store.read_only == "the file system is read-only"
    with pytest.raises(errors.StoreUnavailable, match="read-only"):
        await store.put(_record("initech"))
    store.down = True
    with pytest.raises(errors.StoreUnavailable):
        await store.list()


async def test_the_fake_pleo_answers_introspection_as_pleo_does() -> None:
    pleo = FakePleo()
    key = pleo.add_key(COMPANY, subject_in_introspection=False)
    client = PleoClient("https://external.pleo.io", transport=pleo.transport())
    try:
        info = await client.introspect(key)
        assert (info.company_id, info.subject_from_installation) == (COMPANY, True)
        assert info.scopes == {"export-jobs:read", "export-jobs:write"}
        pleo.revoke(key)
        with pytest.raises(errors.PleoKeyRejected):
            await client.introspect(key)
        pleo.failure = 503
        with pytest.raises(errors.PleoUnreachable):
            await client.introspect(key)
        pleo.failure = httpx.ConnectError
        with pytest.raises(errors.PleoUnreachable):
            await client.introspect(key)
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", [OpenBao, PersistentOpenBao])
def test_an_openbao_that_never_gets_ready_is_stopped(
    kind: type[OpenBao], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    never_ready = tmp_path / "bao"
    never_ready.write_text("#!/bin/sh\nexec sleep 60\n")
    never_ready.chmod(never_ready.stat().st_mode | stat.S_IXUSR)
    for module in (openbao_server, openbao_persistent):
        monkeypatch.setattr(module, "START_DEADLINE", 0.3)
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    server = kind(str(never_ready), tmp_path / "work")

    with pytest.raises(RuntimeError, match="ready"):
        server.start()

    assert len(started) == 1
    assert started[0].poll() is not None  # terminated, not left running
    assert server.process is None


async def test_the_admin_api_runs_in_process(
    inprocess_admin: httpx.AsyncClient, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    key = fake_pleo.add_key(COMPANY)
    connected = await inprocess_admin.put("/v1/tenants/acme/key", json={"api_key": key.reveal()})
    assert connected.status_code == 200, connected.text
    assert (connected.json()["state"], connected.json()["company_id"]) == ("active", COMPANY)
    listed = await inprocess_admin.get("/v1/tenants")
    assert [view["tenant"] for view in listed.json()["tenants"]] == ["acme"]
    assert (await memory_store.get("acme")) is not None
    refused = await inprocess_admin.get("/v1/tenants", headers={"Authorization": "Bearer no"})
    assert refused.status_code == 401
