"""The Vault store against a real OpenBao: auth, CAS, destruction, policy, outages, scale."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import hvac.v1
import pytest
import requests
from support.k8s_tokenreview import TokenReviewServer
from support.openbao_server import BROKER_POLICY, OpenBao, vault_settings
from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox

from broker.errors import StoreConflict, StoreUnavailable
from broker.events import LOGGER_NAME
from broker.metrics import Metrics
from broker.outbox import new_event
from broker.pleo import PleoClient
from broker.records import ApiKey, TenantRecord, TenantState
from broker.settings import Settings
from broker.stores.factory import open_vault_store, vault_client, vault_login
from broker.stores.instrumented import InstrumentedStore
from broker.stores.vault import JOURNAL_VERSIONS_KEPT, VaultStore
from broker.stores.vault_auth import login
from broker.tenants import TenantService

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
# Measured on the 2-CPU build machine (OpenBao and the test share it, ~1 ms a request either way):
# 10,000 tenants took 13.2 s to write and 10.8 s to list (24 s); 8,000 take 9.6 s + 8.3 s.
MANY_TENANTS = 8_000
JOURNALED_TENANTS = 2_000


class FakeClock:
    """A monotonic clock the test moves by hand (token lifetimes are hours long)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_tenant() -> str:
    return f"t-{secrets.token_hex(6)}"


def new_key() -> ApiKey:
    return ApiKey(f"pls_{secrets.token_hex(20)}")


def active(tenant: str, key: ApiKey | None = None) -> TenantRecord:
    return TenantRecord(
        tenant=tenant,
        state=TenantState.ACTIVE,
        api_key=key or new_key(),
        company_id="7b2c1e34-5a6f-4d8e-9b0a-1c2d3e4f5a6b",
        scopes=frozenset({"export-jobs:read"}),
        activated_at=T0,
        updated_at=T0,
    )


@pytest.fixture
async def root_store(openbao: OpenBao) -> AsyncIterator[VaultStore]:
    """A store with the root token on a prefix of its own."""
    store = open_vault_store(openbao.settings(vault_prefix=f"test-{secrets.token_hex(6)}"))
    yield store
    await store.close()


@pytest.fixture
def root(openbao: OpenBao) -> Iterator[hvac.Client]:
    with openbao.root_client() as client:
        yield client


