"""A full list on the Vault store (broker/stores/vault_bulk.py): the records are read with
the data plane's HTTP client (broker.wire_pool), not hvac, and any record that read cannot
answer plainly is read through hvac."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests.utils
from support.certificates import self_signed
from support.openbao_server import BROKER_POLICY, OpenBao, vault_settings

from broker.records import ApiKey, TenantRecord, TenantState
from broker.stores.factory import open_vault_store
from broker.stores.vault import VaultStore
from broker.stores.vault_auth import build_client
from broker.stores.vault_bulk import BulkReader, BulkReads, Unanswered, tls_context

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def active(tenant: str) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=ApiKey(f"pls_{secrets.token_hex(20)}"),
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read"}),
        activated_at=T0,
        updated_at=T0,
    )


def by_tenant(record: TenantRecord) -> str:
    return record.tenant


def count_hvac_reads(store: VaultStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tenants whose newest version hvac reads from now on."""
    read: list[str] = []
    original: Callable[..., Any] = store._secrets.read

    def counted(tenant: str, version: int | None) -> Any:
        if version is None:
            read.append(tenant)
        return original(tenant, version)

    monkeypatch.setattr(store._secrets, "read", counted)
    return read


@pytest.mark.real
async def test_a_list_reads_every_kind_of_secret_without_hvac(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_vault_store(openbao.settings(vault_prefix=f"bulk-{secrets.token_hex(6)}"))
    kv = hvac.Client(url=openbao.addr, token=openbao.root_token).secrets.kv.v2
    try:
        kept = [await store.put(active(f"tenant-{n}")) for n in range(5)]
        rotated = await store.put(kept[0].evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}")))
        kept[0] = rotated
        await store._lay_tombstone((await store.put(active("buried"))).tenant, [])
        await store.put(active("soft-deleted"))
        kv.delete_latest_version_of_secret(
            path=store._secrets.path("soft-deleted"), mount_point="secret"
        )
        kv.create_or_update_secret(
            path=store._secrets.path("mangled"), secret={"not": "a record"}, mount_point="secret"
        )
        read = count_hvac_reads(store, monkeypatch)

        listed = await store.list()

        assert sorted(listed, key=lambda r: r.tenant) == kept
        assert [await store.get(r.tenant) for r in kept] == kept
        assert read == [r.tenant for r in kept]  # only the gets above went through hvac
    finally:
        await store.close()


@pytest.mark.real
async def test_a_token_refused_during_a_list_logs_in_again(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = hvac.Client(url=openbao.addr, token=openbao.root_token)
    role = f"bulk-{secrets.token_hex(4)}"
    root.auth.approle.create_or_update_approle(
        role, token_policies=[BROKER_POLICY], token_ttl="1h", token_max_ttl="4h"
    )
    login = {
        "vault_role_id": root.auth.approle.read_role_id(role)["data"]["role_id"],
        "vault_secret_id": root.auth.approle.generate_secret_id(role)["data"]["secret_id"],
    }
    store = open_vault_store(vault_settings(openbao, "approle", **login))
    try:
        # The policy's prefix is shared with other tests: tenants of a name of their own.
        mine = f"refused-{secrets.token_hex(4)}"
        written = [await store.put(active(f"{mine}-{n}")) for n in range(6)]
        revoked = store._client.token
        read = count_hvac_reads(store, monkeypatch)
        names = store._secrets.names
        # Revoked between the list of names and the reads: the bulk read gets 403s.
        monkeypatch.setattr(
            store._secrets, "names", lambda: (names(), root.auth.token.revoke(revoked))[0]
        )

        listed = await store.list()

        assert [r for r in sorted(listed, key=by_tenant) if r.tenant.startswith(mine)] == written
        assert store._client.token != revoked  # hvac logged in again
        # The reads in flight when the token was refused went through hvac (each once refused,
        # once after the new login); no more than that.
        assert read and len(read) <= 2 * len(listed)
    finally:
        await store.close()


@pytest.mark.real
async def test_a_list_the_bulk_read_cannot_answer_is_read_through_hvac(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_vault_store(openbao.settings(vault_prefix=f"bulk-{secrets.token_hex(6)}"))
    try:
        written = [await store.put(active(f"t-{n}")) for n in range(4)]
        read = count_hvac_reads(store, monkeypatch)

        async def unanswered(self: BulkReads, path: str) -> None:
            raise Unanswered("a 503, say")

        monkeypatch.setattr(BulkReads, "read", unanswered)

        assert sorted(await store.list(), key=lambda r: r.tenant) == written
        assert sorted(read) == [r.tenant for r in written]
    finally:
        await store.close()


async def crashed_history(store: VaultStore, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tenant whose rotation left its old version (a crash before the destroy): its path."""

    async def crash_before_destroying(tenant: str, *, below: int) -> None:
        return None

    with monkeypatch.context() as patched:
        patched.setattr(store._history, "destroy_below", crash_before_destroying)
        first = await store.put(active("acme"))
        await store.put(first.evolve(api_key=ApiKey(f"pls_{secrets.token_hex(20)}")))
    await store.put(active("globex"))
    return store._secrets.path("acme")


def count_hvac_version_reads(store: VaultStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    original: Callable[[str], Any] = store._secrets.versions

    def counted(tenant: str) -> Any:
        read.append(tenant)
        return original(tenant)

    monkeypatch.setattr(store._secrets, "versions", counted)
    return read


async def history_checked(store: VaultStore) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while store._history.checks:
        assert asyncio.get_running_loop().time() < deadline, "the history check never ended"
        await asyncio.sleep(0.01)


@pytest.mark.real
@pytest.mark.parametrize("bulk", ["answers", "cannot_answer"])
async def test_the_start_up_history_check_reads_version_lists_in_bulk(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, bulk: str
) -> None:
    store = open_vault_store(openbao.settings(vault_prefix=f"bulk-{secrets.token_hex(6)}"))
    kv = hvac.Client(url=openbao.addr, token=openbao.root_token).secrets.kv.v2
    try:
        path = await crashed_history(store, monkeypatch)
        read = count_hvac_version_reads(store, monkeypatch)
        if bulk == "cannot_answer":

            async def unanswered(self: BulkReads, path: str) -> None:
                raise Unanswered("a 429, say")

            monkeypatch.setattr(BulkReads, "metadata", unanswered)

        await store.list()  # the broker's start: the history check runs in the background
        await history_checked(store)

        versions = kv.read_secret_metadata(path=path, mount_point="secret")["data"]["versions"]
        assert {n: v["destroyed"] for n, v in versions.items()} == {"1": True, "2": False}
        # hvac reads a version list only where the bulk read cannot tell.
        assert sorted(read) == ([] if bulk == "answers" else ["acme", "globex"])
    finally:
        await store.close()


def test_tls_is_verified_as_requests_would() -> None:
    default = tls_context(True)
    assert isinstance(default, ssl.SSLContext) and default.verify_mode is ssl.CERT_REQUIRED
    assert default.check_hostname
    unverified = tls_context(False)  # hvac told not to verify: neither does the bulk read
    assert unverified.verify_mode is ssl.CERT_NONE and not unverified.check_hostname
    with pytest.raises(FileNotFoundError):
        tls_context("/nonexistent/ca.pem")  # a CA file that is missing is never ignored
    assert requests.utils.DEFAULT_CA_BUNDLE_PATH


async def test_a_bulk_read_asks_as_hvac_would() -> None:
    ensured: list[bool] = []

    async def ensure() -> None:
        ensured.append(True)

    client = hvac.Client(url="https://vault.example:8200/", token="s.token", namespace="team-a")
    reader = BulkReader(client, ensure, mount="kv", timeout=1.0)

    target, headers = await reader.request("metadata", "pleo-broker/tenants/acme")

    assert target == "/v1/kv/metadata/pleo-broker/tenants/acme"
    assert headers == {
        "X-Vault-Request": "true",
        "X-Vault-Token": "s.token",
        "X-Vault-Namespace": "team-a",
    }
    assert ensured == [True]  # the token is made sure of before every read


# -- BROKER_VAULT_CACERT: a file or a directory, and one that cannot be used ----------------------


def ca_certificate(directory: Path) -> ssl.SSLContext:
    """A self-signed CA certificate for localhost, put in `directory` under the name OpenSSL
    looks it up by (`<subject hash>.0`, as `c_rehash` names it); the server's TLS context."""
    made = self_signed("localhost")
    # OpenSSL's X509_NAME_hash: SHA-1 of the name's canonical DER (a lower-case UTF8String
    # common name already is), without its outer SEQUENCE header; 4 bytes, little-endian.
    name = made.subject.public_bytes()
    assert name[0] == 0x30 and name[1] < 0x80
    digest = hashlib.sha1(name[2:], usedforsecurity=False).digest()
    (directory / f"{int.from_bytes(digest[:4], 'little'):08x}.0").write_bytes(made.cert_pem)
    return made.server_context(directory.parent / "server.pem", directory.parent / "server.key")


@asynccontextmanager
async def tls_vault(context: ssl.SSLContext) -> AsyncIterator[str]:
    """An https stand-in for Vault on 127.0.0.1 that answers every read with one secret."""
    body = json.dumps({"data": {"data": {"k": "v"}, "metadata": {"version": 3}}}).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://localhost:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def nothing_to_ensure() -> None:
    return None


async def test_a_ca_directory_is_trusted_as_requests_would(tmp_path: Path) -> None:
    """BROKER_VAULT_CACERT may name a directory of CA certificates (requests, so hvac,
    accepts one): the bulk read trusts what is in it, and only that."""
    trusted, empty = tmp_path / "ca", tmp_path / "empty"
    trusted.mkdir()
    empty.mkdir()
    async with tls_vault(ca_certificate(trusted)) as url:
        client = build_client(url, cacert=trusted)
        async with BulkReader(client, nothing_to_ensure, mount="kv", timeout=5).session(2) as reads:
            assert await reads.read("pleo-broker/tenants/acme") == ({"k": "v"}, 3)
        # The same server, with a directory that does not hold its CA: not verified.
        client = build_client(url, cacert=empty)
        async with BulkReader(client, nothing_to_ensure, mount="kv", timeout=5).session(2) as reads:
            with pytest.raises(Unanswered):
                await reads.read("pleo-broker/tenants/acme")


@pytest.mark.parametrize("cacert", ["missing.pem", "garbage.pem"])
async def test_a_ca_the_bulk_read_cannot_load_leaves_every_read_to_hvac(
    tmp_path: Path, cacert: str
) -> None:
    """No TLS context can be built (a CA file missing or unreadable): the session opens
    anyway and answers nothing, so each secret is read through hvac, which reports the CA
    problem in its own words, rather than the list failing with an OSError."""
    (tmp_path / "garbage.pem").write_text("not a certificate")
    client = build_client("https://vault.example:8200", cacert=tmp_path / cacert)
    async with BulkReader(client, nothing_to_ensure, mount="kv", timeout=1).session(2) as reads:
        with pytest.raises(Unanswered):
            await reads.read("pleo-broker/tenants/acme")
        with pytest.raises(Unanswered):
            await reads.metadata("pleo-broker/tenants/acme")
