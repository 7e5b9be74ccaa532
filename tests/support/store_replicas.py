"""Store objects on one backend's data, as replicas see it: memory, local and (real) Vault.

`store_replicas` is parametrised over the three backends; each call of what it yields opens
another store object on the same data, and every one is closed after the test.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broker.stores import SecretStore
from broker.stores.local import LocalStore
from support.inprocess import MemoryBackend, MemoryStore

OpenStore = Callable[[], Awaitable[SecretStore]]


def vault_store(request: pytest.FixtureRequest, data: Path) -> SecretStore:
    """A Vault store on the test's OpenBao, under a prefix of its own for `data`."""
    from broker.stores.factory import open_vault_store
    from support.openbao_server import OpenBao

    server: OpenBao = request.getfixturevalue("openbao")
    prefix = "events-" + hashlib.sha256(str(data).encode()).hexdigest()[:16]
    return open_vault_store(server.settings(vault_prefix=prefix))


@pytest.fixture(params=["memory", "local", pytest.param("vault", marks=pytest.mark.real)])
async def store_replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenStore]:
    """Opens store objects (replicas) on one backend's data; closes them."""
    opened: list[SecretStore] = []
    shared = MemoryBackend()

    async def open_one() -> SecretStore:
        store: SecretStore
        if request.param == "memory":
            store = MemoryStore(shared)
        elif request.param == "local":
            store = LocalStore(tmp_path / "store")
        else:
            store = vault_store(request, tmp_path / "store")
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.close()