def read_version(root: hvac.Client, path: str, version: int) -> dict[str, Any] | None:
    """The data of one KV v2 version as an operator with the root token sees it."""
    try:
        response = root.secrets.kv.v2.read_secret_version(
            path=path, version=version, mount_point="secret", raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        return None
    data: dict[str, Any] = response["data"]["data"]
    return data


def approle_for(root: hvac.Client, role: str) -> dict[str, str]:
    """A fresh AppRole role with the broker policy; its login settings."""
    root.auth.approle.create_or_update_approle(
        role, token_policies=[BROKER_POLICY], token_ttl="1h", token_max_ttl="4h"
    )
    return {
        "vault_role_id": root.auth.approle.read_role_id(role)["data"]["role_id"],
        "vault_secret_id": root.auth.approle.generate_secret_id(role)["data"]["secret_id"],
    }


def tokens_of(root: hvac.Client, role: str) -> list[dict[str, Any]]:
    """Lookups of the live tokens issued to an AppRole role."""
    found = []
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        data = root.auth.token.lookup_accessor(accessor)["data"]
        if (data.get("meta") or {}).get("role_name") == role:
            found.append(data)
    return found


@pytest.mark.real
@pytest.mark.parametrize("auth", ["token", "approle", "kubernetes"])
async def test_every_auth_method_logs_in_and_round_trips(
    openbao: OpenBao, root: hvac.Client, tokenreview: TokenReviewServer, auth: str
) -> None:
    reviews_before = tokenreview.reviews
    overrides: dict[str, Any] = {}
    if auth == "token":
        token = root.auth.token.create(policies=[BROKER_POLICY], ttl="1h", no_default_policy=True)
        overrides["vault_token"] = token["auth"]["client_token"]
    store = open_vault_store(vault_settings(openbao, auth, **overrides))
    record = active(new_tenant())
    try:
        stored = await store.put(record)
        assert await store.get(record.tenant) == stored == record.evolve(version=1)
        # The policy covers the event log too: the outbox, the log, the feed, retention.
        made = new_event("tenant.broken", "admin", stored.view())
        stored = await store.put(stored, events=[made])
        assert await store.get(record.tenant) == stored
        gone = new_event("tenant.disconnected", "admin", stored.view())
        assert await store.delete(record.tenant, events=[gone]) is True
        found, _ = await store.events_after(None, 100, record.tenant)
        assert found == [made, gone]
        await store.prune_events(datetime.now(UTC) - timedelta(days=30))
    finally:
        await store.close()
    assert (tokenreview.reviews > reviews_before) is (auth == "kubernetes")


@pytest.mark.real
async def test_kubernetes_login_with_an_unknown_service_account_token_is_refused(
    openbao: OpenBao, tokenreview: TokenReviewServer, tmp_path: Path
) -> None:
    token_path = tmp_path / "token"
    token = tokenreview.issue("payments", "pleo-broker")
    tokenreview.revoke(token)
    token_path.write_text(token)
    store = open_vault_store(vault_settings(openbao, "kubernetes", vault_k8s_token_path=token_path))
    try:
        with pytest.raises(StoreUnavailable, match="kubernetes login"):
            await store.get(new_tenant())
    finally:
        await store.close()


@pytest.mark.real
async def test_vault_environment_and_token_file_are_ignored(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".vault-token").write_text("s.bogus-token-from-home")
    missing = str(tmp_path / "missing.pem")
    monkeypatch.setenv("HOME", str(home))
    wrong = {
        "VAULT_ADDR": "http://127.0.0.1:9",
        "VAULT_TOKEN": "s.wrong-token-from-env",
        "VAULT_CACERT": missing,
        "VAULT_CAPATH": missing,
        "VAULT_CLIENT_CERT": missing,
        "VAULT_CLIENT_KEY": missing,
        "REQUESTS_CA_BUNDLE": missing,
        "CURL_CA_BUNDLE": missing,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    for name, value in wrong.items():
        monkeypatch.setenv(name, value)
    # hvac reads these once, at import; make them look as if they were set then.
    for name in ("VAULT_CACERT", "VAULT_CAPATH", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY"):
        monkeypatch.setattr(hvac.v1, name, missing)

    for auth in ("token", "approle"):
        settings = vault_settings(openbao, auth, vault_prefix=BROKER_POLICY)
        client = vault_client(settings)
        try:
            assert client.url == openbao.addr
            assert client.token == ""
            assert client.adapter._kwargs["cert"] is None
            assert client.adapter._kwargs["verify"] is True
        finally:
            client.adapter.close()
        store = open_vault_store(settings)
        record = active(new_tenant())
        try:
            assert await store.put(record) == record.evolve(version=1)
            assert await store.delete(record.tenant) is True
        finally:
            await store.close()


@pytest.mark.real
async def test_stale_write_from_another_instance_conflicts(openbao: OpenBao) -> None:
    settings = openbao.settings(vault_prefix=f"test-{secrets.token_hex(6)}")
    first, second = open_vault_store(settings), open_vault_store(settings)
    try:
        created = await first.put(active("acme"))
        seen_by_second = await second.get("acme")
        assert seen_by_second == created
        updated = await first.put(created.evolve(message="first wins"))

        with pytest.raises(StoreConflict):
            await second.put(seen_by_second.evolve(message="second is stale"))
        with pytest.raises(StoreConflict):
            await second.put(active("acme"))

        assert await second.get("acme") == updated
    finally:
        await first.close()
        await second.close()


@pytest.mark.real
async def test_rotation_destroys_every_version_holding_the_old_key(
    root_store: VaultStore, root: hvac.Client
) -> None:
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    old_key, new = new_key(), new_key()
    v1 = await root_store.put(active(tenant, old_key))
    v2 = await root_store.put(v1.evolve(message="checked, same key"))
    # Every write destroys what came before it, rotation or not, so a version that a failed
    # destroy left behind never outlives the tenant's next write.
    assert read_version(root, path, 1) is None

    v3 = await root_store.put(v2.evolve(api_key=new, message="rotated"))

    assert v3.version == 3
    assert read_version(root, path, 1) is None
    assert read_version(root, path, 2) is None
    latest = read_version(root, path, 3)
    assert latest is not None and latest["api_key"] == new.reveal()
    versions = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")["data"][
        "versions"
    ]
    assert {n: v["destroyed"] for n, v in versions.items()} == {"1": True, "2": True, "3": False}


@pytest.mark.real
async def test_delete_leaves_nothing_readable(root_store: VaultStore, root: hvac.Client) -> None:
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    first = await root_store.put(active(tenant))
    await root_store.put(first.evolve(message="second version, same key"))

    assert await root_store.delete(tenant) is True

    assert await root_store.get(tenant) is None
    assert read_version(root, path, 1) is None
    assert read_version(root, path, 2) is None
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    assert await root_store.delete(tenant) is False


@pytest.mark.real
async def test_broker_policy_confines_the_token_to_its_prefix(
    openbao: OpenBao, root: hvac.Client
) -> None:
    root.secrets.kv.v2.create_or_update_secret(
        path="other-app/secret", secret={"password": "x"}, mount_point="secret"
    )
    settings = vault_settings(openbao, "approle")
    client = vault_client(settings)
    try:
        login(client, vault_login(settings))
        kv = client.secrets.kv.v2
        kv.create_or_update_secret(
            path="pleo-broker/tenants/policy-probe", secret={"ok": "1"}, mount_point="secret"
        )
        assert kv.read_secret_version(
            path="pleo-broker/tenants/policy-probe",
            mount_point="secret",
            raise_on_deleted_version=True,
        )["data"]["data"] == {"ok": "1"}
        outside: list[Callable[[], object]] = [
            lambda: kv.read_secret_version(
                path="other-app/secret", mount_point="secret", raise_on_deleted_version=True
            ),
            lambda: kv.create_or_update_secret(
                path="other-app/secret", secret={"password": "y"}, mount_point="secret"
            ),
            lambda: kv.create_or_update_secret(
                path="pleo-broker/not-tenants", secret={"x": "y"}, mount_point="secret"
            ),
            lambda: kv.list_secrets(path="", mount_point="secret"),
            lambda: kv.delete_metadata_and_all_versions(
                path="other-app/secret", mount_point="secret"
            ),
            lambda: kv.destroy_secret_versions(
                path="other-app/secret", versions=[1], mount_point="secret"
            ),
            lambda: kv.create_or_update_secret(
                path="pleo-broker/journal-2", secret={"x": "y"}, mount_point="secret"
            ),
            lambda: kv.create_or_update_secret(
                path="pleo-broker/journal/x", secret={"x": "y"}, mount_point="secret"
            ),
            lambda: kv.read_secret_metadata(path="pleo-broker/journal", mount_point="secret"),
            lambda: kv.delete_metadata_and_all_versions(
                path="pleo-broker/journal", mount_point="secret"
            ),
            lambda: kv.destroy_secret_versions(
                path="pleo-broker/journal", versions=[1], mount_point="secret"
            ),
            lambda: kv.update_metadata(
                path="other-app/secret", max_versions=1, mount_point="secret"
            ),
            lambda: client.sys.list_policies(),
            lambda: client.auth.token.create(policies=[BROKER_POLICY]),
        ]
        for attempt in outside:
            with pytest.raises(hvac.exceptions.Forbidden):
                attempt()
    finally:
        client.adapter.close()

    elsewhere = open_vault_store(vault_settings(openbao, "approle", vault_prefix="other-app"))
    try:
        with pytest.raises(StoreUnavailable, match="policy"):
            await elsewhere.put(active(new_tenant()))
    finally:
        await elsewhere.close()


@pytest.mark.real
async def test_token_is_renewed_before_expiry_and_relogged_when_renewal_fails(
    openbao: OpenBao, root: hvac.Client
) -> None:
    role = f"renew-{secrets.token_hex(4)}"
    clock = FakeClock()
    store = open_vault_store(
        vault_settings(openbao, "approle", **approle_for(root, role)), clock=clock
    )
    record = await store.put(active(new_tenant()))
    try:
        (token,) = tokens_of(root, role)
        clock.advance(600)
        assert await store.get(record.tenant) == record
        assert "last_renewal_time" not in tokens_of(root, role)[0]  # an hour's lease: too early

        clock.advance(2_000)  # 43 of 60 minutes gone
        assert await store.get(record.tenant) == record
        (renewed,) = tokens_of(root, role)
        assert renewed["accessor"] == token["accessor"]
        assert renewed.get("last_renewal_time")

        root.auth.token.revoke_accessor(token["accessor"])
        clock.advance(2_500)
        assert await store.get(record.tenant) == record
        (fresh,) = tokens_of(root, role)
        assert fresh["accessor"] != token["accessor"]
    finally:
        await store.close()


@pytest.mark.real
async def test_revoked_token_is_replaced_by_a_new_login(
    openbao: OpenBao, root: hvac.Client
) -> None:
    role = f"relogin-{secrets.token_hex(4)}"
    store = open_vault_store(vault_settings(openbao, "approle", **approle_for(root, role)))
    try:
        record = await store.put(active(new_tenant()))
        (token,) = tokens_of(root, role)
        root.auth.token.revoke_accessor(token["accessor"])

        assert await store.get(record.tenant) == record

        (fresh,) = tokens_of(root, role)
        assert fresh["accessor"] != token["accessor"]
    finally:
        await store.close()


@pytest.mark.real
async def test_stopped_vault_is_unavailable_quickly_and_recovers(openbao_outage: OpenBao) -> None:
    store = open_vault_store(openbao_outage.settings(vault_timeout=1.0))
    try:
        await store.put(active("acme"))
        openbao_outage.stop()

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("acme")
        with pytest.raises(StoreUnavailable):
            await store.put(active("globex"))
        assert time.monotonic() - started < 2.0

        openbao_outage.start()  # dev mode keeps nothing across a restart
        assert await store.get("acme") is None
        assert (await store.put(active("acme"))).version == 1
    finally:
        await store.close()


@pytest.mark.real
async def test_sealed_vault_is_unavailable_until_unsealed(openbao_outage: OpenBao) -> None:
    store = open_vault_store(openbao_outage.settings(vault_timeout=1.0))
    try:
        stored = await store.put(active("acme"))
        openbao_outage.seal()

        with pytest.raises(StoreUnavailable, match="sealed"):
            await store.get("acme")

        openbao_outage.unseal()
        assert await store.get("acme") == stored
    finally:
        await store.close()


@pytest.mark.real
async def test_vault_that_never_answers_is_unavailable_within_the_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever answers
        settings = Settings(
            _env_file=None,
            store="vault",
            vault_addr=f"http://127.0.0.1:{silent.getsockname()[1]}",
            vault_token="s.unused",
            vault_timeout=0.5,
        )
        store = open_vault_store(settings)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="did not answer"):
                await store.get("acme")
            assert time.monotonic() - started < 1.5
        finally:
            await store.close()


@pytest.mark.real
async def test_malformed_tenant_ids_never_reach_vault(root_store: VaultStore) -> None:
    assert await root_store.get("../../sys/policy") is None
    assert await root_store.delete("a/b") is False
    with pytest.raises(ValueError):
        await root_store.put(active("acme").evolve(tenant="../escape"))


@pytest.mark.real
@pytest.mark.slow
async def test_listing_many_tenants(openbao: OpenBao) -> None:
    store = open_vault_store(
        openbao.settings(vault_prefix=f"many-{secrets.token_hex(6)}", vault_threads=32)
    )
    names = [f"tenant-{n:05d}" for n in range(MANY_TENANTS)]
    try:
        await asyncio.gather(*(store.put(active(name)) for name in names))

        listed = await store.list()

        assert sorted(record.tenant for record in listed) == names
        assert all(record.version == 1 and record.api_key is not None for record in listed)
    finally:
        await store.close()


class Events(logging.Handler):
    """Collects the broker's events (name and fields) while installed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((getattr(record, "event", ""), dict(getattr(record, "fields", {}))))


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.real
async def test_the_broker_policy_allows_the_journal(openbao: OpenBao, root: hvac.Client) -> None:
    store = open_vault_store(vault_settings(openbao, "approle"))
    try:
        cursor, _ = await store.changes_since(None)
        tenant = new_tenant()
        await store.put(active(tenant))

        _, changed = await store.changes_since(cursor)

        assert changed == [tenant]
    finally:
        await store.delete(tenant)
        await store.close()
    metadata = root.secrets.kv.v2.read_secret_metadata(
        path="pleo-broker/journal", mount_point="secret"
    )["data"]
    assert metadata["max_versions"] == JOURNAL_VERSIONS_KEPT


@pytest.mark.real
async def test_a_lost_or_mangled_journal_means_reload_and_the_next_write_starts_anew(
    root_store: VaultStore, root: hvac.Client
) -> None:
    journal = f"{root_store._base.rsplit('/', 1)[0]}/journal"
    await root_store.put(active("acme"))
    cursor, _ = await root_store.changes_since(None)

    root.secrets.kv.v2.delete_metadata_and_all_versions(path=journal, mount_point="secret")
    assert (await root_store.changes_since(cursor))[1] is None
    await root_store.put(active("globex"))
    assert (await root_store.changes_since(cursor))[1] is None
    cursor, _ = await root_store.changes_since(None)

    root.secrets.kv.v2.create_or_update_secret(
        path=journal, secret={"recent": "not a journal"}, mount_point="secret"
    )
    assert (await root_store.changes_since(cursor))[1] is None
    mangled, _ = await root_store.changes_since(None)
    await root_store.delete("acme")
    cursor, changed = await root_store.changes_since(mangled)
    assert changed == ["acme"]

    root.secrets.kv.v2.delete_latest_version_of_secret(path=journal, mount_point="secret")
    assert (await root_store.changes_since(cursor))[1] is None
    deleted, _ = await root_store.changes_since(None)
    await root_store.put(active("initech"))
    assert (await root_store.changes_since(deleted))[1] == ["initech"]


@pytest.mark.real
async def test_a_failed_journal_append_is_logged_and_the_write_stands(
    openbao: OpenBao, root: hvac.Client, events: Events
) -> None:
    prefix = f"nojournal-{secrets.token_hex(6)}"
    policy = f"tenants-only-{prefix}"
    root.sys.create_or_update_policy(
        name=policy,
        policy=f"""
            path "secret/data/{prefix}/tenants/*" {{ capabilities = ["create", "read", "update"] }}
            path "secret/metadata/{prefix}/tenants/*" {{ capabilities = ["read", "delete"] }}
        """,
    )
    token = root.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"]
    store = open_vault_store(openbao.settings(vault_prefix=prefix, vault_token=token))
    record = active(new_tenant())
    try:
        stored = await store.put(record)

        assert await store.get(record.tenant) == stored
    finally:
        await store.close()
    failures = [fields for name, fields in events.seen if name == "store.journal_failed"]
    assert len(failures) == 1
    assert failures[0]["changes"] == 1 and "policy" in failures[0]["error"]
    assert record.api_key is not None
    assert record.api_key.reveal() not in repr(events.seen)


@pytest.mark.real
async def test_a_change_reaches_another_replica_through_the_journal(
    openbao: OpenBao, events: Events
) -> None:
    settings = openbao.settings(vault_prefix=f"journal-{secrets.token_hex(6)}", vault_threads=32)
    writer = open_vault_store(settings)
    metrics = Metrics()
    reader = InstrumentedStore(open_vault_store(settings), metrics)
    pleo = PleoClient("http://127.0.0.1:9")  # never called: refresh does not talk to Pleo
    tenants = TenantService(reader, pleo, metrics, cache_ttl=10.0)

    def operations(op: str) -> float | None:
        labels = {"backend": "vault", "op": op, "result": "ok"}
        return metrics.registry.get_sample_value("broker_store_operations_total", labels)

    try:
        names = [f"tenant-{n:05d}" for n in range(JOURNALED_TENANTS)]
        stored = await asyncio.gather(*(writer.put(active(name)) for name in names))
        assert await tenants.registry.refresh()
        assert len(tenants.registry.all()) == JOURNALED_TENANTS
        assert (operations("list"), operations("get")) == (1, None)  # list reads inside

        rotated = await writer.put(stored[1_000].evolve(api_key=new_key()))
        await writer.delete("tenant-00007")
        assert await tenants.registry.refresh()

        assert tenants.registry.get("tenant-01000") == rotated
        assert tenants.registry.get("tenant-00007") is None
        assert len(tenants.registry.all()) == JOURNALED_TENANTS - 1
        assert operations("list") == 1
        assert operations("get") == 2
        assert operations("changes") == 2
        assert [name for name, _ in events.seen if name == "store.journal_failed"] == []
    finally:
        await pleo.aclose()
        await reader.close()
        await writer.close()


def test_a_vault_record_written_before_the_integration_fields_still_decodes() -> None:
    from broker.stores.vault_kv import decode, encode

    record = active("acme").evolve(client_id="c-1", application_name="Acme ERP", version=3)
    data = encode(record)
    assert decode("acme", data, 3) == record
    del data["client_id"], data["application_name"]
    assert decode("acme", data, 3) == record.evolve(client_id=None, application_name=None)


# -- interrupted disconnects and unfinished destroys (issue 8, items 15 and 16) ------------------


def versions_of(root: hvac.Client, path: str) -> dict[int, bool]:
    """Each KV v2 version of `path` and whether it holds readable data (not destroyed/deleted)."""
    try:
        metadata = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return {}
    return {
        int(number): not (meta["destroyed"] or meta["deletion_time"])
        for number, meta in metadata["data"]["versions"].items()
    }


def cut(*args: object, **kwargs: object) -> None:
    """Stands in for an hvac call: the connection to Vault breaks."""
    raise requests.ConnectionError("connection reset by peer")


@pytest.mark.real
@pytest.mark.parametrize("interrupted_before", ["destroy_secret_versions", "delete_metadata"])
async def test_a_disconnect_interrupted_midway_leaves_no_tenant_and_reconnecting_works(
    root_store: VaultStore,
    root: hvac.Client,
    monkeypatch: pytest.MonkeyPatch,
    interrupted_before: str,
) -> None:
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    first = await root_store.put(active(tenant))
    current = await root_store.put(first.evolve(message="checked"))
    hvac_method = {
        "destroy_secret_versions": "destroy_secret_versions",
        "delete_metadata": "delete_metadata_and_all_versions",
    }[interrupted_before]
    cursor, _ = await root_store.changes_since(None)
    with monkeypatch.context() as patched:
        patched.setattr(root_store._kv, hvac_method, cut)
        with pytest.raises(StoreUnavailable):
            await root_store.delete(tenant)

    # Once a disconnect has begun, the tenant is gone for every reader (replicas hear of it)...
    assert await root_store.get(tenant) is None
    assert await root_store.list() == []
    assert (await root_store.changes_since(cursor))[1] == [tenant]
    # ...a writer still holding the old record cannot bring it back...
    with pytest.raises(StoreConflict):
        await root_store.put(current.evolve(message="a stale writer"))
    # ...and connecting it again works (it was a 409 store_conflict "retry", forever).
    again = await root_store.put(active(tenant))
    assert await root_store.get(tenant) == again
    assert [n for n, readable in versions_of(root, path).items() if readable] == [again.version]
    assert current.api_key is not None
    assert current.api_key.reveal() not in repr(
        [read_version(root, path, n) for n in versions_of(root, path)]
    )


@pytest.mark.real
async def test_a_disconnect_can_be_retried_after_an_interruption(
    root_store: VaultStore, root: hvac.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    await root_store.put(active(tenant))
    with monkeypatch.context() as patched:
        patched.setattr(root_store._kv, "destroy_secret_versions", cut)
        with pytest.raises(StoreUnavailable):
            await root_store.delete(tenant)

    assert await root_store.delete(tenant) is True

    assert versions_of(root, path) == {}
    assert await root_store.delete(tenant) is False


@pytest.mark.real
async def test_a_tenant_whose_every_version_was_destroyed_can_be_connected_again(
    root_store: VaultStore, root: hvac.Client
) -> None:
    # What an older broker left when its disconnect stopped after destroying the versions (or
    # an operator's `bao kv destroy`): metadata whose versions hold nothing.
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    first = await root_store.put(active(tenant))
    await root_store.put(first.evolve(message="checked"))
    root.secrets.kv.v2.destroy_secret_versions(path=path, versions=[1, 2], mount_point="secret")
    assert await root_store.get(tenant) is None

    racing = await asyncio.gather(
        *(root_store.put(active(tenant, new_key())) for _ in range(4)), return_exceptions=True
    )

    winners = [r for r in racing if isinstance(r, TenantRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, StoreConflict) for r in racing if r is not winners[0])
    assert await root_store.get(tenant) == winners[0]
    assert winners[0].version == 3


@pytest.mark.real
async def test_a_soft_deleted_latest_version_is_no_tenant(
    root_store: VaultStore, root: hvac.Client
) -> None:
    tenant = "acme"
    path = f"{root_store._base}/{tenant}"
    await root_store.put(active(tenant))
    root.secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point="secret")
    assert await root_store.get(tenant) is None

    again = await root_store.put(active(tenant))

    assert again.version == 2
    assert versions_of(root, path) == {1: False, 2: True}


def eventually(check: Callable[[], bool], *, within: float = 5.0, what: str) -> None:
    """Poll `check` (a few ms apart) until it holds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.01)


