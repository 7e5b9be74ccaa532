"""The customer's installation in Pleo kept in step with the tenant (issue 16, DESIGN.md §17),
end to end: the real broker against the real sandbox over 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox

from broker.sandbox.state import SandboxKey

pytestmark = pytest.mark.real

INSTALLATION = "/v1/installations/me"


def connect(broker: RunningBroker, tenant: str, api_key: str) -> dict[str, Any]:
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/{tenant}/key",
        headers=broker.auth,
        json={"api_key": api_key},
    )
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def held(sandbox: RunningSandbox, key: SandboxKey) -> dict[str, Any]:
    """What the sandbox keeps of the key's installation (status, metadata, deleted, …)."""
    return sandbox.state.keys[key.key_id].installation


def calls(sandbox: RunningSandbox) -> list[tuple[str, str]]:
    """The installation calls the sandbox saw, in order."""
    return [(r.method, r.path) for r in sandbox.state.requests if r.path == INSTALLATION]


def feed_types(broker: RunningBroker) -> list[tuple[str, str]]:
    events = httpx.get(f"{broker.admin_url}/v1/events", headers=broker.auth).json()["events"]
    return [(event["type"], event["actor"]) for event in events]


def test_the_first_activation_creates_the_installation(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    held(sandbox, key)["deleted"] = True  # Pleo has no installation for this key yet
    view = connect(broker, "acme", key.api_key)

    assert calls(sandbox) == [("GET", INSTALLATION), ("POST", INSTALLATION)]
    assert held(sandbox, key)["status"] == "ACTIVATED"
    assert held(sandbox, key)["metadata"] == {"externalConfigurationId": "acme"}
    installation = view["installation"]
    assert (installation["status"], installation["error"]) == ("ACTIVATED", None)
    assert installation["synced_at"].endswith("Z")
    assert ("tenant.installation_changed", "admin") in feed_types(broker)


def test_a_second_connect_of_the_company_updates_rather_than_duplicates(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    assert (
        httpx.delete(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).status_code == 204
    )
    assert held(sandbox, key)["status"] == "INACTIVE"
    sandbox.state.clear_requests()

    view = connect(broker, "acme", key.api_key)

    assert calls(sandbox) == [("GET", INSTALLATION), ("PUT", INSTALLATION)]  # no POST
    assert held(sandbox, key)["status"] == "ACTIVATED"
    assert view["installation"]["status"] == "ACTIVATED"


def test_pleo_failing_leaves_the_tenant_active_and_the_next_check_fixes_it(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    held(sandbox, key)["deleted"] = True
    sandbox.state.add_fault("/v1/installations", status=503)
    view = connect(broker, "acme", key.api_key)

    assert view["state"] == "active"  # the activation stands
    installation = view["installation"]
    assert installation["status"] == "ACTIVATED" and installation["synced_at"] is None
    assert "HTTP 503" in installation["error"]
    proxied = httpx.get(f"{broker.proxy_url}/v3/export-jobs", headers={"X-Broker-Tenant": "acme"})
    assert proxied.status_code == 200, proxied.text

    sandbox.state.clear_faults()
    checked = httpx.post(f"{broker.admin_url}/v1/tenants/acme/check", headers=broker.auth)
    assert checked.status_code == 200, checked.text
    assert checked.json()["installation"]["error"] is None
    assert checked.json()["installation"]["synced_at"] is not None
    assert held(sandbox, key)["status"] == "ACTIVATED" and not held(sandbox, key)["deleted"]


def test_the_integration_marks_its_own_sync_progress(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    url = f"{broker.admin_url}/v1/tenants/acme/installation"
    body = {"status": "PENDING_INTEGRATION", "metadata": {"erp": "acme-books"}}

    syncing = httpx.put(url, headers=broker.auth, json=body)

    assert syncing.status_code == 200, syncing.text
    assert syncing.json()["installation"]["status"] == "PENDING_INTEGRATION"
    assert held(sandbox, key)["status"] == "PENDING_INTEGRATION"
    assert held(sandbox, key)["metadata"] == {
        "erp": "acme-books",
        "externalConfigurationId": "acme",
    }
    done = httpx.put(url, headers=broker.auth, json={"status": "ACTIVATED"})
    assert done.json()["installation"]["status"] == "ACTIVATED"
    assert held(sandbox, key)["metadata"]["erp"] == "acme-books"  # kept when not sent
    assert feed_types(broker).count(("tenant.installation_changed", "admin")) == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "DONE"}, "status must be one of: ACTIVATED, INACTIVE, AUTHORIZED"),
        ({"status": "activated"}, "status must be one of"),
        ({}, "status: Field required"),
        ({"status": "ACTIVATED", "metadata": [1]}, "metadata"),
        ({"status": "ACTIVATED", "colour": "red"}, "colour"),
    ],
    ids=["unknown", "lower-case", "missing", "metadata-not-object", "extra-field"],
)
def test_the_admin_route_refuses_a_status_outside_the_enum(
    broker: RunningBroker, sandbox: RunningSandbox, body: dict[str, Any], expected: str
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/installation", headers=broker.auth, json=body
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "request_invalid"
    assert expected in error["message"]
    assert calls(sandbox) == []  # nothing was sent to Pleo


def test_the_admin_route_needs_an_active_tenant(broker: RunningBroker) -> None:
    url = f"{broker.admin_url}/v1/tenants/nobody/installation"
    response = httpx.put(url, headers=broker.auth, json={"status": "ACTIVATED"})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "tenant_unknown")
    unauthorised = httpx.put(url, json={"status": "ACTIVATED"})
    assert unauthorised.status_code == 401


