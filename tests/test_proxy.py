"""The data plane end to end over 127.0.0.1: the real broker against the real sandbox,
and against a recording upstream for what the sandbox cannot show (DESIGN §3, §4)."""

from __future__ import annotations

import builtins
import concurrent.futures
import json
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.inprocess import FakePleo
from support.servers import RunningBroker, RunningSandbox, broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

from broker import errors
from broker.records import TenantRecord
from broker.sandbox import ALL_SCOPES

REQUIRED = ["export-jobs:read", "export-jobs:write"]
TENANT = {"X-Broker-Tenant": "acme"}


def connect(broker: RunningBroker, tenant: str, api_key: str) -> dict[str, Any]:
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/{tenant}/key",
        headers=broker.auth,
        json={"api_key": api_key},
    )
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def code_of(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.fixture
def acme(broker: RunningBroker, sandbox: RunningSandbox) -> Any:
    scopes = [s for s in ALL_SCOPES if not s.startswith("accounts:")]
    key = sandbox.state.create_key(scopes=scopes)
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    return key


# -- forwarding -----------------------------------------------------------------------------


def test_get_injects_exactly_the_tenants_key(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    response = proxy.get(
        "/v3/export-jobs",
        headers={
            **TENANT,
            "Authorization": "Basic c3RvbGVuOg==",
            "Proxy-Authorization": "Basic eDp5",
            "Cookie": "session=1",
            "X-Request-Id": "req-123",
        },
    )
    assert response.status_code == 200
    assert response.json()["data"] == []
    assert response.headers["x-request-id"] == "req-123"
    (seen,) = sandbox.state.requests
    assert seen.authorization_count == 1
    assert seen.authorization_matched
    assert seen.key_id == acme.key_id
    assert seen.header_values("x-broker-tenant") == []
    assert seen.header_values("cookie") == []
    assert seen.header_values("proxy-authorization") == []
    assert seen.header_values("x-request-id") == ["req-123"]
    assert f"company_id={acme.company_id}" in seen.query  # filled in by the broker


def test_request_id_is_created_when_missing(proxy: httpx.Client, acme: Any) -> None:
    response = proxy.get("/v3/export-jobs", headers=TENANT)
    assert len(response.headers["x-request-id"]) == 32


def test_post_json_body_gets_the_company_filled_in(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    body = {"accountingEntryIds": [str(uuid.uuid4())]}
    response = proxy.post("/v3/export-jobs", headers=TENANT, json=body)
    assert response.status_code in (200, 201), response.text
    job = response.json()["data"]
    assert job["companyId"] == acme.company_id
    job_response = proxy.get(f"/v3/export-jobs/{job['id']}", headers=TENANT)
    assert job_response.status_code == 200


def test_tenant_header_name_is_case_insensitive(proxy: httpx.Client, acme: Any) -> None:
    assert proxy.get("/v3/export-jobs", headers={"x-BROKER-tenant": "acme"}).status_code == 200


def test_vendor_search_with_required_company_query(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    response = proxy.post("/v1/vendors:search", headers=TENANT, json={})
    assert response.status_code == 200, response.text
    assert f"company_id={acme.company_id}" in sandbox.state.requests[-1].query


# -- every refusal of DESIGN §4, by a real request --------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "tenant_missing"),
        ({"X-Broker-Tenant": "Not Valid"}, "tenant_invalid"),
        ({"X-Broker-Tenant": ""}, "tenant_invalid"),
        ({"X-Broker-Tenant": "ghost"}, "tenant_unknown"),
    ],
)
def test_tenant_header_refusals(
    proxy: httpx.Client, acme: Any, headers: dict[str, str], code: str
) -> None:
    response = proxy.get("/v3/export-jobs", headers=headers)
    assert code_of(response) == code
    assert response.status_code == {"tenant_unknown": 404}.get(code, 400)
    assert response.headers["x-request-id"]


def test_tenant_header_twice_or_with_underscores(broker: RunningBroker, acme: Any) -> None:
    twice = _raw_request(
        broker,
        b"GET /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        b"X-Broker-Tenant: other\r\nConnection: close\r\n\r\n",
    )
    assert twice.startswith(b"HTTP/1.1 400") and b"tenant_invalid" in twice
    lookalike = _raw_request(
        broker,
        b"GET /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        b"X_Broker_Tenant: other\r\nConnection: close\r\n\r\n",
    )
    assert lookalike.startswith(b"HTTP/1.1 400") and b"tenant_invalid" in lookalike


@pytest.mark.parametrize(
    "target",
    [
        b"/v3/../v1/companies",
        b"/v3/export-jobs/%2e%2e/x",
        b"/v3%2fexport-jobs",
        b"//v3/export-jobs",
        b"/v3/export-jobs/./abc",
        b"http://evil.example/v3/export-jobs",
        b"/v9/not-a-route",
        b"/v1/introspect/extra",
    ],
)
def test_non_canonical_or_unknown_targets(
    broker: RunningBroker, sandbox: RunningSandbox, acme: Any, target: bytes
) -> None:
    answer = _raw_request(
        broker,
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"route_not_allowed" in answer
    assert all(r.path != target.decode() for r in sandbox.state.requests)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
def test_trace_and_connect_are_refused(broker: RunningBroker, acme: Any, method: str) -> None:
    target = b"pleo.io:443" if method == "CONNECT" else b"/v3/export-jobs"
    answer = _raw_request(
        broker,
        method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Broker-Tenant: acme\r\nConnection: close\r\n\r\n",
    )
    assert b"403" in answer.split(b"\r\n")[0] or b"400" in answer.split(b"\r\n")[0]
    assert b"HTTP/1.1 200" not in answer


def test_scope_not_granted(proxy: httpx.Client, sandbox: RunningSandbox, acme: Any) -> None:
    response = proxy.get("/v1-beta/accounts/abc", headers=TENANT)
    assert response.status_code == 403
    response = proxy.post("/v1/chart-of-accounts:search", headers=TENANT, json={})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "scope_not_granted"
    assert error["required_scope"] == "accounts:read"
    assert error["tenant"] == "acme"
    assert len(sandbox.state.requests) == 0


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/v3/export-jobs", {"params": {"company_id": str(uuid.uuid4())}}),
        ("GET", "/v2/employees", {"params": {"companyId": str(uuid.uuid4())}}),
        ("GET", "/v0/tag-groups", {"params": {"organization_id": str(uuid.uuid4())}}),
        ("GET", f"/v1/companies/{uuid.uuid4()}", {}),
        (
            "POST",
            "/v3/export-jobs",
            {"json": {"companyId": str(uuid.uuid4()), "accountingEntryIds": []}},
        ),
    ],
)
def test_company_mismatch(
    proxy: httpx.Client,
    sandbox: RunningSandbox,
    acme: Any,
    method: str,
    path: str,
    kwargs: dict[str, Any],
) -> None:
    response = proxy.request(method, path, headers=TENANT, **kwargs)
    assert response.status_code == 403
    assert code_of(response) == "company_mismatch"
    assert len(sandbox.state.requests) == 0


def test_own_company_in_path_is_allowed(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker()
    key = sandbox.state.create_key(scopes=[*REQUIRED, "companies:read"])
    connect(broker, "acme", key.api_key)
    response = httpx.get(f"{broker.proxy_url}/v1/companies/{key.company_id}", headers=TENANT)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["id"] == key.company_id


def test_body_invalid_and_too_large(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(max_inspected_body=2048)
    key = sandbox.state.create_key(scopes=REQUIRED)
    connect(broker, "acme", key.api_key)
    url = f"{broker.proxy_url}/v3/export-jobs"
    bad = httpx.post(url, headers={**TENANT, "Content-Type": "application/json"}, content=b"{nope")
    assert (bad.status_code, code_of(bad)) == (400, "body_invalid")
    big = httpx.post(url, headers=TENANT, json={"companyId": key.company_id, "pad": "x" * 5000})
    assert (big.status_code, code_of(big)) == (413, "body_too_large")

    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    chunked = httpx.post(url, headers=TENANT, content=chunks())
    assert (chunked.status_code, code_of(chunked)) == (413, "body_too_large")


def test_pending_tenant_is_not_active(
    broker: RunningBroker, proxy: httpx.Client, sandbox: RunningSandbox
) -> None:
    httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": "pik_" + secrets.token_hex(20)},
    )
    sandbox.state.clear_requests()
    response = proxy.get("/v3/export-jobs", headers=TENANT)
    assert response.status_code == 424
    error = response.json()["error"]
    assert (error["code"], error["state"], error["reason"]) == (
        "tenant_not_active",
        "pending",
        None,
    )
    assert error["since"]
    assert len(sandbox.state.requests) == 0


# -- the same refusals in process (httpx.ASGITransport): nothing is sent upstream -------------


@pytest.fixture
async def inprocess_acme(inprocess_admin: httpx.AsyncClient, fake_pleo: FakePleo) -> None:
    """Tenant `acme` connected with a key that may export but not read accounts."""
    key = fake_pleo.add_key(scopes=tuple(REQUIRED))
    answer = await inprocess_admin.put("/v1/tenants/acme/key", json={"api_key": key.reveal()})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("headers", "code", "status"),
    [
        ({}, "tenant_missing", 400),
        ({"X-Broker-Tenant": "Not Valid"}, "tenant_invalid", 400),
        ({"X-Broker-Tenant": "ghost"}, "tenant_unknown", 404),
    ],
)
async def test_tenant_header_refusals_in_process(
    inprocess_proxy: httpx.AsyncClient,
    inprocess_acme: None,
    headers: dict[str, str],
    code: str,
    status: int,
) -> None:
    response = await inprocess_proxy.get("/v3/export-jobs", headers=headers)
    assert (response.status_code, code_of(response)) == (status, code)
    assert response.headers["x-request-id"]


async def test_route_and_scope_refusals_in_process(
    inprocess_proxy: httpx.AsyncClient, inprocess_acme: None
) -> None:
    unknown = await inprocess_proxy.get("/v9/not-a-route", headers=TENANT)
    assert (unknown.status_code, code_of(unknown)) == (403, "route_not_allowed")
    accounts = await inprocess_proxy.post("/v1/chart-of-accounts:search", headers=TENANT, json={})
    error = accounts.json()["error"]
    assert (accounts.status_code, error["code"], error["required_scope"], error["tenant"]) == (
        403,
        "scope_not_granted",
        "accounts:read",
        "acme",
    )


async def test_a_pending_tenant_is_not_active_in_process(
    inprocess_admin: httpx.AsyncClient, inprocess_proxy: httpx.AsyncClient, fake_pleo: FakePleo
) -> None:
    refused = await inprocess_admin.put(
        "/v1/tenants/acme/key", json={"api_key": "pik_" + secrets.token_hex(20)}
    )
    assert code_of(refused) == "key_invalid"
    response = await inprocess_proxy.get("/v3/export-jobs", headers=TENANT)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["state"]) == (
        424,
        "tenant_not_active",
        "pending",
    )
    assert fake_pleo.calls["/v1/introspect"] == 1  # the activation's, none from the proxy


