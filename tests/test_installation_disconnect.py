"""What a disconnect did to the customer's installation in Pleo, as DELETE's
`X-Broker-Installation` header and the CLI say it (issue 16 review), end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox

pytestmark = pytest.mark.real


def _connect(broker: RunningBroker, sandbox: RunningSandbox, tenant: str) -> None:
    key = sandbox.state.create_key(scopes=list(REQUIRED_SCOPES))
    response = httpx.put(
        f"{broker.admin_url}/v1/tenants/{tenant}/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
    )
    assert response.status_code == 200, response.text


def _disconnect(broker: RunningBroker, tenant: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ADMIN_TOKEN"] = broker.token
    tenants = [sys.executable, "-m", "broker", "tenants", "--admin-url", broker.admin_url]
    return subprocess.run(
        [*tenants, "disconnect", tenant],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_delete_says_what_became_of_the_installation(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    _connect(broker, sandbox, "acme")
    _connect(broker, sandbox, "globex")
    url = f"{broker.admin_url}/v1/tenants"

    done = httpx.delete(f"{url}/acme", headers=broker.auth)
    sandbox.state.add_fault("/v1/installations", status=503)
    failed = httpx.delete(f"{url}/globex", headers=broker.auth)

    assert (done.status_code, done.content) == (204, b"")
    assert done.headers["X-Broker-Installation"] == "inactive"
    assert (failed.status_code, failed.content) == (204, b"")
    assert failed.headers["X-Broker-Installation"] == "failed"


@pytest.mark.slow
def test_the_cli_prints_what_happened_to_the_installation(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    _connect(broker, sandbox, "acme")
    _connect(broker, sandbox, "globex")

    done = _disconnect(broker, "acme")
    sandbox.state.add_fault("/v1/installations", status=503)
    failed = _disconnect(broker, "globex")

    assert done.returncode == 0, done.stderr
    assert "installation in Pleo set INACTIVE" in done.stdout
    assert failed.returncode == 0, failed.stderr
    assert "INACTIVE" not in failed.stdout.replace("could not be set INACTIVE", "")
    assert "could not be set INACTIVE" in failed.stdout