def test_disconnect_sets_the_installation_inactive(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    response = httpx.delete(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth)
    assert response.status_code == 204
    assert calls(sandbox) == [("GET", INSTALLATION), ("PUT", INSTALLATION)]
    assert held(sandbox, key)["status"] == "INACTIVE" and not held(sandbox, key).get("deleted")
    events = httpx.get(f"{broker.admin_url}/v1/events", headers=broker.auth).json()["events"]
    assert events[-1]["type"] == "tenant.disconnected"
    assert events[-1]["data"]["installation"]["status"] == "INACTIVE"


def test_disconnect_goes_on_when_pleo_fails_to_set_it_inactive(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.add_fault("/v1/installations", status=503)
    response = httpx.delete(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth)
    assert response.status_code == 204
    gone = httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth)
    assert gone.status_code == 404


def test_uninstall_deletes_the_installation(broker: RunningBroker, sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    response = httpx.delete(
        f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth, params={"uninstall": "true"}
    )
    assert response.status_code == 204
    assert calls(sandbox) == [("DELETE", INSTALLATION)]
    assert held(sandbox, key)["deleted"] is True


def test_a_failed_uninstall_keeps_the_tenant_to_retry(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.add_fault("/v1/installations", status=502, times=1)
    url = f"{broker.admin_url}/v1/tenants/acme"
    failed = httpx.delete(url, headers=broker.auth, params={"uninstall": "true"})
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["code"] == "pleo_unavailable"
    assert "still connected" in error["message"] and "uninstall=true" in error["message"]
    assert httpx.get(url, headers=broker.auth).json()["state"] == "active"
    assert httpx.delete(url, headers=broker.auth, params={"uninstall": "true"}).status_code == 204
    assert held(sandbox, key)["deleted"] is True
    bad = httpx.delete(url, headers=broker.auth, params={"uninstall": "yes"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "request_invalid")


def test_the_proxy_still_refuses_the_installation_routes_to_callers(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)
    sandbox.state.clear_requests()
    for method in ("POST", "PUT", "DELETE"):
        response = httpx.request(
            method,
            broker.proxy_url + INSTALLATION,
            headers={"X-Broker-Tenant": "acme"},
            json={"status": "INACTIVE"},
        )
        assert response.status_code == 403, (method, response.text)
        assert response.json()["error"]["code"] == "route_not_allowed"
    assert calls(sandbox) == []
    assert held(sandbox, key)["status"] == "ACTIVATED"


def test_the_status_on_activation_is_a_setting(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(installation_status_on_activation="PENDING_INTEGRATION")
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    view = connect(broker, "acme", key.api_key)
    assert view["installation"]["status"] == "PENDING_INTEGRATION"
    assert held(sandbox, key)["status"] == "PENDING_INTEGRATION"


# -- the command line ----------------------------------------------------------------------


def cli(broker: RunningBroker, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = broker.token
    return subprocess.run(
        [sys.executable, "-m", "broker", "tenants", "--admin-url", broker.admin_url, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.slow
def test_the_cli_sets_the_status_and_uninstalls_only_when_confirmed(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    connect(broker, "acme", key.api_key)

    result = cli(broker, "installation", "acme", "--status", "PENDING_INTEGRATION")
    assert result.returncode == 0, result.stderr
    assert "status=PENDING_INTEGRATION" in result.stdout
    assert held(sandbox, key)["status"] == "PENDING_INTEGRATION"
    refused = cli(broker, "installation", "acme", "--status", "DONE")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr

    declined = cli(broker, "disconnect", "acme", "--uninstall", stdin="no\n")
    assert declined.returncode == 1
    assert "revokes the key's access" in declined.stderr
    assert not held(sandbox, key).get("deleted")
    assert httpx.get(f"{broker.admin_url}/v1/tenants/acme", headers=broker.auth).status_code == 200

    confirmed = cli(broker, "disconnect", "acme", "--uninstall", stdin="acme\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "revoked the key's access there too" in confirmed.stdout
    assert held(sandbox, key)["deleted"] is True
