"""The integration's own control plane (its installation's lifecycle) through the real proxy:
refused unless the operator allows it; reading the installation is always allowed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox

pytestmark = pytest.mark.real

TENANT = {"X-Broker-Tenant": "acme"}
CONTROL_PLANE = [
    ("DELETE", "/v1/installations/me"),
    ("POST", "/v1/installations/me"),
    ("PUT", "/v1/installations/me"),
    ("POST", "/v1/installations/me:activate"),
    ("PUT", "/v1/installations/completions"),
]
# The same routes spelled with percent-escapes the policy decodes before matching.
ENCODED = [
    ("DELETE", "/v1/installations/%6De"),
    ("POST", "/v1/installations/me%3Aactivate"),
    ("PUT", "/v1/%69nstallations/completions"),
]


def _connected(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, **kw: Any
) -> RunningBroker:
    broker = make_broker(**kw)
    key = sandbox.state.create_key()
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
    )
    assert response.status_code == 200, response.text
    sandbox.state.clear_requests()
    return broker


@pytest.mark.parametrize(("method", "path"), CONTROL_PLANE + ENCODED)
def test_control_plane_routes_are_refused_by_default(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, method: str, path: str
) -> None:
    broker = _connected(make_broker, sandbox)
    response = httpx.request(
        method, broker.proxy_url + path, headers=TENANT, json={"status": "ACTIVATED"}
    )
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "route_not_allowed"
    assert "control plane" in error["message"]
    assert "BROKER_PROXY_ALLOW_CONTROL_PLANE" in error["message"]
    assert list(sandbox.state.requests) == []  # nothing reached Pleo


def test_reading_the_installation_is_allowed(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = _connected(make_broker, sandbox)
    response = httpx.get(broker.proxy_url + "/v1/installations/me", headers=TENANT)
    assert response.status_code == 200, response.text
    assert response.json()["resource"].startswith("urn:pleo:company:")


@pytest.mark.parametrize(("method", "path"), CONTROL_PLANE)
def test_an_operator_may_allow_the_control_plane(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, method: str, path: str
) -> None:
    broker = _connected(make_broker, sandbox, proxy_allow_control_plane=True)
    response = httpx.request(
        method, broker.proxy_url + path, headers=TENANT, json={"status": "ACTIVATED"}
    )
    assert response.status_code in (200, 204), response.text  # the sandbox's own answer
    assert "route_not_allowed" not in response.text
    (seen,) = sandbox.state.requests  # forwarded to Pleo
    assert (seen.method, seen.path) == (method, path)
