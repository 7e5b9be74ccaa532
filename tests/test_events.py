"""Events and the feed (docs/contract.md, "Events"): every state change, made by a real
action over the broker's sockets, appears once in `GET /v1/events` with the right actor and
the tenant view, never a key; the feed pages, filters, refuses bad input and forgets old
events. The store side (atomicity, Vault's outbox): stores/test_event_log.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from support.inprocess import FakePleo, MemoryStore
from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox

from broker import errors
from broker.feed import MAX_LIMIT, prune_once
from broker.outbox import new_event
from broker.records import TenantState
from broker.tenants import TenantService

PUBLIC = "https://connect.example.com"
EXTRA = "export-items:read"


def feed(admin: httpx.Client, **params: str) -> list[dict[str, Any]]:
    """Every event of the feed, read page by page."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        query: dict[str, str] = {**params, "limit": "2"}
        if after:
            query["after"] = after
        answer = admin.get("/v1/events", params=query)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        if not page["events"]:
            return found
        found += page["events"]
        after = page["next"]


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(event["type"], event["actor"]) for event in events]


def put_key(admin: httpx.Client, key: str, **body: object) -> httpx.Response:
    answer = admin.put("/v1/tenants/acme/key", json={"api_key": key, **body})
    assert answer.status_code == 200, answer.text
    return answer


