"""Two brokers sharing one OpenBao (issue 4): coherence within the cache TTL, and outages."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from hvac.api.secrets_engines.kv_v2 import KvV2
from support.openbao_persistent import PersistentOpenBao
from support.openbao_server import _require_binary
from support.servers import RunningBroker, RunningSandbox, broker_settings, start_broker

pytestmark = pytest.mark.real  # OpenBao, killed and started again

REQUIRED = ["export-jobs:read", "export-jobs:write"]
TTL = 0.5
TENANT = {"X-Broker-Tenant": "acme"}


def eventually(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Poll `check` until it holds; returns how long that took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[PersistentOpenBao]:
    server = PersistentOpenBao(_require_binary(), tmp_path / "bao")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def replicas(
    bao: PersistentOpenBao, sandbox: RunningSandbox, tmp_path: Path
) -> Iterator[tuple[RunningBroker, RunningBroker]]:
    def settings(name: str) -> Any:
        return broker_settings(
            sandbox.url,
            tmp_path / name,
            store="vault",
            vault_addr=bao.addr,
            vault_token=bao.root_token,
            vault_prefix="replicas",
            vault_timeout=1.0,
            cache_ttl=TTL,
            required_scopes=REQUIRED,
        )

    a = start_broker(settings("a"))
    b = start_broker(settings("b"))
    try:
        yield a, b
    finally:
        a.thread.stop()
        b.thread.stop()


def put_key(broker: RunningBroker, api_key: str) -> httpx.Response:
    return httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": api_key},
        timeout=10,
    )


def readiness(broker: RunningBroker) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{broker.admin_url}/readyz").json()
    return body


def _ready_is(broker: RunningBroker, status: str) -> Callable[[], bool]:
    return lambda: readiness(broker)["status"] == status


def proxied(broker: RunningBroker) -> httpx.Response:
    return httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT, timeout=10)


def test_rotation_and_breakage_reach_the_other_replica(
    replicas: tuple[RunningBroker, RunningBroker], sandbox: RunningSandbox
) -> None:
    a, b = replicas
    first = sandbox.state.create_key(scopes=REQUIRED)
    assert put_key(a, first.api_key).status_code == 200
    eventually(lambda: proxied(b).status_code == 200, within=TTL + 2, what="b learns the tenant")

    # Rotate through a: b injects the new key within the TTL, and never the old one after.
    second = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    assert put_key(a, second.api_key).status_code == 200

    def b_uses_new_key() -> bool:
        assert proxied(b).status_code == 200
        return sandbox.state.requests[-1].key_id == second.key_id

    eventually(b_uses_new_key, within=TTL + 1.5, what="b injects the rotated key")
    for _ in range(5):
        assert proxied(b).status_code == 200
        assert sandbox.state.requests[-1].key_id == second.key_id

    # Break through a (Pleo revoked the key): b stops serving the tenant too.
    sandbox.state.revoke(second.key_id)
    assert proxied(a).status_code == 424
    sandbox.state.clear_requests()

    def b_refuses() -> bool:
        response = proxied(b)
        return response.status_code == 424 and response.json()["error"]["state"] == "broken"

    eventually(b_refuses, within=TTL + 1.5, what="b sees the tenant broken")
    reached = len(sandbox.state.requests)
    assert proxied(b).status_code == 424
    assert len(sandbox.state.requests) == reached

    # Reconnect through b: a serves again.
    third = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    assert put_key(b, third.api_key).status_code == 200
    eventually(lambda: proxied(a).status_code == 200, within=TTL + 1.5, what="a recovers")
    assert sandbox.state.requests[-1].key_id == third.key_id

    # After rotation every readable version in OpenBao holds only the newest key.
    with_history = httpx.get(f"{b.admin_url}/v1/tenants/acme", headers=b.auth, timeout=10).json()
    assert with_history["key_hint"] == "…" + third.api_key[-4:]


def test_vault_outage_keeps_known_tenants_served(
    replicas: tuple[RunningBroker, RunningBroker],
    bao: PersistentOpenBao,
    sandbox: RunningSandbox,
) -> None:
    a, b = replicas
    key = sandbox.state.create_key(scopes=REQUIRED)
    assert put_key(a, key.api_key).status_code == 200
    eventually(lambda: proxied(b).status_code == 200, within=TTL + 2, what="b learns the tenant")

    bao.kill()
    for broker in (a, b):
        eventually(
            _ready_is(broker, "degraded"),
            within=TTL + 5,
            what="readyz reports degraded",
        )
        ready = httpx.get(f"{broker.admin_url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["store"]
        for _ in range(5):
            assert proxied(broker).status_code == 200  # served from memory
    other = sandbox.state.create_key(scopes=REQUIRED)
    refused = httpx.put(
        f"{a.admin_url}/v1/tenants/newco/key",
        headers=a.auth,
        json={"api_key": other.api_key},
        timeout=10,
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"

    bao.start()  # same data, unsealed again
    for broker in (a, b):
        eventually(
            _ready_is(broker, "ok"),
            within=TTL + 5,
            what="readyz back to ok",
        )
        assert proxied(broker).status_code == 200
    assert put_key(a, key.api_key).status_code == 200  # activation works again
    joined = httpx.put(
        f"{b.admin_url}/v1/tenants/newco/key",
        headers=b.auth,
        json={"api_key": other.api_key},
        timeout=10,
    )
    assert joined.status_code == 200
    metrics = httpx.get(f"{a.admin_url}/metrics").text
    # The failed refreshes: a full list, or a read of the change journal (op="changes").
    assert re.search(
        r'broker_store_operations_total\{backend="vault",op="(list|changes)",result="error"\}',
        metrics,
    )


def test_an_interrupted_disconnect_stops_every_replica_and_the_tenant_reconnects(
    replicas: tuple[RunningBroker, RunningBroker],
    sandbox: RunningSandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    first = sandbox.state.create_key(scopes=REQUIRED)
    assert put_key(a, first.api_key).status_code == 200
    eventually(lambda: proxied(b).status_code == 200, within=TTL + 2, what="b learns the tenant")
    destroy = KvV2.destroy_secret_versions

    def destroy_then_break(self: KvV2, *args: Any, **kwargs: Any) -> Any:
        destroy(self, *args, **kwargs)
        raise requests.ConnectionError("connection reset by peer")  # before the metadata goes

    with monkeypatch.context() as patched:
        patched.setattr(KvV2, "destroy_secret_versions", destroy_then_break)
        refused = httpx.delete(f"{a.admin_url}/v1/tenants/acme", headers=a.auth, timeout=10)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "store_unavailable")

    assert proxied(a).status_code == 404  # at once here...
    eventually(
        lambda: proxied(b).status_code == 404, within=TTL + 1.5, what="b stops"
    )  # ...soon there
    sandbox.state.clear_requests()
    assert proxied(b).status_code == 404
    assert list(sandbox.state.requests) == []

    # Reconnecting through the other replica works (it was 409 store_conflict, forever).
    second = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    assert put_key(b, second.api_key).status_code == 200
    eventually(lambda: proxied(a).status_code == 200, within=TTL + 1.5, what="a serves again")
    assert sandbox.state.requests[-1].key_id == second.key_id
