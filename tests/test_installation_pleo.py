"""The installation sync against Pleo's error answers (respx): the client's calls, and a
failed sync that leaves the activation standing until a check retries it (issue 16)."""

from __future__ import annotations

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
from broker.records import ApiKey, TenantState
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
        "applicationId": "5d1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
        "resource": f"urn:pleo:company:{COMPANY}",
        "status": status,
        "metadata": metadata,
        "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z",
    }


@pytest.fixture
async def client() -> AsyncIterator[PleoClient]:
    pleo = PleoClient(BASE)
    yield pleo
    await pleo.aclose()


@respx.mock
async def test_no_installation_is_created_with_the_status_and_the_tenant(
    client: PleoClient,
) -> None:
    respx.get(ME).respond(404, json={"type": "NOT_FOUND"})
    created = respx.post(ME).respond(200, json=_installation("ACTIVATED", x="1"))
    change = await client.put_installation(_key(), "ACTIVATED", {"externalConfigurationId": "acme"})
    assert (change.previous, change.status, change.changed) == (None, "ACTIVATED", True)
    sent = json.loads(created.calls.last.request.content)
    assert sent == {"status": "ACTIVATED", "metadata": {"externalConfigurationId": "acme"}}


@respx.mock
async def test_a_pleo_that_creates_in_its_own_status_is_then_updated(client: PleoClient) -> None:
    respx.get(ME).respond(404)
    respx.post(ME).respond(200, json=_installation("PENDING_INTEGRATION"))
    updated = respx.put(ME).respond(200, json=_installation("ACTIVATED"))
    change = await client.put_installation(_key(), "ACTIVATED", {"externalConfigurationId": "a"})
    assert json.loads(updated.calls.last.request.content)["status"] == "ACTIVATED"
    assert change.status == "ACTIVATED"


@respx.mock
async def test_an_installation_in_step_is_left_alone(client: PleoClient) -> None:
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    put = respx.put(ME)
    post = respx.post(ME)
    change = await client.put_installation(_key(), "ACTIVATED", {"externalConfigurationId": "acme"})
    assert not change.changed
    assert not put.called and not post.called


@respx.mock
async def test_an_update_keeps_the_metadata_it_does_not_name(client: PleoClient) -> None:
    respx.get(ME).respond(200, json=_installation("INACTIVE", erp="books"))
    put = respx.put(ME).respond(200, json=_installation("ACTIVATED"))
    change = await client.put_installation(_key(), "ACTIVATED", {"externalConfigurationId": "a"})
    assert change.previous == "INACTIVE" and change.changed
    sent = json.loads(put.calls.last.request.content)
    assert sent["metadata"] == {"erp": "books", "externalConfigurationId": "a"}


@pytest.mark.parametrize(
    ("method", "status", "error", "words"),
    [
        ("POST", 400, errors.PleoUnexpectedAnswer, "HTTP 400 while creating the installation"),
        ("POST", 500, errors.PleoUnreachable, "HTTP 500 while creating the installation"),
        ("POST", 401, errors.PleoKeyRejected, "HTTP 401"),
        ("GET", 429, errors.PleoUnreachable, "HTTP 429 while reading the installation"),
        ("GET", 403, errors.PleoKeyRejected, "HTTP 403"),
    ],
)
@respx.mock
async def test_pleos_error_answers_are_named(
    client: PleoClient, method: str, status: int, error: type[errors.PleoError], words: str
) -> None:
    respx.get(ME).respond(404 if method == "POST" else status)
    respx.post(ME).respond(status, json={"type": "ERROR"})
    key = _key()
    with pytest.raises(error) as raised:
        await client.put_installation(key, "ACTIVATED", {"externalConfigurationId": "acme"})
    assert words in raised.value.message
    assert key.reveal() not in raised.value.message


@respx.mock
async def test_delete_answers_whether_there_was_one(client: PleoClient) -> None:
    respx.delete(ME).mock(side_effect=[httpx.Response(204), httpx.Response(404)])
    assert await client.delete_installation(_key()) is True
    assert await client.delete_installation(_key()) is False
    respx.delete(ME).respond(502)
    with pytest.raises(errors.PleoUnreachable):
        await client.delete_installation(_key())


@respx.mock
async def test_a_failed_create_leaves_the_tenant_active_and_a_check_fixes_it(
    client: PleoClient,
) -> None:
    introspection = {
        "authMethod": "API_KEY",
        "scope": " ".join(REQUIRED_SCOPES),
        "subjectURN": f"urn:pleo:company:{COMPANY}",
    }
    respx.get(f"{BASE}/v1/introspect").respond(200, json={"data": introspection})
    respx.get(ME).respond(404)
    create = respx.post(ME).respond(500, json={"type": "INTERNAL"})
    service = TenantService(
        MemoryStore(), client, Metrics(), requirements=Requirements(REQUIRED_SCOPES)
    )
    assert await service.registry.refresh()
    key = _key()

    record = await service.activate("acme", key)

    assert record.state is TenantState.ACTIVE
    assert service.registry.active("acme") is not None  # the proxy serves it
    view = record.view()["installation"]
    assert view["status"] == "ACTIVATED" and view["synced_at"] is None
    assert view["error"] == "Pleo answered HTTP 500 while creating the installation"

    create.respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    checked = await service.check("acme")

    assert checked.state is TenantState.ACTIVE
    assert checked.view()["installation"]["error"] is None
    assert checked.installation_synced_at is not None
    assert create.call_count == 2
    again = await service.check("acme")  # in step now: a check does not call again
    assert create.call_count == 2 and again.installation_error is None


@respx.mock
async def test_the_admin_transition_raises_when_pleo_refuses_and_keeps_the_error(
    client: PleoClient,
) -> None:
    introspection = {
        "authMethod": "API_KEY",
        "scope": " ".join(REQUIRED_SCOPES),
        "subjectURN": f"urn:pleo:company:{COMPANY}",
    }
    respx.get(f"{BASE}/v1/introspect").respond(200, json={"data": introspection})
    respx.get(ME).respond(200, json=_installation("ACTIVATED", externalConfigurationId="acme"))
    respx.put(ME).respond(400, json={"type": "BAD_REQUEST"})
    service = TenantService(
        MemoryStore(), client, Metrics(), requirements=Requirements(REQUIRED_SCOPES)
    )
    assert await service.registry.refresh()
    await service.activate("acme", _key())

    with pytest.raises(errors.PleoUnavailable) as raised:
        await service.installation.set_status("acme", "PENDING_INTEGRATION", None)

    assert "HTTP 400 while updating the installation" in raised.value.message
    assert "retries on the tenant's next check" in raised.value.message
    record = await service.fetch("acme")
    assert record.installation_status == "PENDING_INTEGRATION"
    assert record.installation_error is not None
    with pytest.raises(errors.RequestInvalid):
        await service.installation.set_status("acme", "DONE", None)