# -- failure detection --------------------------------------------------------------------------


def test_revoked_key_breaks_the_tenant_and_stops_calls(
    broker: RunningBroker, proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    sandbox.state.revoke(acme.key_id)
    first = proxy.get("/v3/export-jobs", headers=TENANT)
    assert first.status_code == 424
    error = first.json()["error"]
    assert (error["state"], error["reason"]) == ("broken", "key_rejected")
    reached = len(sandbox.state.requests)
    for _ in range(3):
        assert proxy.get("/v3/export-jobs", headers=TENANT).status_code == 424
    assert len(sandbox.state.requests) == reached  # never reached the sandbox again
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert (view["state"], view["reason"]) == ("broken", "key_rejected")
    metrics = httpx.get(f"{broker.admin_url}/metrics").text
    assert 'broker_tenant_transitions_total{reason="key_rejected",to_state="broken"} 1.0' in metrics


def test_scope_removed_plus_403_is_permission_lost(
    broker: RunningBroker, proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    sandbox.state.set_scopes(acme.key_id, ["export-jobs:write", "vendors:read"])  # read gone
    response = proxy.get("/v3/export-jobs", headers=TENANT)
    assert response.status_code == 424
    error = response.json()["error"]
    assert (error["state"], error["reason"]) == ("broken", "permission_lost")
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert view["missing_scopes"] == ["export-jobs:read"]


def test_resource_level_403_passes_through_and_tenant_stays_active(
    broker: RunningBroker, proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    # vendors:read is not a required scope: losing it is a 403 about this request only.
    sandbox.state.set_scopes(acme.key_id, [*REQUIRED, "users:read"])
    response = proxy.post("/v1/vendors:search", headers=TENANT, json={})
    assert response.status_code == 403
    assert "type" in response.json()  # Pleo's own error body, passed through
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert view["state"] == "active"
    assert "vendors:read" not in view["scopes"]
    # The broker now knows the scope is gone and refuses locally.
    again = proxy.post("/v1/vendors:search", headers=TENANT, json={})
    assert code_of(again) == "scope_not_granted"


def test_concurrent_403s_share_one_reintrospection(
    broker: RunningBroker, sandbox: RunningSandbox, acme: Any
) -> None:
    sandbox.state.set_scopes(acme.key_id, [*REQUIRED, "users:read"])
    sandbox.state.add_fault("/v1/introspect", "latency", latency_ms=400)

    def call(_: int) -> int:
        return httpx.post(
            f"{broker.proxy_url}/v1/vendors:search", headers=TENANT, json={}, timeout=10
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(16)))
    assert set(statuses) <= {403}
    introspections = [r for r in sandbox.state.requests if r.path == "/v1/introspect"]
    assert 1 <= len(introspections) <= 2  # one per wave of 403s, not one per request


# -- upstream errors ------------------------------------------------------------------------------


def test_upstream_timeout(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(upstream_timeout=0.3)
    key = sandbox.state.create_key(scopes=REQUIRED)
    connect(broker, "acme", key.api_key)
    sandbox.state.add_fault("/v3/", "latency", latency_ms=1500, times=1)
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT, timeout=10)
    assert (response.status_code, code_of(response)) == (504, "upstream_timeout")


def test_upstream_dropping_the_connection_is_unreachable(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    sandbox.state.add_fault("/v3/", "drop", times=3)
    response = proxy.get("/v3/export-jobs", headers=TENANT)
    assert (response.status_code, code_of(response)) == (502, "upstream_unreachable")


def test_upstream_refusing_connections_is_unreachable(broker: RunningBroker, acme: Any) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    settings = broker.settings.model_copy(
        update={"pleo_base_url": f"http://127.0.0.1:{port}", "proxy_port": 0, "admin_port": 0}
    )
    other = start_broker(settings)  # same store: knows acme, but Pleo is gone
    try:
        response = httpx.get(f"{other.proxy_url}/v3/export-jobs", headers=TENANT, timeout=10)
        assert (response.status_code, code_of(response)) == (502, "upstream_unreachable")
    finally:
        other.thread.stop()


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_pass_through(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any, status: int
) -> None:
    sandbox.state.add_fault("/v3/", "status", status=status, retry_after=7, times=1)
    response = proxy.get("/v3/export-jobs", headers=TENANT)
    assert response.status_code == status
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"]


class FailingStore:
    backend = "failing"

    async def get(self, tenant: str) -> TenantRecord | None:
        raise errors.StoreUnavailable("the store is down")

    async def list(self) -> list[TenantRecord]:
        raise errors.StoreUnavailable("the store is down")

    async def put(self, record: TenantRecord, *, events: object = ()) -> TenantRecord:
        raise errors.StoreUnavailable("the store is down")

    async def delete(self, tenant: str, *, events: object = ()) -> bool:
        raise errors.StoreUnavailable("the store is down")

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        raise errors.StoreUnavailable("the store is down")

    async def close(self) -> None:
        return None


def test_store_unavailable_with_nothing_cached(
    make_broker: Callable[..., RunningBroker],
) -> None:
    broker = make_broker(store=FailingStore())
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT)
    assert (response.status_code, code_of(response)) == (503, "store_unavailable")
    ready = httpx.get(f"{broker.admin_url}/readyz")
    assert ready.status_code == 503
    activation = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key", headers=broker.auth, json={"api_key": "k" * 20}
    )
    assert (activation.status_code, code_of(activation)) == (503, "store_unavailable")


# -- against the recording upstream ----------------------------------------------------------------


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[RecordingUpstream, RunningBroker]]:
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    company = str(uuid.uuid4())
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, company, [*REQUIRED, "export-items:read"])
    broker = start_broker(broker_settings(url, tmp_path / "store", required_scopes=REQUIRED))
    try:
        connect(broker, "acme", key)
        yield upstream, broker
    finally:
        broker.thread.stop()
        thread.stop()


