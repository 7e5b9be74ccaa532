"""No key in any log line, response (other than key_hint), metric or error text."""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox
from support.webhook_receiver import Receiver, wait_until

from broker.events import LOGGER_NAME, JsonFormatter

REQUIRED = ["export-jobs:read", "export-jobs:write"]


def events_as_stored(database: Path) -> str:
    """Every event the local store keeps, as it keeps them (the outbox rows, in clear)."""
    with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT * FROM events").fetchall()
    assert rows
    return repr(rows)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    logger.removeHandler(handler)
    root.removeHandler(handler)
    logger.setLevel(old_level)


def test_whole_lifecycle_leaks_no_key(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    receiver: Receiver,
    captured_logs: io.StringIO,
) -> None:
    # Webhooks on (the first attempts fail, so retries are logged too), with reconnect links.
    receiver.fail_first(2)
    broker = make_broker(
        webhook_url=receiver.url,
        webhook_secret=receiver.secret,
        webhook_retry_schedule="0.1s,0.1s,0.1s,0.1s",
        connect_public_url="https://connect.example.com",
        connect_port=0,
    )
    keys: list[str] = []
    seen: list[str] = []
    admin = httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False)
    proxy = httpx.Client(
        base_url=broker.proxy_url, headers={"X-Broker-Tenant": "acme"}, trust_env=False
    )

    def record(response: httpx.Response) -> httpx.Response:
        seen.append(response.text)
        seen.append(str(response.headers))
        return response

    first = sandbox.state.create_key(scopes=REQUIRED)
    keys.append(first.api_key)
    record(admin.put("/v1/tenants/acme/key", json={"api_key": first.api_key}))
    wrong = "pik_" + secrets.token_hex(20)
    keys.append(wrong)
    record(admin.put("/v1/tenants/acme/key", json={"api_key": wrong}))
    record(admin.put("/v1/tenants/fresh/key", json={"api_key": wrong}))
    foreign = sandbox.state.create_key(scopes=REQUIRED)
    keys.append(foreign.api_key)
    record(admin.put("/v1/tenants/acme/key", json={"api_key": foreign.api_key}))
    record(proxy.get("/v3/export-jobs"))
    record(proxy.get("/v3/export-jobs", params={"company_id": foreign.company_id}))
    record(proxy.get("/v1/vendors/abc"))
    rotated = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    keys.append(rotated.api_key)
    record(admin.put("/v1/tenants/acme/key", json={"api_key": rotated.api_key}))
    sandbox.state.revoke(rotated.key_id)
    record(proxy.get("/v3/export-jobs"))  # 401 upstream → broken
    wait_until(
        lambda: [
            e
            for e in receiver.delivered()
            if e["type"] == "tenant.broken" and "reconnect_url" in e["data"]
        ],
        within=10,
        what="the tenant.broken webhook with its reconnect link",
    )
    record(admin.post("/v1/tenants/acme/check"))
    sandbox.state.add_fault("/v1/introspect", "status", status=503)
    record(admin.post("/v1/tenants/acme/check"))
    sandbox.state.clear_faults()
    fresh = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    keys.append(fresh.api_key)
    record(admin.put("/v1/tenants/acme/key", json={"api_key": fresh.api_key}))
    record(admin.get("/v1/tenants"))
    record(admin.get("/metrics"))
    record(admin.delete("/v1/tenants/acme"))
    feed = record(admin.get("/v1/events", params={"limit": "1000"})).json()["events"]
    assert {"tenant.activated", "tenant.key_rotated", "tenant.broken", "tenant.disconnected"} <= {
        event["type"] for event in feed
    }
    wait_until(
        lambda: {e["id"] for e in receiver.delivered()} >= {e["id"] for e in feed},
        within=20,
        what="every event delivered as a webhook",
    )
    for item in receiver.requests():
        seen.append(item.body.decode())
        seen.append(repr(item.headers))
    record(admin.get("/metrics"))
    seen.append(events_as_stored(broker.settings.store_path / "tenants.db"))
    admin.close()
    proxy.close()

    logs = captured_logs.getvalue()
    assert "tenant.activated" in logs
    assert "tenant.key_rotated" in logs
    assert "tenant.activation_failed" in logs
    assert "tenant.broken" in logs
    assert "tenant.disconnected" in logs
    everything = logs + "\n".join(seen)
    secret = receiver.secret
    assert secret not in everything and secret.removeprefix("whsec_") not in everything
    for key in keys:
        assert key not in everything
        assert key[:-4] not in everything  # not even most of it
    # Sandbox request log records no key text either.
    assert all(k not in repr(sandbox.state.requests) for k in keys)
