"""The admin API end to end: the real broker against the real sandbox over 127.0.0.1."""

from __future__ import annotations

import builtins
import concurrent.futures
import json
import secrets
import socket
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.types import Message, Scope
from support.servers import RunningBroker, RunningSandbox

from broker.admin import create_admin_app
from broker.records import TenantRecord
from broker.runtime import Broker
from broker.sandbox import ALL_SCOPES

REQUIRED = ["export-jobs:read", "export-jobs:write"]


def put_key(admin: httpx.Client, tenant: str, api_key: str, **extra: Any) -> httpx.Response:
    return admin.put(f"/v1/tenants/{tenant}/key", json={"api_key": api_key, **extra})


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


def test_activation_binds_company_and_shows_only_a_hint(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 200
    view = response.json()
    assert view["tenant"] == "acme"
    assert view["state"] == "active"
    assert view["company_id"] == key.company_id
    assert view["key_hint"] == "…" + key.api_key[-4:]
    assert view["scopes"] == sorted(REQUIRED)
    assert view["missing_scopes"] == []
    assert view["reason"] is None
    assert set(view) == {
        "tenant",
        "state",
        "company_id",
        "key_hint",
        "scopes",
        "missing_scopes",
        "reason",
        "message",
        "activated_at",
        "updated_at",
        "installation",
        "last_checked_at",
        "client_id",
        "application_name",
    }
    assert key.api_key not in response.text
    assert admin.get("/v1/tenants/acme").json() == view


@pytest.mark.parametrize(
    ("headers", "path", "method"),
    [
        ({}, "/v1/tenants", "GET"),
        ({"Authorization": "Bearer wrong"}, "/v1/tenants", "GET"),
        ({"Authorization": "Basic d3Jvbmc6"}, "/v1/tenants/acme", "GET"),
        ({}, "/v1/tenants/acme/key", "PUT"),
        ({}, "/v1/tenants/acme/check", "POST"),
        ({}, "/v1/tenants/acme", "DELETE"),
    ],
)
def test_admin_routes_need_the_token(
    broker: RunningBroker, headers: dict[str, str], path: str, method: str
) -> None:
    response = httpx.request(method, broker.admin_url + path, headers=headers, json={})
    assert response.status_code == 401
    assert error_of(response)["code"] == "admin_unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1", 404, "not_found"),
        ("GET", "/v1/nothing", 404, "not_found"),
        ("GET", "/v1/tenants/acme/nothing", 404, "not_found"),
        ("POST", "/v1/tenants", 405, "method_not_allowed"),
        ("PATCH", "/v1/tenants/acme", 405, "method_not_allowed"),
        ("GET", "/v1/tenants/acme/key", 405, "method_not_allowed"),
    ],
)
@pytest.mark.parametrize("with_token", [False, True])
def test_a_path_or_method_no_route_takes_is_refused_alike_with_or_without_token(
    broker: RunningBroker, method: str, path: str, status: int, code: str, with_token: bool
) -> None:
    headers = broker.auth if with_token else {}
    response = httpx.request(method, broker.admin_url + path, headers=headers)
    assert response.status_code == status
    assert error_of(response)["code"] == code


