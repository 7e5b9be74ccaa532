"""The admin API's connect-session routes, in process: create, list, revoke, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from support.inprocess import PLEO_URL, FakePleo, MemoryStore
from support.servers import REQUIRED_SCOPES, broker_settings

from broker.admin import create_admin_app
from broker.runtime import open_broker

PUBLIC = "https://connect.example.com"


async def _admin(
    store: MemoryStore, pleo: FakePleo, tmp_path: Path, **overrides: object
) -> AsyncIterator[httpx.AsyncClient]:
    settings = broker_settings(
        PLEO_URL, tmp_path / "unused", required_scopes=REQUIRED_SCOPES, **overrides
    )
    async with open_broker(settings, store=store, pleo_transport=pleo.transport()) as broker:
        assert settings.admin_token is not None
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(broker)),
            base_url="http://admin.test",
            headers={"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"},
        ) as client:
            yield client


@pytest.fixture
async def admin(
    memory_store: MemoryStore, fake_pleo: FakePleo, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _admin(
        memory_store,
        fake_pleo,
        tmp_path,
        connect_public_url=PUBLIC,
        connect_return_origins="https://app.example.com",
    ):
        yield client


async def test_create_list_and_revoke_a_link(
    admin: httpx.AsyncClient, memory_store: MemoryStore
) -> None:
    made = await admin.post(
        "/v1/tenants/acme/connect-sessions",
        json={"ttl_seconds": 600, "return_url": "https://app.example.com/done"},
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert set(body) == {"id", "tenant", "url", "expires_at"}
    assert body["tenant"] == "acme" and body["url"].startswith(PUBLIC + "/connect/")
    token = body["url"].rsplit("/", 1)[1]

    listed = (await admin.get("/v1/tenants/acme/connect-sessions")).json()["sessions"]
    assert [s["id"] for s in listed] == [body["id"]]
    assert listed[0]["return_url"] == "https://app.example.com/done"
    assert listed[0]["attempts"] == 0 and listed[0]["allow_company_change"] is False
    assert token not in str(listed)
    assert all(token not in repr(s) for s in memory_store.shared.sessions.values())

    assert (await admin.delete(f"/v1/connect-sessions/{body['id']}")).status_code == 204
    again = await admin.delete(f"/v1/connect-sessions/{body['id']}")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "connect_session_unknown"
    assert (await admin.get("/v1/tenants/acme/connect-sessions")).json() == {"sessions": []}


async def test_an_empty_body_asks_for_the_defaults(admin: httpx.AsyncClient) -> None:
    made = await admin.post("/v1/tenants/new-co/connect-sessions")
    assert made.status_code == 201, made.text


@pytest.mark.parametrize(
    "body",
    [
        {"ttl_seconds": 30},
        {"ttl_seconds": "600"},
        {"return_url": "https://elsewhere.example.com/"},
        {"allow_company_change": "yes"},
        {"surprise": 1},
    ],
)
async def test_a_bad_link_request_is_request_invalid(
    admin: httpx.AsyncClient, body: dict[str, object]
) -> None:
    refused = await admin.post("/v1/tenants/acme/connect-sessions", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "request_invalid"


async def test_a_malformed_tenant_is_refused(admin: httpx.AsyncClient) -> None:
    refused = await admin.post("/v1/tenants/No_Such!/connect-sessions")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "tenant_invalid"


async def test_links_need_the_admin_token(admin: httpx.AsyncClient) -> None:
    bare = await admin.post(
        "/v1/tenants/acme/connect-sessions", headers={"Authorization": "Bearer nope"}
    )
    assert bare.status_code == 401


async def test_without_a_public_url_links_are_refused_plainly(
    memory_store: MemoryStore, fake_pleo: FakePleo, tmp_path: Path
) -> None:
    async for admin in _admin(memory_store, fake_pleo, tmp_path):
        refused = await admin.post("/v1/tenants/acme/connect-sessions")
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "connect_disabled"
        assert "BROKER_CONNECT_PUBLIC_URL" in error["message"]