def test_admin_and_cli_changes_are_events_with_their_actor(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    first = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    put_key(admin, first.api_key)
    second = sandbox.state.create_key(first.company_id, scopes=REQUIRED_SCOPES)
    put_key(admin, second.api_key)
    other = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    put_key(admin, other.api_key, allow_company_change=True)
    cli = {"X-Broker-Actor": "cli"}
    sandbox.state.set_scopes(other.key_id, [*REQUIRED_SCOPES, EXTRA])
    assert admin.post("/v1/tenants/acme/check", headers=cli).status_code == 200
    sandbox.state.set_scopes(other.key_id, REQUIRED_SCOPES[:1])
    assert admin.post("/v1/tenants/acme/check").json()["state"] == "broken"
    sandbox.state.set_scopes(other.key_id, REQUIRED_SCOPES)
    assert admin.post("/v1/tenants/acme/check", headers=cli).json()["state"] == "active"
    assert admin.delete("/v1/tenants/acme", headers=cli).status_code == 204

    events = feed(admin)
    assert kinds(events) == [
        ("tenant.activated", "admin"),
        ("tenant.key_rotated", "admin"),
        ("tenant.key_rotated", "admin"),
        ("tenant.company_changed", "admin"),
        ("tenant.scopes_changed", "cli"),
        ("tenant.broken", "admin"),
        ("tenant.recovered", "cli"),
        ("tenant.scopes_changed", "cli"),
        ("tenant.disconnected", "cli"),
    ]
    assert len({event["id"] for event in events}) == len(events)
    assert events[0]["data"]["company_id"] == first.company_id
    assert events[3]["data"]["company_id"] == other.company_id
    assert events[5]["data"]["reason"] == "permission_lost"
    assert events[-1]["data"]["tenant"] == "acme"
    assert all(event["timestamp"].endswith("Z") for event in events)
    assert set(events[0]) == {"id", "type", "timestamp", "actor", "data"}
    text = json.dumps(events)
    for key in (first, second, other):
        assert key.api_key not in text


def test_a_401_on_a_proxied_call_is_a_broken_event_by_the_proxy(
    admin: httpx.Client, proxy: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    put_key(admin, key.api_key)
    sandbox.state.revoke(key.key_id)
    answer = proxy.get("/v3/export-jobs", headers={"X-Broker-Tenant": "acme"})
    assert answer.status_code == 424
    events = feed(admin, tenant="acme")
    assert kinds(events) == [("tenant.activated", "admin"), ("tenant.broken", "proxy")]
    assert events[1]["data"]["reason"] == "key_rejected"
    assert key.api_key not in json.dumps(events)


def test_a_customer_connecting_is_two_events_by_the_connect_session(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(connect_public_url=PUBLIC, connect_port=0)
    assert broker.connect_url is not None
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with (
        httpx.Client(base_url=broker.admin_url, headers=broker.auth) as admin,
        httpx.Client(base_url=broker.connect_url) as browser,
    ):
        made = admin.post("/v1/tenants/acme/connect-sessions", json={}).json()
        path = made["url"].removeprefix(PUBLIC)
        page = browser.get(path).text
        csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        done = browser.post(path, data={"api_key": key.api_key, "csrf_token": csrf})
        assert done.status_code == 200
        events = feed(admin)
    actor = f"connect_session:{made['id']}"
    assert kinds(events) == [("tenant.activated", actor), ("connect_session.completed", actor)]
    assert events[1]["data"]["state"] == "active"
    assert key.api_key not in json.dumps(events)


async def test_a_health_check_names_itself(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    key = fake_pleo.add_key()
    await tenant_service.activate("acme", key)
    fake_pleo.revoke(key)
    broken = await tenant_service.check("acme", actor="health_check")
    assert broken.state is TenantState.BROKEN
    events, _ = await memory_store.events_after(None, 10)
    assert [(e.type, e.actor) for e in events] == [
        ("tenant.activated", "admin"),
        ("tenant.broken", "health_check"),
    ]
    assert events[1].data == broken.view()


async def test_a_broken_tenant_reconnected_with_a_new_key_recovers(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    key = fake_pleo.add_key()
    active = await tenant_service.activate("acme", key)
    fake_pleo.revoke(key)
    await tenant_service.check("acme", actor="health_check")
    fresh = fake_pleo.add_key(active.company_id)  # the customer's new key, same company
    await tenant_service.activate("acme", fresh, actor="connect_session:cs_1")
    events, _ = await memory_store.events_after(None, 10)
    assert [e.type for e in events][2:] == [
        "tenant.key_rotated",
        "tenant.recovered",
        "connect_session.completed",
    ]


async def test_a_change_the_store_refuses_has_no_event(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    key = fake_pleo.add_key()
    memory_store.full = True
    with pytest.raises(errors.StoreUnavailable):
        await tenant_service.activate("acme", key)
    assert await memory_store.events_after(None, 10) == ([], None)


async def test_a_break_held_while_the_store_is_down_is_saved_with_its_event(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    active = await tenant_service.activate("acme", fake_pleo.add_key())
    memory_store.full = True
    await tenant_service.key_rejected(active)  # served broken at once, not saved yet
    assert [e.type for e in (await memory_store.events_after(None, 10))[0]] == ["tenant.activated"]
    memory_store.full = False
    assert await tenant_service.registry.refresh()  # saves the held break
    events, _ = await memory_store.events_after(None, 10)
    assert [(e.type, e.actor) for e in events][1:] == [("tenant.broken", "proxy")]
    assert (await memory_store.get("acme")).state is TenantState.BROKEN  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ({"limit": "0"}, "limit must be a whole number from 1 to"),
        ({"limit": str(MAX_LIMIT + 1)}, "limit must be a whole number from 1 to"),
        ({"limit": "ten"}, "limit must be a whole number from 1 to"),
        ({"after": "not-a-cursor"}, "after is not a cursor this feed gave out"),
        ({"limit": "²"}, "limit must be a whole number from 1 to"),  # a digit, not 0-9
        ({"after": "²"}, "after is not a cursor this feed gave out"),
        ({"after": "9" * 19}, "after is not a cursor this feed gave out"),  # past SQLite's ints
        ({"tenant": "Not A Tenant!"}, "tenant is not a valid tenant id"),
    ],
)
def test_the_feed_refuses_bad_parameters_plainly(
    admin: httpx.Client, query: dict[str, str], complaint: str
) -> None:
    answer = admin.get("/v1/events", params=query)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "request_invalid"
    assert complaint in answer.json()["error"]["message"]


def test_the_feed_needs_the_admin_token(broker: RunningBroker) -> None:
    assert httpx.get(f"{broker.admin_url}/v1/events").status_code == 401


def test_the_feed_filters_by_tenant_and_goes_on_from_next(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    for tenant in ("acme", "globex", "acme2"):
        key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
        admin.put(f"/v1/tenants/{tenant}/key", json={"api_key": key.api_key})
    assert [e["data"]["tenant"] for e in feed(admin)] == ["acme", "globex", "acme2"]
    assert [e["data"]["tenant"] for e in feed(admin, tenant="globex")] == ["globex"]
    page = admin.get("/v1/events", params={"limit": 3}).json()
    rest = admin.get("/v1/events", params={"after": page["next"]}).json()
    assert rest == {"events": [], "next": page["next"]}


def test_an_actor_other_than_the_cli_is_refused(admin: httpx.Client) -> None:
    answer = admin.delete("/v1/tenants/acme", headers={"X-Broker-Actor": "health_check"})
    assert answer.status_code == 400
    assert "X-Broker-Actor may only be 'cli'" in answer.json()["error"]["message"]


async def test_events_older_than_the_retention_are_pruned(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    record = await tenant_service.activate("acme", fake_pleo.add_key())
    old = new_event("tenant.broken", "admin", record.view(), now=datetime.now(UTC) - timedelta(31))
    memory_store.shared.log([old])
    assert await prune_once(memory_store, retention_days=30) == 1
    events, _ = await memory_store.events_after(None, 10)
    assert [e.type for e in events] == ["tenant.activated"]


async def test_a_disconnect_shows_the_tenant_as_the_store_last_had_it(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    """Connected through another replica, not yet in this one's memory: the event still
    shows the tenant as it was, not an empty view."""
    other = memory_store.replica()
    elsewhere = TenantService(other, tenant_service.pleo, tenant_service.metrics)
    record = await elsewhere.activate("acme", fake_pleo.add_key())
    await tenant_service.disconnect("acme", actor="cli")
    events, _ = await memory_store.events_after(None, 10)
    assert [(e.type, e.actor) for e in events] == [
        ("tenant.activated", "admin"),
        ("tenant.disconnected", "cli"),
    ]
    # As last seen, with its installation in Pleo as the disconnect left it (inactive).
    assert events[1].data == record.evolve(installation_status="INACTIVE").view()


async def test_a_failed_pruning_is_logged_and_the_next_one_runs(
    memory_store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    memory_store.down = True
    assert await prune_once(memory_store, retention_days=30) == 0
    memory_store.down = False

    async def broken(before: datetime) -> int:
        raise KeyError("a chunk that is not one")

    memory_store.prune_events = broken  # type: ignore[method-assign]
    assert await prune_once(memory_store, retention_days=30) == 0
    failures = [r for r in caplog.records if getattr(r, "event", "") == "events.prune_failed"]
    assert [getattr(r, "fields", {})["error"] for r in failures] == [
        "the store is down",
        "KeyError",
    ]
