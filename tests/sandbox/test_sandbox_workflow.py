"""Pleo's export workflow end to end, starting from Pleo's own webhook, against the sandbox
and again through the broker's proxy: subscribe → job created → `v1.export-job.created`
delivered and signed → started → items → export items → update items → completed →
`v1.export-job.completed`. Plus webhook signing, retries and subscriptions' state."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support.sandbox_helpers import assert_matches_spec, basic
from support.servers import RunningBroker, RunningSandbox, start_app
from support.webhook_receiver import wait_until

DEADLINE = 10.0
TENANT = {"X-Broker-Tenant": "acme"}


class Receiver:
    """An integration's webhook endpoint: records deliveries; answers `statuses` in turn."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.arrived = threading.Condition()
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.base, self.thread = start_app(app)
        self.url = self.base + "/hook"

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        with self.arrived:
            self.deliveries.append((dict(request.headers), body))
            self.arrived.notify_all()
        return Response(status_code=self.statuses.pop(0) if self.statuses else 204)

    def wait_for(self, event_type: str, count: int = 1) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [d for d in self.events() if d["eventType"] == event_type]

        with self.arrived:
            if not self.arrived.wait_for(lambda: len(found()) >= count, timeout=DEADLINE):
                raise AssertionError(f"no {event_type} delivered; got {self.events()}")
        return found()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.deliveries]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.thread.stop()


def verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    """Check a delivery as an integration would (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60


def export_workflow(client: httpx.Client, company_id: str, receiver: Receiver) -> None:
    """The whole workflow as an integration runs it; `client` is the way to Pleo."""
    subscribed = client.post(
        "/v1/subscriptions",
        json={
            "endpointUrl": receiver.url,
            "eventTypes": ["v1.export-job.created", "v1.export-job.completed"],
        },
    )
    assert subscribed.status_code == 200, subscribed.text
    assert_matches_spec("subscriptions-api", subscribed)
    subscription_id = subscribed.json()["data"]["id"]
    secret = client.get(f"/v1/subscriptions/{subscription_id}/secret").json()["data"]
    assert secret["secretKey"].startswith("whsec_")

    entries = [str(uuid.uuid4()) for _ in range(3)]
    created = client.post(
        "/v3/export-jobs", json={"companyId": company_id, "accountingEntryIds": entries}
    )
    assert created.status_code == 201, created.text

    (event,) = receiver.wait_for("v1.export-job.created")
    headers, body = receiver.deliveries[0]
    verify(secret["secretKey"], headers, body)
    job_id = event["data"]["id"]
    assert job_id == created.json()["data"]["id"]

    started = client.post("/v3/export-job-events", json={"jobId": job_id, "event": "started"})
    assert started.status_code == 202, started.text
    items = client.get(f"/v3/export-jobs/{job_id}/items").json()["data"]
    assert {item["accountingEntryId"] for item in items} == set(entries)
    details = client.get("/v3/export-items", params={"job_id": job_id})
    assert details.status_code == 200, details.text
    assert_matches_spec("export-items-v3-api", details)
    updates = [
        {"accountingEntryId": item["accountingEntryId"], "status": "successful", "externalId": n}
        for n, item in enumerate(items)
    ]
    for update in updates:
        update["externalId"] = f"ERP-{update['externalId']}"
    put = client.put(f"/v3/export-jobs/{job_id}/items", json=updates)
    assert put.status_code == 200 and put.json()["errors"] == [], put.text
    done = client.post("/v3/export-job-events", json={"jobId": job_id, "event": "completed"})
    assert done.status_code == 202, done.text

    job = client.get(f"/v3/export-jobs/{job_id}").json()["data"]
    assert job["status"] == "completed"
    statuses = {i["status"] for i in client.get(f"/v3/export-jobs/{job_id}/items").json()["data"]}
    assert statuses == {"successful"}
    (completed,) = receiver.wait_for("v1.export-job.completed")
    assert completed["data"]["id"] == job_id and completed["data"]["status"] == "completed"


def test_export_workflow_against_the_sandbox(sandbox: RunningSandbox, receiver: Receiver) -> None:
    key = sandbox.state.create_key()
    with httpx.Client(base_url=sandbox.url, headers=basic(key.api_key)) as client:
        export_workflow(client, key.company_id, receiver)


@pytest.mark.real
def test_export_workflow_through_the_brokers_proxy(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, receiver: Receiver
) -> None:
    broker = make_broker()
    key = sandbox.state.create_key()
    connected = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
    )
    assert connected.status_code == 200, connected.text
    with httpx.Client(base_url=broker.proxy_url, headers=TENANT) as client:
        export_workflow(client, key.company_id, receiver)
    # every call went through the broker with the tenant's key
    assert {seen.key_id for seen in sandbox.state.requests} == {key.key_id}


def test_a_failed_delivery_is_retried(sandbox: RunningSandbox) -> None:
    receiver = Receiver(statuses=[500, 503])
    sandbox.state.webhook_retry_delays = (0.01, 0.01, 0.01)
    key = sandbox.state.create_key()
    try:
        with httpx.Client(base_url=sandbox.url, headers=basic(key.api_key)) as client:
            client.post(
                "/v1/subscriptions",
                json={"endpointUrl": receiver.url, "eventTypes": ["v1.export-job.created"]},
            ).raise_for_status()
            body = {"companyId": key.company_id, "accountingEntryIds": [str(uuid.uuid4())]}
            client.post("/v3/export-jobs", json=body).raise_for_status()
            receiver.wait_for("v1.export-job.created", count=3)

            def settled() -> list[dict[str, Any]] | None:
                # The receiver counts the third attempt as it arrives; the sandbox records its
                # 204 once the answer is back.
                found: list[dict[str, Any]] = client.get("/_sandbox/webhooks").json()["deliveries"]
                return found if found and found[0]["delivered"] else None

            deliveries = wait_until(settled, within=5, what="the third attempt recorded")
    finally:
        receiver.thread.stop()
    ids = {headers["webhook-id"] for headers, _ in receiver.deliveries}
    assert len(ids) == 1  # the same event each time: receivers dedupe by webhook-id
    (delivery,) = deliveries
    assert [a["outcome"] for a in delivery["attempts"]] == [500, 503, 204]
    assert delivery["delivered"] is True


def test_a_delivery_goes_only_to_the_companys_subscriptions(
    sandbox: RunningSandbox, receiver: Receiver
) -> None:
    ours, theirs = sandbox.state.create_key(), sandbox.state.create_key()
    with httpx.Client(base_url=sandbox.url) as client:
        client.post(
            "/v1/subscriptions",
            json={"endpointUrl": receiver.url, "eventTypes": ["v1.export-job.created"]},
            headers=basic(theirs.api_key),
        ).raise_for_status()
        body = {"companyId": ours.company_id, "accountingEntryIds": [str(uuid.uuid4())]}
        client.post("/v3/export-jobs", json=body, headers=basic(ours.api_key)).raise_for_status()
        assert client.get("/_sandbox/webhooks").json()["deliveries"] == []
        listed = client.get("/v1/subscriptions", headers=basic(ours.api_key)).json()
        assert listed["data"] == []


def test_subscriptions_keep_state_and_refuse_bad_input(sandbox: RunningSandbox) -> None:
    key = sandbox.state.create_key()
    with httpx.Client(base_url=sandbox.url, headers=basic(key.api_key)) as client:
        bad = client.post("/v1/subscriptions", json={"endpointUrl": "ftp://x", "eventTypes": []})
        assert bad.status_code == 400 and "endpointUrl" in bad.json()["message"]
        unknown = client.post(
            "/v1/subscriptions",
            json={"endpointUrl": "http://127.0.0.1:9/", "eventTypes": ["v9.nothing"]},
        )
        assert unknown.status_code == 400 and "v9.nothing" in unknown.json()["message"]
        made = client.post(
            "/v1/subscriptions",
            json={"endpointUrl": "http://127.0.0.1:9/", "eventTypes": ["v1.export-job.created"]},
        ).json()["data"]
        assert "secret" not in made and made["status"] == "ACTIVE"
        path = f"/v1/subscriptions/{made['id']}"
        updated = client.put(path, json={"status": "INACTIVE"})
        assert_matches_spec("subscriptions-api", updated)
        assert client.get(path).json()["data"]["status"] == "INACTIVE"
        assert client.delete(path).status_code == 204
        assert client.get(path).status_code == 404
        activities = client.get(path + "/activities")
        assert_matches_spec("subscriptions-api", activities)
        assert [a["operationType"] for a in activities.json()["data"]] == [
            "CREATE",
            "UPDATE",
            "DELETE",
        ]


def test_seeding_a_company_sends_the_export_job_created_webhook(
    sandbox: RunningSandbox, receiver: Receiver
) -> None:
    key = sandbox.state.create_key()
    with httpx.Client(base_url=sandbox.url, headers=basic(key.api_key)) as client:
        client.post(
            "/v1/subscriptions",
            json={"endpointUrl": receiver.url, "eventTypes": ["v1.export-job.created"]},
        ).raise_for_status()
        seeded = client.post("/_sandbox/seed", json={"key_id": key.key_id, "seed": 5}).json()
    (event,) = receiver.wait_for("v1.export-job.created")
    assert event["data"]["id"] == seeded["export_job_id"]
    assert event["data"]["numberOfItems"] == 12
