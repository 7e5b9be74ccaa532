"""Which company and which integration a key belongs to, end to end: the real broker against
the real sandbox over 127.0.0.1 (issue 8, item 10)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox

pytestmark = pytest.mark.real

REQUIRED = ["export-jobs:read", "export-jobs:write"]
CLIENT_ID = "d8b8a6d4-3c4b-4b8e-8b2e-1f2a3d4e5f6a"


def put_key(broker: RunningBroker, tenant: str, api_key: str) -> httpx.Response:
    return httpx.put(
        f"{broker.admin_url}/v1/tenants/{tenant}/key",
        headers=broker.auth,
        json={"api_key": api_key},
    )


def test_without_a_subject_the_company_comes_from_the_installation(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED, subject_in_introspection=False)
    response = put_key(broker, "acme", key.api_key)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["state"] == "active"
    assert view["company_id"] == key.company_id
    asked = [(r.method, r.path) for r in sandbox.state.requests]
    assert asked[:2] == [("GET", "/v1/introspect"), ("GET", "/v1/installations/me")]
    # then the installation's sync (broker.installation): read it, and name the tenant in it
    assert asked[2:] == [("GET", "/v1/installations/me"), ("PUT", "/v1/installations/me")]

    checked = httpx.post(f"{broker.admin_url}/v1/tenants/acme/check", headers=broker.auth)
    assert checked.status_code == 200 and checked.json()["state"] == "active"
    proxied = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers={"X-Broker-Tenant": "acme"})
    assert proxied.status_code == 200, proxied.text


@pytest.mark.parametrize(
    ("subject", "resource"),
    [
        (False, "urn:pleo:organisation:{other}"),  # neither names a company
        (True, "urn:pleo:company:{company}"),  # a non-company subject is not second-guessed
    ],
    ids=["neither-names-a-company", "subject-names-an-organisation"],
)
def test_a_key_without_a_company_is_refused(
    broker: RunningBroker, sandbox: RunningSandbox, subject: bool, resource: str
) -> None:
    company = str(uuid.uuid4())
    key = sandbox.state.create_key(
        company,
        REQUIRED,
        subject_urn=f"urn:pleo:organisation:{uuid.uuid4()}",
        subject_in_introspection=subject,
        installation_resource=resource.format(company=company, other=uuid.uuid4()),
    )
    response = put_key(broker, "acme", key.api_key)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "key_not_company_scoped"
    asked = [r.path for r in sandbox.state.requests]
    assert asked == (["/v1/introspect"] if subject else ["/v1/introspect", "/v1/installations/me"])


def test_the_integration_of_the_key_is_recorded_and_shown(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED, client_id=CLIENT_ID)
    assert put_key(broker, "acme", key.api_key).status_code == 200
    view = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert (view["client_id"], view["application_name"]) == (CLIENT_ID, "Pleo Sandbox")


def test_a_key_of_another_integration_is_refused_when_the_client_id_is_set(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(pleo_client_id=CLIENT_ID.upper())
    other = sandbox.state.create_key(scopes=REQUIRED, client_id=str(uuid.uuid4()))
    response = put_key(broker, "acme", other.api_key)
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "key_wrong_integration"
    assert "Settings → Integrations" in error["message"]
    assert "Pleo Sandbox" in error["message"]  # the integration the key was made for
    assert other.api_key not in response.text
    pending = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).json()
    assert pending["state"] == "pending"

    ours = sandbox.state.create_key(scopes=REQUIRED, client_id=CLIENT_ID)
    response = put_key(broker, "acme", ours.api_key)
    assert response.status_code == 200, response.text
    assert response.json()["client_id"] == CLIENT_ID
