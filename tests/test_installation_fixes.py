"""Defects a review found in the installation sync (issue 16): a lost sync write, a key Pleo
rejects on the installation calls, a disconnect on a stale key, a sync racing a disconnect."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
import respx
from support.inprocess import MemoryStore
from support.servers import REQUIRED_SCOPES

from broker import errors
from broker.metrics import Metrics
from broker.pleo import PleoClient
from broker.records import ApiKey, BrokenReason, TenantState
from broker.rules import Requirements
from broker.tenants import TenantService

BASE = "https://pleo.test"
ME = f"{BASE}/v1/installations/me"
COMPANY = "7b2c1a52-7b9f-4c1e-9a65-3f0d2b8c75ab"


def _key() -> ApiKey:
    return ApiKey("pik_" + secrets.token_hex(16))


def _installation(status: str, **metadata: object) -> dict[str, object]:
    return {
        "id": "0b3f0c52-0f1e-4d7e-9f36-3c9a5c1d2e4f",
        "resource": f"urn:pleo:company:{COMPANY}",
        "status": status,
        "metadata": metadata,
    }


def _pleo_accepts_keys() -> None:
    introspection = {
        "authMethod": "API_KEY",
        "scope": " ".join(REQUIRED_SCOPES),
        "subjectURN": f"urn:pleo:company:{COMPANY}",
    }
    respx.get(f"{BASE}/v1/introspect").respond(200, json={"data": introspection})


@pytest.fixture
async def client() -> AsyncIterator[PleoClient]:
    pleo = PleoClient(BASE)
    yield pleo
    await pleo.aclose()


async def _service(client: PleoClient, store: MemoryStore | None = None) -> TenantService:
    service = TenantService(
        store or MemoryStore(), client, Metrics(), requirements=Requirements(REQUIRED_SCOPES)
    )
    assert await service.registry.refresh()
    return service


def _logged(store: MemoryStore) -> list[str]:
    return [event.type for _, event in store.shared.events]


@respx.mock
async def test_a_lost_sync_write_leaves_the_sync_due_and_keeps_its_event(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(404)
    respx.post(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    store = MemoryStore()
    service = await _service(client, store)
    puts = 0

    async def the_second_write_fails(tenant: str) -> None:
        nonlocal puts
        puts += 1
        if puts == 2:
            store.down = True
            raise errors.StoreUnavailable("the store is down")

    store.before_put = the_second_write_fails
    record = await service.activate("acme", _key())

    assert record.state is TenantState.ACTIVE
    stored = store.shared.records["acme"]
    assert stored.installation_synced_at is None
    assert stored.installation_error is not None  # the first write says: not synced yet
    assert service.installation.due(stored)
    assert "tenant.installation_changed" not in _logged(store)

    store.down = False
    assert await service.registry.refresh()  # the sync's result is saved with its event

    assert store.shared.records["acme"].installation_synced_at is not None
    assert store.shared.records["acme"].installation_error is None
    assert "tenant.installation_changed" in _logged(store)


@respx.mock
async def test_a_sync_write_conflicting_with_a_check_elsewhere_is_written_again(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(404)
    respx.post(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    store = MemoryStore()
    service = await _service(client, store)
    puts = 0

    async def another_replica_checks(tenant: str) -> None:
        nonlocal puts
        puts += 1
        if puts == 2:  # another replica's check writes the tenant first
            current = store.shared.records[tenant]
            store.shared.records[tenant] = current.evolve(version=current.version + 1)

    store.before_put = another_replica_checks
    await service.activate("acme", _key())

    stored = store.shared.records["acme"]
    assert stored.installation_synced_at is not None and stored.installation_error is None
    assert "tenant.installation_changed" in _logged(store)


@respx.mock
async def test_a_sync_racing_a_disconnect_elsewhere_undoes_its_change(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    store = MemoryStore()
    service = await _service(client, store)

    def another_replica_disconnects(request: httpx.Request) -> httpx.Response:
        store.shared.records.pop("acme", None)  # B set it INACTIVE and forgot the tenant
        return httpx.Response(200, json=_installation("ACTIVATED", externalConfigurationId="a"))

    respx.get(ME).mock(
        side_effect=[
            httpx.Response(404),
            httpx.Response(200, json=_installation("ACTIVATED", externalConfigurationId="a")),
        ]
    )
    respx.post(ME).mock(side_effect=another_replica_disconnects)
    undo = respx.put(ME).respond(200, json=_installation("INACTIVE"))
    key = _key()

    await service.activate("acme", key)

    assert undo.called
    assert json.loads(undo.calls.last.request.content)["status"] == "INACTIVE"
    assert undo.calls.last.request.headers["authorization"] == key.basic_auth()
    assert "acme" not in store.shared.records


@pytest.mark.parametrize("status", [401, 403])
@respx.mock
async def test_an_uninstall_pleo_refuses_the_key_for_is_refused_clearly(
    client: PleoClient, status: int
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    respx.delete(ME).respond(status, json={"type": "UNAUTHORIZED"})
    service = await _service(client)
    await service.activate("acme", _key())

    with pytest.raises(errors.TenantNotActive) as raised:
        await service.disconnect("acme", uninstall=True)

    assert raised.value.status == 424
    assert "Settings → Integrations" in raised.value.message
    assert "without uninstall" in raised.value.message
    assert (await service.fetch("acme")).state is TenantState.BROKEN


@respx.mock
async def test_an_uninstall_of_a_broken_tenant_is_refused_without_calling_pleo(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    delete = respx.delete(ME).respond(204)
    service = await _service(client)
    record = await service.activate("acme", _key())
    await service.key_rejected(record)

    with pytest.raises(errors.TenantNotActive) as raised:
        await service.disconnect("acme", uninstall=True)

    assert "no longer works in Pleo" in raised.value.message
    assert not delete.called
    await service.disconnect("acme")  # without uninstall it goes on
    assert not delete.called


@respx.mock
async def test_a_disconnect_uses_the_key_in_the_store_not_a_stale_one(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    delete = respx.delete(ME).respond(204)
    store = MemoryStore()
    replica_a = await _service(client, store)
    replica_b = await _service(client, store.replica())
    await replica_a.activate("acme", _key())
    assert await replica_b.registry.refresh()
    rotated = _key()
    await replica_a.activate("acme", rotated)  # B's memory still holds the old key

    await replica_b.disconnect("acme", uninstall=True)

    assert delete.calls.last.request.headers["authorization"] == rotated.basic_auth()


@respx.mock
async def test_a_401_on_the_admin_transition_breaks_the_tenant(client: PleoClient) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    respx.put(ME).respond(401, json={"type": "UNAUTHORIZED"})
    service = await _service(client)
    await service.activate("acme", _key())

    with pytest.raises(errors.TenantNotActive) as raised:
        await service.installation.set_status("acme", "PENDING_INTEGRATION", None)

    assert raised.value.status == 424
    record = await service.fetch("acme")
    assert record.state is TenantState.BROKEN and record.reason is BrokenReason.KEY_REJECTED
    with pytest.raises(errors.TenantNotActive):
        service.registry.active("acme")  # the proxy stops using the key


@respx.mock
async def test_a_refused_admin_transition_says_metadata_must_be_sent_again(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    respx.put(ME).respond(503)
    service = await _service(client)
    await service.activate("acme", _key())

    with pytest.raises(errors.PleoUnavailable) as raised:
        await service.installation.set_status("acme", "PENDING_INTEGRATION", {"erp": "x"})

    assert "metadata" in raised.value.message and "again" in raised.value.message


async def _failed_sync(
    client: PleoClient, answer: httpx.Response, now: list[float] | None = None
) -> tuple[TenantService, respx.Route]:
    """An active tenant whose first sync got `answer` to its POST, and the POST route."""
    _pleo_accepts_keys()
    respx.get(ME).respond(404)
    post = respx.post(ME).mock(return_value=answer)
    service = await _service(client)
    if now is not None:
        service.installation.clock = lambda: now[0]
    record = await service.activate("acme", _key())
    assert record.installation_error is not None and post.call_count == 1
    return service, post


@respx.mock
async def test_a_permanent_4xx_is_not_retried_until_the_next_admin_put(
    client: PleoClient,
) -> None:
    service, post = await _failed_sync(client, httpx.Response(400, json={"type": "BAD"}))

    await service.check("acme", actor="health_check")
    await service.check("acme")

    assert post.call_count == 1
    post.mock(return_value=httpx.Response(200, json=_installation("PENDING_INTEGRATION")))
    record = await service.installation.set_status("acme", "PENDING_INTEGRATION", None)
    assert post.call_count == 2 and record.installation_error is None


@respx.mock
async def test_a_429_on_the_installation_holds_retries_back_for_its_retry_after(
    client: PleoClient,
) -> None:
    now = [1000.0]
    answer = httpx.Response(429, headers={"Retry-After": "120"})
    service, post = await _failed_sync(client, answer, now)

    await service.check("acme", actor="health_check")
    now[0] += 119
    await service.check("acme")
    assert post.call_count == 1

    now[0] += 2
    await service.check("acme", actor="health_check")
    assert post.call_count == 2


@respx.mock
async def test_a_403_recheck_on_the_proxy_path_does_not_retry_the_sync(
    client: PleoClient,
) -> None:
    service, post = await _failed_sync(client, httpx.Response(500))

    await service.recheck_after_forbidden("acme", caller="erp")
    assert post.call_count == 1  # the next health check retries it, once a round

    await service.check("acme", actor="health_check")
    assert post.call_count == 2


@pytest.mark.parametrize("uninstall", [False, True])
@respx.mock
async def test_a_disconnect_waits_for_pleo_only_briefly(
    client: PleoClient, uninstall: bool
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    service = await _service(client)
    await service.activate("acme", _key())
    never = asyncio.Event()

    async def pleo_hangs(request: httpx.Request) -> httpx.Response:
        await never.wait()
        raise AssertionError("not reached")

    respx.get(ME).mock(side_effect=pleo_hangs)
    respx.delete(ME).mock(side_effect=pleo_hangs)
    service.installation.disconnect_timeout = 0.01

    if uninstall:
        with pytest.raises(errors.PleoUnavailable) as raised:
            await service.disconnect("acme", uninstall=True)
        assert "did not answer" in raised.value.message
        assert service.registry.get("acme") is not None  # still connected: retry
    else:
        await service.disconnect("acme")  # the installation left as it was, logged
        assert service.registry.get("acme") is None


@respx.mock
async def test_a_disconnect_with_the_store_down_uses_the_key_in_memory(
    client: PleoClient,
) -> None:
    _pleo_accepts_keys()
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    inactive = respx.put(ME).respond(200, json=_installation("INACTIVE"))
    store = MemoryStore()
    service = await _service(client, store)
    key = _key()
    await service.activate("acme", key)
    store.down = True

    with pytest.raises(errors.StoreUnavailable):
        await service.disconnect("acme")

    assert inactive.calls.last.request.headers["authorization"] == key.basic_auth()