def test_health_and_metrics_need_no_token(broker: RunningBroker) -> None:
    assert httpx.get(broker.admin_url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(broker.admin_url + "/readyz").json() == {"status": "ok"}
    metrics = httpx.get(broker.admin_url + "/metrics")
    assert metrics.status_code == 200
    assert "broker_tenants" in metrics.text


def test_wrong_key_is_key_invalid_and_new_tenant_stays_pending(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    response = put_key(admin, "newco", "pik_" + secrets.token_hex(20))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "key_invalid"
    assert "Settings → Integrations" in error["message"]
    view = admin.get("/v1/tenants/newco").json()
    assert view["state"] == "pending"
    assert view["key_hint"] is None
    assert view["message"] == error["message"]
    # The customer retries with a good key and the tenant activates.
    key = sandbox.state.create_key(scopes=REQUIRED)
    assert put_key(admin, "newco", key.api_key).json()["state"] == "active"


def test_failed_rotation_keeps_the_working_key(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    before = put_key(admin, "acme", key.api_key).json()
    response = put_key(admin, "acme", "pik_" + secrets.token_hex(20))
    assert error_of(response)["code"] == "key_invalid"
    after = admin.get("/v1/tenants/acme").json()
    assert after["state"] == "active"
    assert after["key_hint"] == before["key_hint"]


def test_oauth_credential_is_key_not_api_key(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED, auth_method="OAUTH2")
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 422
    assert error_of(response)["code"] == "key_not_api_key"


def test_organisation_key_is_key_not_company_scoped(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    urn = f"urn:pleo:organisation:{uuid.uuid4()}"
    key = sandbox.state.create_key(scopes=REQUIRED, subject_urn=urn)
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 422
    assert error_of(response)["code"] == "key_not_company_scoped"


def test_missing_scopes_are_listed(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key(scopes=["export-jobs:read"])
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "scopes_missing"
    assert error["missing_scopes"] == ["export-jobs:write"]
    assert "export-jobs:write" in error["message"]
    view = admin.get("/v1/tenants/acme").json()
    assert view["state"] == "pending"
    assert view["missing_scopes"] == ["export-jobs:write"]


def test_company_change_needs_consent(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    first = sandbox.state.create_key(scopes=REQUIRED)
    other = sandbox.state.create_key(scopes=REQUIRED)
    put_key(admin, "acme", first.api_key)
    response = put_key(admin, "acme", other.api_key)
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "company_changed"
    assert error["company_id"] == first.company_id
    assert admin.get("/v1/tenants/acme").json()["company_id"] == first.company_id
    response = put_key(admin, "acme", other.api_key, allow_company_change=True)
    assert response.status_code == 200
    assert response.json()["company_id"] == other.company_id


def test_one_company_one_tenant(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    first = sandbox.state.create_key(scopes=REQUIRED)
    second = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    put_key(admin, "acme", first.api_key)
    response = put_key(admin, "acme-two", second.api_key)
    assert response.status_code == 409
    assert error_of(response)["code"] == "company_in_use"
    assert error_of(response)["other_tenant"] == "acme"


@pytest.mark.parametrize("status", [500, 503])
def test_pleo_down_is_pleo_unavailable(
    admin: httpx.Client, sandbox: RunningSandbox, status: int
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    sandbox.state.add_fault("/v1/introspect", "status", status=status)
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 503
    assert error_of(response)["code"] == "pleo_unavailable"


def test_pleo_unreachable_is_pleo_unavailable(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(pleo_base_url="http://127.0.0.1:9")  # discard port: refused
    key = sandbox.state.create_key(scopes=REQUIRED)
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
    )
    assert response.status_code == 503
    assert error_of(response)["code"] == "pleo_unavailable"


def test_pleo_dropping_the_connection_is_pleo_unavailable(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    sandbox.state.add_fault("/v1/introspect", "drop")
    response = put_key(admin, "acme", key.api_key)
    assert response.status_code == 503
    assert error_of(response)["code"] == "pleo_unavailable"


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"not json", "JSON body"),
        (b'{"allow_company_change": false}', "api_key"),
        (b'{"api_key": ""}', "api_key"),
        (b'{"api_key": "   "}', "api_key"),
        (b'{"api_key": "abc\\ndef"}', "api_key"),
        (b'{"api_key": "abc", "extra": 1}', "extra"),
        (b'{"api_key": "abc", "allow_company_change": "yes"}', "allow_company_change"),
    ],
)
def test_malformed_submission_is_request_invalid(
    admin: httpx.Client, body: bytes, mentions: str
) -> None:
    response = admin.put("/v1/tenants/acme/key", content=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "request_invalid"
    assert mentions in error["message"]
    assert "abc" not in error["message"]


@pytest.mark.parametrize("tenant", ["Acme", "-acme", "a" * 64, "acme%20co", "ac$me"])
def test_malformed_tenant_id(admin: httpx.Client, tenant: str) -> None:
    response = admin.get(f"/v1/tenants/{tenant}")
    assert response.status_code == 400
    assert error_of(response)["code"] == "tenant_invalid"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tenants/ghost"),
        ("POST", "/v1/tenants/ghost/check"),
        ("DELETE", "/v1/tenants/ghost"),
    ],
)
def test_unknown_tenant(admin: httpx.Client, method: str, path: str) -> None:
    response = admin.request(method, path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "tenant_unknown"


def test_check_detects_revocation_then_reconnect_recovers(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    put_key(admin, "acme", key.api_key)
    checked = admin.post("/v1/tenants/acme/check").json()
    assert checked["state"] == "active"
    assert checked["last_checked_at"] is not None
    sandbox.state.revoke(key.key_id)
    broken = admin.post("/v1/tenants/acme/check").json()
    assert broken["state"] == "broken"
    assert broken["reason"] == "key_rejected"
    assert "reconnect" in broken["message"]
    listed = admin.get("/v1/tenants", params={"state": "broken"}).json()["tenants"]
    assert [t["tenant"] for t in listed] == ["acme"]
    fresh = sandbox.state.create_key(company_id=key.company_id, scopes=REQUIRED)
    assert put_key(admin, "acme", fresh.api_key).json()["state"] == "active"
    assert admin.get("/v1/tenants", params={"state": "broken"}).json()["tenants"] == []


def test_check_detects_lost_permission_and_recovery(
    admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=[*REQUIRED, "vendors:read"])
    put_key(admin, "acme", key.api_key)
    sandbox.state.set_scopes(key.key_id, ["export-jobs:read"])
    view = admin.post("/v1/tenants/acme/check").json()
    assert (view["state"], view["reason"]) == ("broken", "permission_lost")
    assert view["missing_scopes"] == ["export-jobs:write"]
    sandbox.state.set_scopes(key.key_id, REQUIRED)
    view = admin.post("/v1/tenants/acme/check").json()
    assert (view["state"], view["reason"]) == ("active", None)
    assert view["scopes"] == sorted(REQUIRED)


def test_check_while_pleo_is_down(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    put_key(admin, "acme", key.api_key)
    sandbox.state.add_fault("/v1/introspect", "status", status=503)
    response = admin.post("/v1/tenants/acme/check")
    assert response.status_code == 503
    assert error_of(response)["code"] == "pleo_unavailable"
    assert admin.get("/v1/tenants/acme").json()["state"] == "active"


def test_disconnect_forgets_the_tenant(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    put_key(admin, "acme", key.api_key)
    assert admin.delete("/v1/tenants/acme").status_code == 204
    assert admin.get("/v1/tenants/acme").status_code == 404
    assert admin.get("/v1/tenants").json() == {"tenants": []}
    # The company is free again for another tenant.
    assert put_key(admin, "acme-new", key.api_key).status_code == 200


def test_list_filters_by_state(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    put_key(admin, "aaa", sandbox.state.create_key(scopes=REQUIRED).api_key)
    put_key(admin, "bbb", "pik_" + secrets.token_hex(20))
    everything = admin.get("/v1/tenants").json()["tenants"]
    assert [(t["tenant"], t["state"]) for t in everything] == [
        ("aaa", "active"),
        ("bbb", "pending"),
    ]
    assert [t["tenant"] for t in admin.get("/v1/tenants?state=pending").json()["tenants"]] == [
        "bbb"
    ]
    response = admin.get("/v1/tenants?state=sleeping")
    assert response.status_code == 400
    assert error_of(response)["code"] == "request_invalid"


def test_concurrent_rotations_leave_one_whole_record(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    company = sandbox.state.create_key(scopes=REQUIRED).company_id
    keys = [sandbox.state.create_key(company_id=company, scopes=REQUIRED) for _ in range(8)]
    sandbox.state.add_fault("/v1/introspect", "latency", latency_ms=30)

    def rotate(api_key: str) -> int:
        response = httpx.put(
            f"{broker.admin_url}/v1/tenants/acme/key",
            headers=broker.auth,
            json={"api_key": api_key},
            timeout=30,
        )
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(rotate, [k.api_key for k in keys]))
    assert statuses == [200] * 8
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert view["state"] == "active"
    assert view["company_id"] == company
    # The stored key is exactly one of the submitted ones, and the proxy injects that one.
    hints = {"…" + k.api_key[-4:]: k for k in keys}
    assert view["key_hint"] in hints
    sandbox.state.clear_faults()
    sandbox.state.clear_requests()
    response = httpx.get(
        f"{broker.proxy_url}/v3/export-jobs", headers={"X-Broker-Tenant": "acme"}, timeout=10
    )
    assert response.status_code == 200
    assert sandbox.state.requests[-1].key_id == hints[view["key_hint"]].key_id


def test_metrics_count_activations_and_states(
    broker: RunningBroker, admin: httpx.Client, sandbox: RunningSandbox
) -> None:
    put_key(admin, "acme", sandbox.state.create_key(scopes=REQUIRED).api_key)
    put_key(admin, "bad", "pik_" + secrets.token_hex(20))
    text = httpx.get(broker.admin_url + "/metrics").text
    assert 'broker_activations_total{result="ok"} 1.0' in text
    assert 'broker_activations_total{result="key_invalid"} 1.0' in text
    assert 'broker_tenants{state="active"} 1.0' in text
    assert 'broker_tenants{state="pending"} 1.0' in text
    assert 'broker_store_operations_total{backend="local",op="put",result="ok"}' in text


def test_all_scopes_constant_is_known() -> None:
    assert set(REQUIRED) <= set(ALL_SCOPES)


def test_two_tenants_racing_for_one_company_get_one_binding(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    first = sandbox.state.create_key(scopes=REQUIRED)
    second = sandbox.state.create_key(company_id=first.company_id, scopes=REQUIRED)
    sandbox.state.add_fault("/v1/introspect", "latency", latency_ms=300)

    def activate(pair: tuple[str, str]) -> httpx.Response:
        tenant, api_key = pair
        return httpx.put(
            f"{broker.admin_url}/v1/tenants/{tenant}/key",
            headers=broker.auth,
            json={"api_key": api_key},
            timeout=30,
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(activate, [("aaa", first.api_key), ("bbb", second.api_key)]))
    assert sorted(a.status_code for a in answers) == [200, 409]
    refused = next(a for a in answers if a.status_code == 409)
    assert error_of(refused)["code"] == "company_in_use"
    listed = httpx.get(f"{broker.admin_url}/v1/tenants?state=active", headers=broker.auth)
    assert len(listed.json()["tenants"]) == 1


# -- hostile requests: every one answers JSON with a code, never a bare 500 ------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000,
        b'{"a":' * 5000,
        b'{"api_key": "pik_x", "allow_company_change": ' + b"[" * 100_000,
        b'{"api_key": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"api_key": "pik_\xff\xfe"}',
        b"",
        b"null",
    ],
    ids=["array", "objects", "huge-unclosed", "closed", "not-utf8", "empty", "null"],
)
def test_hostile_key_submissions_are_request_invalid(
    broker: RunningBroker, sandbox: RunningSandbox, body: bytes
) -> None:
    response = httpx.put(
        broker.admin_url + "/v1/tenants/acme/key",
        content=body,
        headers={**broker.auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "request_invalid"
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/plain, application/json",
        "application/json, text/plain",
        "multipart/form-data; boundary=x",
    ],
)
def test_key_submission_must_be_sent_as_json(
    broker: RunningBroker, sandbox: RunningSandbox, content_type: str
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    response = httpx.put(
        broker.admin_url + "/v1/tenants/acme/key",
        content=json.dumps({"api_key": key.api_key}).encode(),
        headers={**broker.auth, "Content-Type": content_type},
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "request_invalid"
    assert "application/json" in error_of(response)["message"]
    assert key.api_key not in response.text


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", None]
)
def test_key_submission_as_json_is_accepted(
    broker: RunningBroker, sandbox: RunningSandbox, content_type: str | None
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED)
    headers = dict(broker.auth)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = httpx.put(
        broker.admin_url + "/v1/tenants/acme/key",
        content=json.dumps({"api_key": key.api_key}).encode(),
        headers=headers,
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "target",
    [
        "/v1/tenants?state=%ff%fe",
        "/v1/tenants?state=active&state=broken",
        "/v1/tenants?state[]=active",
        "/v1/tenants?" + "&" * 5000,
        "/v1/tenants?%00=%00",
        "/v1/tenants/" + "a" * 20_000,
        "/v1/tenants/%ff",
        "/v1/tenants/%00",
        "/v1/tenants/acme%2F..%2Fother",
        "/v1/tenants/" + "%" * 100,
        "/v1/tenants/acme/key?x=" + "[" * 5000,
    ],
)
def test_unusual_targets_never_give_a_server_error(broker: RunningBroker, target: str) -> None:
    with socket.create_connection(("127.0.0.1", broker.admin_port), timeout=5) as sock:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {broker.token}\r\n"
        sock.sendall(request.encode() + b"Connection: close\r\n\r\n")
        answer = read_all(sock)
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    assert b"Traceback" not in answer


def test_an_unexpected_failure_is_a_json_internal_error(
    make_broker: Callable[..., RunningBroker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker(store=ExplodingStore())
    response = httpx.get(broker.admin_url + "/v1/tenants/acme", headers=broker.auth)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert error_of(response)["code"] == "internal_error"
    assert "Traceback" not in response.text
    assert "pik_" not in response.text
    assert "exploded" not in response.text
    # The listener keeps serving.
    assert httpx.get(broker.admin_url + "/healthz").status_code == 200
    logged = [r for r in caplog.records if getattr(r, "event", None) == "admin.internal_error"]
    assert [r.fields["error_type"] for r in logged] == ["OSError"]  # type: ignore[attr-defined]
    assert all("pik_" not in str(vars(record)) for record in caplog.records)


def test_a_websocket_upgrade_on_the_admin_listener_is_not_a_server_error(
    broker: RunningBroker,
) -> None:
    with socket.create_connection(("127.0.0.1", broker.admin_port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = read_all(sock)
    status = int(answer.split(b" ", 2)[1])
    assert status < 500 and status != 101, answer[:300]


class ExplodingStore:
    """A store whose reads fail with an error the broker does not know, carrying a secret."""

    backend = "exploding"

    async def get(self, tenant: str) -> TenantRecord | None:
        raise OSError("the disk exploded while reading pik_live_secret")

    async def list(self) -> list[TenantRecord]:
        return []

    async def put(self, record: TenantRecord, *, events: object = ()) -> TenantRecord:
        raise OSError("the disk exploded")

    async def delete(self, tenant: str, *, events: object = ()) -> bool:
        raise OSError("the disk exploded")

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        return "c", []

    async def close(self) -> None:
        return None


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or stays silent 5 s)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_a_caller_hanging_up_mid_body_is_no_internal_error(
    inprocess_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_admin_app(inprocess_broker)
    token = inprocess_broker.settings.admin_token
    assert token is not None
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"api_key": "pik_', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/v1/tenants/acme/key",
        "raw_path": b"/v1/tenants/acme/key",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"admin.test"),
            (b"authorization", f"Bearer {token.get_secret_value()}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"50"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8081),
    }
    await app(scope, receive, send)
    assert "admin.internal_error" not in caplog.text
    assert sent[0]["status"] == 400