def test_header_hygiene_both_ways(recording: tuple[RecordingUpstream, RunningBroker]) -> None:
    upstream, broker = recording
    response = httpx.put(
        f"{broker.proxy_url}/v3/export-jobs/cookie/items",
        headers={
            **TENANT,
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Custom": "kept",
            "authorization": "Bearer stolen",
        },
        content=b"[]",
    )
    assert response.status_code == 200
    seen = upstream.seen[-1]
    names = [name for name, _ in seen.headers]
    assert names.count(b"authorization") == 1
    assert seen.values(b"authorization")[0].startswith(b"Basic ")
    for dropped in (b"x-broker-tenant", b"x-secret-hop", b"keep-alive", b"te", b"cookie"):
        assert dropped not in names
    assert seen.values(b"x-custom") == [b"kept"]
    assert "set-cookie" not in response.headers
    assert "x-upstream-hop" not in response.headers
    assert response.headers["x-upstream"] == "1"


def test_streaming_download(recording: tuple[RecordingUpstream, RunningBroker]) -> None:
    _, broker = recording
    size = 8 * 1024 * 1024 + 123
    total = 0
    with httpx.stream(
        "GET", f"{broker.proxy_url}/v3/export-items", params={"size": size}, headers=TENANT
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            total += len(chunk)
    assert total == size


def test_streaming_upload(recording: tuple[RecordingUpstream, RunningBroker]) -> None:
    _, broker = recording
    size = 8 * 1024 * 1024

    def body() -> Iterator[bytes]:
        for _ in range(size // 65536):
            yield b"z" * 65536

    response = httpx.put(
        f"{broker.proxy_url}/v3/export-jobs/upload/items",
        headers={**TENANT, "Content-Type": "application/octet-stream"},
        content=body(),
    )
    assert response.status_code == 200
    assert response.json() == {"received": size}


def test_client_disconnect_mid_response_releases_upstream(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    with httpx.stream(
        "GET", f"{broker.proxy_url}/v3/export-items", params={"endless": 1}, headers=TENANT
    ) as response:
        assert response.status_code == 200
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > 1_000_000:
                break
    # The caller hung up: the broker must stop reading and close its upstream connection.
    assert upstream.endless_closed.wait(10), "upstream stream was never closed"


def test_metrics_use_route_templates(recording: tuple[RecordingUpstream, RunningBroker]) -> None:
    _, broker = recording
    httpx.get(f"{broker.proxy_url}/v3/export-jobs/123e4567/items", headers=TENANT)
    httpx.get(f"{broker.proxy_url}/nowhere/at/all", headers=TENANT)
    text = httpx.get(f"{broker.admin_url}/metrics").text
    assert (
        'broker_proxy_requests_total{caller="anonymous",code="200",method="GET",'
        'route="/v3/export-jobs/{jobId}/items"}'
    ) in text
    assert 'route="unmatched"' in text
    assert "123e4567" not in text
    assert "acme" not in text
    assert 'broker_proxy_denials_total{reason="route_not_allowed"} 1.0' in text
    assert (
        'broker_upstream_duration_seconds_count{route="/v3/export-jobs/{jobId}/items"} 1.0' in text
    )


def _raw_request(broker: RunningBroker, request: bytes) -> bytes:
    host, port = broker.proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_401_for_a_key_replaced_mid_flight_leaves_the_tenant_active(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    url = f"{broker.proxy_url}/v3/export-jobs/slow-401/items"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.get, url, headers=TENANT, timeout=10)
        deadline = time.monotonic() + 5
        while not upstream.seen:
            assert time.monotonic() < deadline, "the slow call never reached the upstream"
            time.sleep(0.005)
        company, scopes = next(iter(upstream.keys.values()))
        fresh = "pik_" + secrets.token_hex(20)
        upstream.add_key(fresh, company, scopes)
        try:
            connect(broker, "acme", fresh)  # rotated while Pleo is answering the old key's call
        finally:
            upstream.reject.set()  # now Pleo answers that call: 401
        answer = slow.result()
    assert answer.status_code == 401  # Pleo's answer to that one call, passed through
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert (view["state"], view["key_hint"]) == ("active", "…" + fresh[-4:])
    # Without a rotation, the same answer breaks the tenant.
    broken = httpx.get(url, headers=TENANT, timeout=10)
    assert broken.status_code == 424
    assert broken.json()["error"]["reason"] == "key_rejected"


def test_upstream_dying_mid_answer_cuts_the_answer_short(
    recording: tuple[RecordingUpstream, RunningBroker], caplog: pytest.LogCaptureFixture
) -> None:
    _, broker = recording
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{broker.proxy_url}/v3/export-jobs/cut-short/items", headers=TENANT)
    # The broker logged it and keeps serving.
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT).status_code == 200
    assert any(r.getMessage() == "proxy.upstream_aborted" for r in caplog.records)


def test_upstream_cookies_are_never_replayed(tmp_path: Path) -> None:
    # A host name, not an IP address: a cookie jar may ignore cookies of IPs (aiohttp's did).
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    base = url.replace("127.0.0.1", "localhost")
    broker = start_broker(broker_settings(base, tmp_path / "store", required_scopes=REQUIRED))
    try:
        connect(broker, "acme", key)
        httpx.put(f"{broker.proxy_url}/v3/export-jobs/cookie/items", headers=TENANT, content=b"[]")
        upstream.seen.clear()
        httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT)
        (seen,) = upstream.seen
        assert seen.values(b"cookie") == []  # no cookie jar shared across tenants
    finally:
        broker.thread.stop()
        thread.stop()


def test_a_401_whose_body_never_arrives_still_breaks_the_tenant(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs/401-cut/items", headers=TENANT)
    assert response.status_code == 424
    assert response.json()["error"]["reason"] == "key_rejected"


def test_a_403_whose_body_never_arrives_is_upstream_unreachable(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs/403-cut/items", headers=TENANT)
    assert (response.status_code, code_of(response)) == (502, "upstream_unreachable")
    assert response.headers["x-request-id"]
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert view["state"] == "active"


def test_routine_403s_do_not_each_reintrospect(
    proxy: httpx.Client, sandbox: RunningSandbox, acme: Any
) -> None:
    other = sandbox.state.create_key(scopes=REQUIRED)
    job = httpx.post(
        f"{sandbox.url}/v3/export-jobs",
        auth=(other.api_key, ""),
        json={"companyId": other.company_id, "accountingEntryIds": [str(uuid.uuid4())]},
    ).json()["data"]
    sandbox.state.clear_requests()
    for _ in range(4):  # another company's job: a resource-level 403 every time
        response = proxy.get(f"/v3/export-jobs/{job['id']}", headers=TENANT)
        assert response.status_code == 403
    introspections = [r for r in sandbox.state.requests if r.path == "/v1/introspect"]
    assert len(introspections) == 1  # the first 403 checked the key; the rest trusted it


def test_unusual_methods_share_one_metric_label(broker: RunningBroker, acme: Any) -> None:
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        _raw_request(
            broker,
            f"{method} /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
    text = httpx.get(f"{broker.admin_url}/metrics").text
    assert (
        'broker_proxy_requests_total{caller="anonymous",code="403",method="OTHER",'
        'route="unmatched"} 3.0'
    ) in text
    assert "PROPFIND" not in text


# -- hardening: what an attacker and a fault-injection run found (issue 8) -------------------------


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.mark.parametrize(("change", "status", "code"), [
    ("disconnect", 404, "tenant_unknown"),
    ("rotate", 409, "tenant_changed"),
    ("break", 424, "tenant_not_active"),
])  # fmt: skip
def test_a_key_replaced_while_the_body_arrives_is_never_sent(
    recording: tuple[RecordingUpstream, RunningBroker], change: str, status: int, code: str
) -> None:
    upstream, broker = recording
    body = b'{"accountingEntryIds": []}'
    with socket.create_connection(("127.0.0.1", _port(broker.proxy_url)), timeout=10) as sock:
        sock.sendall(
            b"POST /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        # 100 Continue: the broker has admitted the request and is waiting for its body.
        assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100")
        if change == "disconnect":
            httpx.delete(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth)
        elif change == "break":
            upstream.keys.clear()  # Pleo no longer knows the key: the check breaks the tenant
            check = httpx.post(f"{broker.admin_url}/v1/tenants/acme/check", headers=broker.auth)
            assert check.json()["state"] == "broken"
        else:
            company, scopes = next(iter(upstream.keys.values()))
            fresh = "pik_" + secrets.token_hex(20)
            upstream.add_key(fresh, company, scopes)
            connect(broker, "acme", fresh)
        sock.sendall(body)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert code.encode() in answer
    assert not [seen for seen in upstream.seen if seen.raw_path == b"/v3/export-jobs"]


def test_a_body_that_takes_too_long_is_refused(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(request_body_timeout=0.3)
    key = sandbox.state.create_key(scopes=REQUIRED)
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    with socket.create_connection(("127.0.0.1", _port(broker.proxy_url)), timeout=10) as sock:
        sock.sendall(
            b"POST /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"accounting'
        )
        started = time.monotonic()
        answer = _read_all(sock)  # the broker answers and closes the connection
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"request_timeout" in answer
    assert time.monotonic() - started < 5
    assert not sandbox.state.requests


def _chunked_upload_head(path: bytes = b"/v3/export-jobs/j1/items") -> bytes:
    return (
        b"PUT " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_a_streamed_body_that_stalls_aborts_the_upstream_request(
    tmp_path: Path,
) -> None:
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    settings = broker_settings(
        url, tmp_path / "store", required_scopes=REQUIRED, request_body_timeout=0.3
    )
    broker = start_broker(settings)
    try:
        connect(broker, "acme", key)
        with socket.create_connection(("127.0.0.1", _port(broker.proxy_url)), timeout=10) as sock:
            sock.sendall(_chunked_upload_head() + b"4\r\nabcd\r\n")  # ... and nothing more
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"request_timeout" in answer
        _wait_for(lambda: bool(upstream.seen), "the upstream never saw the request")
        assert upstream.seen[-1].complete is False  # aborted, not ended as if complete
    finally:
        broker.thread.stop()
        thread.stop()


def test_a_chunked_upload_cut_short_is_aborted_upstream(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    with socket.create_connection(("127.0.0.1", _port(broker.proxy_url)), timeout=10) as sock:
        sock.sendall(_chunked_upload_head() + b"10000\r\n" + b"z" * 0x10000 + b"\r\n")
        sock.sendall(b"10000\r\n" + b"z" * 1000)  # the caller goes away mid-chunk
    _wait_for(lambda: bool(upstream.seen), "the upstream never saw the request")
    seen = upstream.seen[-1]
    assert seen.complete is False, "the upstream got a properly terminated (truncated) body"
    # The broker keeps serving.
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT).status_code == 200


def test_a_json_body_cut_short_is_never_sent(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    with socket.create_connection(("127.0.0.1", _port(broker.proxy_url)), timeout=10) as sock:
        sock.sendall(
            b"PUT /v3/export-jobs/j1/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-Broker-Tenant: acme\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n[{}, \r\n"
        )
    # The next request is the first the upstream sees.
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT).status_code == 200
    assert [seen.raw_path for seen in upstream.seen] == [b"/v3/export-jobs"]


@pytest.mark.parametrize(
    "content_types",
    [
        [b"text/plain, application/json"],
        [b"application/json, text/plain"],
        [b"application/json", b"text/plain"],
        [b"text/plain", b"application/json"],
        [b"application/json", b"application/json"],
        [b"json"],
        [b""],
    ],
)
def test_an_ambiguous_content_type_is_refused(
    recording: tuple[RecordingUpstream, RunningBroker], content_types: list[bytes]
) -> None:
    upstream, broker = recording
    body = b'{"companyId": "%s"}' % str(uuid.uuid4()).encode()
    head = b"".join(b"Content-Type: " + value + b"\r\n" for value in content_types)
    answer = _raw_request(
        broker,
        b"PUT /v3/export-jobs/j1/items HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        + head
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"content_type_invalid" in answer
    assert not upstream.seen


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "APPLICATION/JSON; charset=utf-8",
        "application/vnd.pleo+json",
        "text/json",
        'multipart/mixed; boundary="a,b"; x=application/json',
    ],
)
def test_json_bodies_are_recognised_strictly_and_checked(
    recording: tuple[RecordingUpstream, RunningBroker], content_type: str | None
) -> None:
    upstream, broker = recording
    headers = {**TENANT} | ({"Content-Type": content_type} if content_type else {})
    foreign = json.dumps({"companyId": str(uuid.uuid4())}).encode()
    response = httpx.put(
        f"{broker.proxy_url}/v3/export-jobs/j1/items", headers=headers, content=foreign
    )
    if content_type is not None and content_type.startswith("multipart/"):
        assert response.status_code == 200  # not JSON: streamed untouched, as Pleo reads it
    else:
        assert (response.status_code, code_of(response)) == (403, "company_mismatch")
        assert not upstream.seen


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v3/export-jobs", b'[{"accountingEntryIds": []}]', 400, "body_invalid"),
        ("/v3/export-jobs", b'"text"', 400, "body_invalid"),
        ("/v3/export-jobs", b"5", 400, "body_invalid"),
        ("/v3/export-jobs", b"null", 400, "body_invalid"),
        ("/v3/export-jobs/j1/items", b'[{"companyId": "%s"}]' % uuid.uuid4().hex.encode(), 403,
         "company_mismatch"),
        ("/v3/export-jobs/j1/items", b'[{}, {"organizationId": "o"}]', 403, "company_mismatch"),
        ("/v3/export-jobs", b"[" * 5000 + b"]" * 5000, 400, "body_invalid"),
        ("/v3/export-jobs", b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "body_invalid"),
        ("/v3/export-jobs/j1/items", b"[" * 5000 + b"]" * 5000, 400, "body_invalid"),
    ],
)  # fmt: skip
def test_json_bodies_that_are_not_plain_objects(
    recording: tuple[RecordingUpstream, RunningBroker],
    path: str,
    body: bytes,
    status: int,
    code: str,
) -> None:
    upstream, broker = recording
    method = "POST" if path == "/v3/export-jobs" else "PUT"
    headers = {**TENANT, "Content-Type": "application/json"}
    response = httpx.request(method, f"{broker.proxy_url}{path}", headers=headers, content=body)
    assert (response.status_code, code_of(response)) == (status, code), response.text
    assert not upstream.seen


def test_an_array_of_own_company_objects_is_forwarded(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    company, _ = next(iter(upstream.keys.values()))
    body = json.dumps([{"companyId": company}, {"name": "x"}]).encode()
    response = httpx.put(
        f"{broker.proxy_url}/v3/export-jobs/j1/items", headers=TENANT, content=body
    )
    assert response.status_code == 200
    assert upstream.seen[-1].body == body


@pytest.mark.parametrize(
    "query",
    [
        b"company_id[0]=OTHER",
        b"companyId[0]=OTHER",
        b"company_id[x]=OTHER",
        b"company_id%5B0%5D=OTHER",
        b"company_id%5b%5d=OTHER",
        b"company[id]=OTHER",
        b"company_id[0][1]=OTHER",
        b"organization_id[0]=o",
        b"organizationId%5B%5D=o",
    ],
)
def test_indexed_company_query_names_are_checked(
    recording: tuple[RecordingUpstream, RunningBroker], query: bytes
) -> None:
    upstream, broker = recording
    query = query.replace(b"OTHER", str(uuid.uuid4()).encode())
    answer = _raw_request(
        broker,
        b"GET /v3/export-jobs?" + query + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Broker-Tenant: acme\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
    assert b"company_mismatch" in answer
    assert not upstream.seen


def test_nodes_fetch_is_not_mistaken_for_a_browser(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    # Node's built-in fetch (undici) sends these on every request; a browser adds Sec-Fetch-Site.
    node = {**TENANT, "Sec-Fetch-Mode": "cors", "Accept-Language": "*", "User-Agent": "node"}
    assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=node).status_code == 200


@pytest.mark.parametrize(
    "header",
    ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method", "X-Original-Method"],
)
def test_method_override_headers_are_refused(
    recording: tuple[RecordingUpstream, RunningBroker], header: str
) -> None:
    upstream, broker = recording
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers={**TENANT, header: "DELETE"})
    assert (response.status_code, code_of(response)) == (403, "route_not_allowed")
    assert header.lower() in response.json()["error"]["message"].lower()
    assert not upstream.seen


def test_a_method_override_query_parameter_is_refused(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs?_method=DELETE", headers=TENANT)
    assert (response.status_code, code_of(response)) == (403, "route_not_allowed")
    assert not upstream.seen


def test_headers_that_reroute_the_request_upstream_are_stripped(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    rerouting = {
        "X-Original-URL": "/v1/installations/me",
        "X-Rewrite-URL": "/v1/installations/me",
        "X-Original-URI": "/v1/installations/me",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Prefix": "/admin",
        "Forwarded": "for=10.0.0.1;host=evil.example",
        "X-Real-IP": "10.0.0.1",
        "X-Host": "evil.example",
        "X-Envoy-Original-Path": "/v1/installations/me",
    }
    response = httpx.get(
        f"{broker.proxy_url}/v3/export-jobs", headers={**TENANT, **rerouting, "X-Kept": "1"}
    )
    assert response.status_code == 200
    names = {name for name, _ in upstream.seen[-1].headers}
    assert b"x-kept" in names
    assert not names & {name.lower().encode() for name in rerouting}


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1", True),
        (b"127.0.0.1:PORT", True),
        (b"localhost:PORT", True),
        (b"LOCALHOST", True),
        (b"[::1]:PORT", True),
        (b"evil.example", False),
        (b"evil.example:PORT", False),
        (b"127.0.0.1.nip.io", False),
        (b"localhost.evil.example", False),
        (b"127.0.0.1:PORT@evil.example", False),
        (None, False),
    ],
)
def test_only_the_proxys_own_host_names_are_accepted(
    recording: tuple[RecordingUpstream, RunningBroker], host: bytes | None, allowed: bool
) -> None:
    upstream, broker = recording
    port = str(_port(broker.proxy_url)).encode()
    head = b"" if host is None else b"Host: " + host.replace(b"PORT", port) + b"\r\n"
    version = b"HTTP/1.0" if host is None else b"HTTP/1.1"
    answer = _raw_request(
        broker,
        b"GET /v3/export-jobs " + version + b"\r\n" + head
        + b"X-Broker-Tenant: acme\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    if allowed:
        assert answer.split(b" ", 2)[1] == b"200", answer[:300]
    else:
        assert answer.split(b" ", 2)[1] == b"400", answer[:300]
        assert b"host_not_allowed" in answer
        assert not upstream.seen


def test_allowed_hosts_are_a_setting(tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    settings = broker_settings(
        url,
        tmp_path / "store",
        required_scopes=REQUIRED,
        proxy_allowed_hosts="broker.payments.svc, *.broker.example",
    )
    broker = start_broker(settings)
    try:
        connect(broker, "acme", key)

        def status(host: str) -> int:
            headers = {**TENANT, "Host": host}
            return httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=headers).status_code

        assert status("broker.payments.svc:8080") == 200
        assert status("a.broker.example") == 200
        assert status("broker.example") == 400
        assert status("127.0.0.1") == 400  # the list replaces the default
    finally:
        broker.thread.stop()
        thread.stop()


@pytest.mark.parametrize(
    "header",
    [
        ("Origin", "https://evil.example"),
        ("Origin", "null"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Dest", "empty"),
        ("Sec-Fetch-User", "?1"),
    ],
)
def test_browser_requests_are_refused(
    recording: tuple[RecordingUpstream, RunningBroker], header: tuple[str, str]
) -> None:
    upstream, broker = recording
    response = httpx.get(
        f"{broker.proxy_url}/v3/export-jobs", headers=dict([header, *TENANT.items()])
    )
    assert (response.status_code, code_of(response)) == (403, "browser_request_refused")
    assert not upstream.seen


def test_a_websocket_upgrade_gets_a_json_refusal(broker: RunningBroker, acme: Any) -> None:
    answer = _raw_request(
        broker,
        b"GET /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "route_not_allowed"


@pytest.mark.parametrize("upgrade", [b"h2c", b"foo"])
def test_a_protocol_upgrade_with_a_body_is_refused(
    recording: tuple[RecordingUpstream, RunningBroker], upgrade: bytes
) -> None:
    upstream, broker = recording
    answer = _raw_request(
        broker,
        b"PUT /v3/export-jobs/j1/items HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
        b"Upgrade: " + upgrade + b"\r\nConnection: Upgrade, close\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\nab",
    )
    # The listener refuses it before the app: the parser stops at an upgrade's head, so the
    # body would otherwise reach the app as none (tests/test_server_pipelining.py).
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"request_malformed" in answer
    assert not upstream.seen


def test_an_unexpected_failure_is_a_json_500(
    recording: tuple[RecordingUpstream, RunningBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, broker = recording

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr("broker.policy.Policy.locate", broken)
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT)
    assert (response.status_code, code_of(response)) == (500, "internal_error")
    assert "nobody foresaw" not in response.text
    assert response.headers["x-request-id"]


def test_a_full_connection_pool_answers_upstream_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.upstream.UPSTREAM_CONNECTIONS", 1)
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    settings = broker_settings(
        url, tmp_path / "store", required_scopes=REQUIRED, upstream_pool_timeout=0.2
    )
    broker = start_broker(settings)
    try:
        connect(broker, "acme", key)
        held = f"{broker.proxy_url}/v3/export-jobs/held/items"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.get, held, headers=TENANT, timeout=10)
            _wait_for(lambda: bool(upstream.seen), "the held call never reached the upstream")
            started = time.monotonic()
            busy = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT, timeout=10)
            assert (busy.status_code, code_of(busy)) == (503, "upstream_busy")
            assert time.monotonic() - started < 3
            upstream.release.set()
            assert first.result().status_code == 200
        assert httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers=TENANT).status_code == 200
    finally:
        upstream.release.set()
        broker.thread.stop()
        thread.stop()


# -- connections after an answer (a second read of issue 8, item 14) -----------------------------


def test_a_refused_request_whose_body_trickles_on_is_closed(
    make_broker: Callable[..., RunningBroker],
) -> None:
    # Refused before its body was read, a request may not keep its connection by sending
    # the rest of a huge body a byte at a time: it gets the header timeout to finish.
    broker = make_broker(header_timeout=1)
    with socket.create_connection(("127.0.0.1", broker.proxy_port), timeout=5) as sock:
        sock.sendall(
            b"POST /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")  # no tenant header
        sock.settimeout(0.2)
        deadline = time.monotonic() + 5
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the connection stayed open while its refused body trickled in"


def test_an_answer_slower_than_the_header_timeout_keeps_its_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The next head's clock starts with its first byte, not when the request before it ended.
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    broker = start_broker(
        broker_settings(url, tmp_path / "store", required_scopes=REQUIRED, header_timeout=0.5)
    )
    try:
        connect(broker, "acme", key)
        with httpx.Client(base_url=broker.proxy_url, headers=TENANT, timeout=10) as client:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(client.get, "/v3/export-jobs/held/items")
                _wait_for(lambda: bool(upstream.seen), "the held call never reached Pleo")
                held_since = time.monotonic()
                _wait_for(lambda: time.monotonic() - held_since > 1.0, "time to pass")
                upstream.release.set()
                answer = slow.result()
                assert answer.status_code == 200
                assert answer.headers.get("connection") != "close"
            # The same pooled connection serves the next call.
            assert client.get("/v3/export-jobs").status_code == 200
        assert "header_timeout" not in caplog.text
    finally:
        upstream.release.set()
        broker.thread.stop()
        thread.stop()
