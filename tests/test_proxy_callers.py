"""Callers end to end (README "Callers"): the real broker, with a callers file, in front of the
real sandbox; every request through the proxy listener."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.secret_volume import write_secret_volume
from support.servers import RunningBroker, RunningSandbox

from broker.callers import token_hash
from broker.sandbox import ALL_SCOPES

TOKENS = {name: f"{name}-token-{'x' * 32}" for name in ("billing", "group", "reader", "spare")}
CALLERS = {
    "billing": "['acme']",
    "group": "['acme-*']",
    "reader": "['*']\n    scopes: ['export-jobs:read']",
}
TENANTS = ("acme", "acme-eu", "beta")


def callers_yaml(callers: dict[str, str]) -> str:
    return "callers:\n" + "".join(
        f"  - name: {name}\n    token_sha256: {token_hash(TOKENS[name])}\n    tenants: {tenants}\n"
        for name, tenants in callers.items()
    )


def write_atomically(path: Path, text: str) -> None:
    """A new version of the callers file, as a Kubernetes Secret update makes it."""
    write_secret_volume(path.parent, {path.name: text})


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers" / "callers.yaml"
    write_atomically(path, callers_yaml(CALLERS))
    return path


@pytest.fixture
def guarded(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, callers_file: Path
) -> RunningBroker:
    broker = make_broker(callers_file=callers_file)
    scopes = [s for s in ALL_SCOPES if not s.startswith("accounts:")]
    for tenant in TENANTS:
        key = sandbox.state.create_key(scopes=scopes)
        answer = httpx.put(
            f"{broker.admin_url}/v1/tenants/{tenant}/key",
            headers=broker.auth,
            json={"api_key": key.api_key},
        )
        assert answer.status_code == 200, answer.text
    sandbox.state.clear_requests()
    return broker


def call(
    broker: RunningBroker,
    tenant: str,
    authorization: str | None,
    method: str = "GET",
    path: str = "/v3/export-jobs",
) -> httpx.Response:
    headers = {"X-Broker-Tenant": tenant}
    if authorization is not None:
        headers["Proxy-Authorization"] = authorization
    body: Any = {"accountingEntryIds": []} if method == "POST" else None
    return httpx.request(method, broker.proxy_url + path, headers=headers, json=body, timeout=10)


def bearer(name: str) -> str:
    return f"Bearer {TOKENS[name]}"


READ = ("GET", "/v3/export-jobs")
WRITE = ("POST", "/v3/export-jobs")
UNSCOPED = ("GET", "/v1/introspect")  # needs no scope, but is control plane: refused anyway

# caller × tenant × route → what the proxy answers (a status, or an error code)
TABLE = [
    ("billing", "acme", READ, 200),
    ("billing", "acme", WRITE, 200),
    ("billing", "acme-eu", READ, "caller_not_allowed"),
    ("billing", "beta", READ, "caller_not_allowed"),
    ("billing", "nobody", READ, "caller_not_allowed"),  # not allowed before unknown
    ("group", "acme-eu", READ, 200),
    ("group", "acme-eu", WRITE, 200),
    ("group", "acme", READ, "caller_not_allowed"),
    ("group", "beta", READ, "caller_not_allowed"),
    ("reader", "acme", READ, 200),
    ("reader", "beta", READ, 200),
    ("reader", "acme-eu", READ, 200),
    ("reader", "beta", WRITE, "caller_not_allowed"),
    ("reader", "nobody", READ, "tenant_unknown"),
]


@pytest.mark.parametrize(("caller", "tenant", "route", "expected"), TABLE)
def test_callers_tenants_and_routes(
    guarded: RunningBroker,
    sandbox: RunningSandbox,
    caller: str,
    tenant: str,
    route: tuple[str, str],
    expected: int | str,
) -> None:
    response = call(guarded, tenant, bearer(caller), *route)
    if isinstance(expected, int):
        assert response.status_code in (expected, 201), response.text
        (seen,) = sandbox.state.requests
        assert seen.header_values("proxy-authorization") == []
        assert seen.authorization_matched
    else:
        assert response.json()["error"]["code"] == expected
        assert response.status_code == {"caller_not_allowed": 403, "tenant_unknown": 404}[expected]
        assert sandbox.state.requests == type(sandbox.state.requests)()  # Pleo saw nothing
    assert TOKENS[caller] not in response.text


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Bearer {'y' * len(TOKENS['billing'])}",  # right length, wrong token
        f"Bearer {TOKENS['spare']}",  # a token of no caller in the file
        f"Bearer {token_hash(TOKENS['billing'])}",  # the hash is not the token
        f"Basic {TOKENS['billing']}",
        f"Token {TOKENS['billing']}",
        f"Bearer:{TOKENS['billing']}",
        f"Bearer{TOKENS['billing']}",
    ],
)
def test_a_request_without_a_known_token_is_unauthenticated(
    guarded: RunningBroker, sandbox: RunningSandbox, authorization: str | None
) -> None:
    response = call(guarded, "acme", authorization)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "caller_unauthenticated"
    assert "Proxy-Authorization" in response.json()["error"]["message"]
    assert not sandbox.state.requests


def test_the_token_given_twice_is_unauthenticated(guarded: RunningBroker) -> None:
    headers = [
        ("X-Broker-Tenant", "acme"),
        ("Proxy-Authorization", bearer("billing")),
        ("Proxy-Authorization", bearer("billing")),
    ]
    response = httpx.get(guarded.proxy_url + "/v3/export-jobs", headers=headers)
    assert response.json()["error"]["code"] == "caller_unauthenticated"


def test_unauthenticated_comes_before_the_tenant_is_looked_at(guarded: RunningBroker) -> None:
    response = httpx.get(guarded.proxy_url + "/v3/export-jobs")  # no tenant header either
    assert response.json()["error"]["code"] == "caller_unauthenticated"


def test_the_caller_is_a_metric_label_and_a_log_field(
    guarded: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="broker"):
        assert call(guarded, "acme", bearer("billing")).status_code == 200
        assert call(guarded, "beta", bearer("billing")).status_code == 403
        assert call(guarded, "beta", bearer("spare")).status_code == 401
    text = httpx.get(f"{guarded.admin_url}/metrics").text
    assert (
        'broker_proxy_requests_total{caller="billing",code="200",method="GET",'
        'route="/v3/export-jobs"} 1.0'
    ) in text
    assert 'caller="billing",code="403"' in text
    assert 'caller="anonymous",code="401"' in text
    refused = [r.fields for r in caplog.records if r.getMessage() == "proxy.refused"]  # type: ignore[attr-defined]
    assert {"code": "caller_not_allowed", "caller": "billing"}.items() <= refused[0].items()
    assert refused[1]["caller"] == "anonymous"
    assert TOKENS["spare"] not in caplog.text and TOKENS["billing"] not in caplog.text


def test_a_break_caused_through_the_proxy_names_the_caller_in_its_event(
    guarded: RunningBroker, sandbox: RunningSandbox
) -> None:
    acme = httpx.get(f"{guarded.admin_url}/v1/tenants/acme", headers=guarded.auth).json()
    key_id = next(k for k, v in sandbox.state.keys.items() if v.company_id == acme["company_id"])
    sandbox.state.revoke(key_id)
    assert call(guarded, "acme", bearer("billing")).status_code == 424
    feed = httpx.get(
        f"{guarded.admin_url}/v1/events", headers=guarded.auth, params={"tenant": "acme"}
    ).json()
    broken = [e for e in feed["events"] if e["type"] == "tenant.broken"]
    assert [(e["actor"], e["caller"]) for e in broken] == [("proxy", "billing")]
    activated = [e for e in feed["events"] if e["type"] == "tenant.activated"]
    assert "caller" not in activated[0]  # the admin API's events have none


def test_a_changed_file_applies_within_a_second(guarded: RunningBroker, callers_file: Path) -> None:
    assert call(guarded, "beta", bearer("billing")).status_code == 403
    write_atomically(callers_file, callers_yaml({**CALLERS, "billing": "['acme', 'beta']"}))
    started = time.monotonic()
    while call(guarded, "beta", bearer("billing")).status_code != 200:
        assert time.monotonic() - started < 1.0, "the new callers file did not apply in time"
        time.sleep(0.02)
    # and removing a caller locks it out as quickly
    write_atomically(callers_file, callers_yaml({"reader": CALLERS["reader"]}))
    started = time.monotonic()
    while call(guarded, "acme", bearer("billing")).status_code != 401:
        assert time.monotonic() - started < 1.0, "the removed caller still got in"
        time.sleep(0.02)


def test_a_broken_file_keeps_the_old_rules(
    guarded: RunningBroker, callers_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="broker"):
        write_atomically(callers_file, "callers:\n  - name: billing\n    tenants: ['*']\n")
        started = time.monotonic()
        while "callers.reload_failed" not in caplog.text:
            assert time.monotonic() - started < 1.0, "the broken file was not noticed"
            time.sleep(0.02)
    (failed,) = [r for r in caplog.records if r.getMessage() == "callers.reload_failed"]
    assert "caller 1 (billing): 'token_sha256' must be 64 hex" in failed.fields["error"]  # type: ignore[attr-defined]
    assert call(guarded, "acme", bearer("billing")).status_code == 200
    assert call(guarded, "beta", bearer("billing")).status_code == 403
    assert "broker_callers_file_stale 1.0" in httpx.get(f"{guarded.admin_url}/metrics").text
    write_atomically(callers_file, callers_yaml(CALLERS))
    started = time.monotonic()
    while "broker_callers_file_stale 0.0" not in httpx.get(f"{guarded.admin_url}/metrics").text:
        assert time.monotonic() - started < 1.0, "the fixed file did not clear the gauge"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("caller", "route", "expected"),
    [
        ("reader", ("DELETE", "/v1/installations/me"), "caller_not_allowed"),  # control plane
        ("reader", ("GET", "/v1/installations/me"), "caller_not_allowed"),  # needs no scope
        ("reader", UNSCOPED, "caller_not_allowed"),
        ("reader", READ, 200),
        ("billing", UNSCOPED, 200),  # a caller without `scopes` may use every route
    ],
)
def test_a_caller_with_scopes_may_use_only_routes_needing_one_of_them(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    callers_file: Path,
    caller: str,
    route: tuple[str, str],
    expected: int | str,
) -> None:
    broker = make_broker(callers_file=callers_file, proxy_allow_control_plane=True)
    key = sandbox.state.create_key(scopes=[s for s in ALL_SCOPES if not s.startswith("accounts:")])
    answer = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
    )
    assert answer.status_code == 200, answer.text
    sandbox.state.clear_requests()
    response = call(broker, "acme", bearer(caller), *route)
    if isinstance(expected, int):
        assert response.status_code == expected, response.text
        assert len(sandbox.state.requests) == 1
    else:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == expected
        assert "'reader'" in response.json()["error"]["message"]
        assert not sandbox.state.requests  # Pleo saw nothing