async def eventually_async(check: Callable[[], bool], *, within: float = 5.0, what: str) -> None:
    """`eventually`, yielding to the event loop between polls (background work runs there)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


@pytest.mark.real
async def test_history_a_crash_left_readable_is_destroyed_at_start_up(
    openbao: OpenBao, root: hvac.Client, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = openbao.settings(vault_prefix=f"crash-{secrets.token_hex(6)}")
    crashed = open_vault_store(settings)

    async def crash_before_destroying(tenant: str, *, below: int) -> None:
        return None  # the process died between the write and the destroy

    monkeypatch.setattr(crashed._history, "destroy_below", crash_before_destroying)
    old_key = new_key()
    first = await crashed.put(active("acme", old_key))
    await crashed.put(first.evolve(api_key=new_key()))
    await crashed.put(active("globex"))
    await crashed.close()
    path = f"{crashed._base}/acme"
    assert (read_version(root, path, 1) or {}).get("api_key") == old_key.reveal()

    metrics = Metrics()
    pleo = PleoClient("http://127.0.0.1:9")  # never called: loading does not talk to Pleo
    restarted = TenantService(open_vault_store(settings), pleo, metrics)
    try:
        await restarted.registry.start()  # the broker's start-up: one full reload
        await eventually_async(
            lambda: versions_of(root, path) == {1: False, 2: True},
            what="the old version is destroyed",
        )
    finally:
        await restarted.registry.stop()
        await restarted.store.close()
        await pleo.aclose()
    destroyed = [fields for name, fields in events.seen if name == "store.history_destroyed"]
    assert destroyed == [{"tenant": "acme", "backend": "vault", "versions": 1}]
    assert old_key.reveal() not in repr(events.seen)


@pytest.mark.real
async def test_a_destroy_that_failed_is_retried_at_the_next_full_reload(
    root_store: VaultStore, root: hvac.Client, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f"{root_store._base}/acme"
    first = await root_store.put(active("acme"))
    await root_store.list()  # the start-up check: nothing to destroy yet
    await eventually_async(lambda: not root_store._history.checks, what="the start-up check ends")
    with monkeypatch.context() as patched:
        patched.setattr(root_store._kv, "destroy_secret_versions", cut)
        await root_store.put(first.evolve(api_key=new_key()))
    assert versions_of(root, path) == {1: True, 2: True}
    assert [name for name, _ in events.seen].count("store.destroy_failed") == 1

    await root_store.list()  # the next full reload

    await eventually_async(
        lambda: versions_of(root, path) == {1: False, 2: True}, what="the retried destroy"
    )


@pytest.mark.real
async def test_a_write_answered_too_late_has_its_history_checked_at_the_next_full_reload(
    openbao: OpenBao, root: hvac.Client
) -> None:
    store = open_vault_store(
        openbao.settings(vault_prefix=f"late-{secrets.token_hex(6)}", vault_timeout=0.5)
    )
    path = f"{store._base}/acme"
    answered = threading.Event()
    write = store._kv.create_or_update_secret

    def lands_but_answers_late(**kwargs: Any) -> Any:
        response = write(**kwargs)
        answered.wait(10)  # the broker stops waiting first
        return response

    try:
        first = await store.put(active("acme"))
        await store.list()  # the start-up check: nothing to destroy yet
        await eventually_async(lambda: not store._history.checks, what="the start-up check ends")
        store._kv.create_or_update_secret = lands_but_answers_late
        try:
            with pytest.raises(StoreUnavailable, match="did not answer"):
                await store.put(first.evolve(api_key=new_key()))
        finally:
            answered.set()
            store._kv.create_or_update_secret = write
        assert versions_of(root, path) == {1: True, 2: True}  # it landed; the old key stayed

        await store.list()  # the next full reload

        await eventually_async(
            lambda: versions_of(root, path) == {1: False, 2: True}, what="the late destroy"
        )
    finally:
        await store.close()


def refreshes_seen(broker: RunningBroker) -> float:
    """How many journal reads (refreshes) the broker has made so far."""
    metrics = httpx.get(f"{broker.admin_url}/metrics").text
    found = re.search(
        r'broker_store_operations_total\{backend="vault",op="changes",result="ok"\} (\S+)', metrics
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.real
@pytest.mark.parametrize("failure", ["tombstone_breaks", "destroy_breaks", "destroy_times_out"])
def test_an_interrupted_disconnect_stops_the_key_at_once_and_the_tenant_reconnects(
    openbao: OpenBao,
    root: hvac.Client,
    sandbox: RunningSandbox,
    make_broker: Callable[..., RunningBroker],
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    settings = openbao.settings(vault_prefix=f"e2e-{secrets.token_hex(6)}", vault_timeout=1.0)
    store = open_vault_store(settings)
    broker = make_broker(store=store)
    admin = httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False)
    with admin:
        interrupted_disconnect(store, broker, admin, root, sandbox, monkeypatch, failure)


def interrupted_disconnect(
    store: VaultStore,
    broker: RunningBroker,
    admin: httpx.Client,
    root: hvac.Client,
    sandbox: RunningSandbox,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    path = f"{store._base}/acme"
    tenant = {"X-Broker-Tenant": "acme"}
    first = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    assert admin.put("/v1/tenants/acme/key", json={"api_key": first.api_key}).status_code == 200
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant).status_code == 200
    assert sandbox.state.requests[-1].key_id == first.key_id

    # The store call at `failure` starts, then fails once the test has looked at the proxy.
    entered, proceed = threading.Event(), threading.Event()
    write, destroy = store._kv.create_or_update_secret, store._kv.destroy_secret_versions

    def tombstone_breaks(**kwargs: Any) -> Any:
        if not kwargs["secret"].get("tombstone"):
            return write(**kwargs)
        entered.set()
        proceed.wait(10)
        raise requests.ConnectionError("connection reset by peer")

    def destroy_breaks(**kwargs: Any) -> Any:
        destroy(**kwargs)
        entered.set()
        proceed.wait(10)
        raise requests.ConnectionError("connection reset by peer")

    def destroy_times_out(**kwargs: Any) -> Any:
        destroy(**kwargs)
        entered.set()
        proceed.wait(10)  # Vault did the work, but answers after the broker gave up waiting

    if failure == "tombstone_breaks":
        monkeypatch.setattr(store._kv, "create_or_update_secret", tombstone_breaks)
    else:
        monkeypatch.setattr(store._kv, "destroy_secret_versions", locals()[failure])
    with ThreadPoolExecutor(1) as background:
        try:
            deleting = background.submit(admin.delete, "/v1/tenants/acme")
            assert entered.wait(10)
            sandbox.state.clear_requests()
            # The key's destruction has started: the proxy no longer injects it.
            during = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant)
            assert (during.status_code, during.json()["error"]["code"]) == (404, "tenant_unknown")
            if failure != "destroy_times_out":
                proceed.set()
            refused = deleting.result(10)
        finally:
            proceed.set()
            monkeypatch.undo()

    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "store_unavailable")
    sandbox.state.clear_requests()
    seen = refreshes_seen(broker)
    eventually(lambda: refreshes_seen(broker) >= seen + 2, what="two refreshes")
    unknown = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "tenant_unknown")
    assert list(sandbox.state.requests) == []  # the key is never sent again
    assert "stopped using this tenant's key" in refused.json()["error"]["message"]
    assert "Retry DELETE /v1/tenants/acme" in refused.json()["error"]["message"]
    shown = admin.get("/v1/tenants/acme")
    assert (shown.status_code, shown.json()["error"]["code"]) == (404, "tenant_unknown")
    if failure == "tombstone_breaks":  # the store still holds the record: say why it is hidden
        assert "being disconnected" in shown.json()["error"]["message"]

    # Connecting the tenant again works at once (it was 409 store_conflict, "retry", forever).
    second = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED_SCOPES)
    assert admin.put("/v1/tenants/acme/key", json={"api_key": second.api_key}).status_code == 200
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=tenant).status_code == 200
    assert sandbox.state.requests[-1].key_id == second.key_id
    assert admin.get("/v1/tenants/acme").json()["state"] == "active"
    readable = [n for n, live in versions_of(root, path).items() if live]
    assert len(readable) == 1
    assert read_version(root, path, readable[0])["api_key"] == second.api_key  # type: ignore[index]
