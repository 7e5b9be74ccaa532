"""A webhook receiver for tests: a small Starlette app on 127.0.0.1 that records every POST.

`fail_first(n, status)` answers the next `n` requests with `status` (500 by default), `hang`
holds every request until it is cleared, and `verify` checks a recorded request with PyPI
`standardwebhooks`, the reference implementation (never with the broker's own code).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from support.servers import REQUIRED_SCOPES, RunningBroker, RunningSandbox, ThreadedLoop, start_app


def new_secret() -> str:
    """A signing secret as an operator makes one: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Received:
    """One request the receiver got, and the status it answered."""

    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """Records requests; fails or hangs on demand (thread-safe: tests read, the app writes)."""

    def __init__(self) -> None:
        self.secret = new_secret()
        self.received: list[Received] = []
        self.hang = False
        self.waiting = 0  # requests held by `hang` right now
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self.url = ""
        self.thread: ThreadedLoop | None = None

    def fail_first(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._failures = [status] * count

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def delivered(self) -> list[dict[str, Any]]:
        """The events answered with 2xx, in the order they arrived."""
        return [item.event for item in self.requests() if 200 <= item.status < 300]

    def verify(self, item: Received) -> dict[str, Any]:
        """The event, after `standardwebhooks` verified its signature (raises otherwise)."""
        verified: dict[str, Any] = Webhook(self.secret).verify(item.body, item.headers)
        return verified

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.waiting += 1  # one event loop: no lock needed between handlers
        try:
            while self.hang:  # noqa: ASYNC110 - set by the test thread, not on this loop
                await asyncio.sleep(0.05)
        finally:
            self.waiting -= 1
        with self._lock:
            status = self._failures.pop(0) if self._failures else 204
            self.received.append(Received(dict(request.headers), body, status))
        return Response(status_code=status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hooks", self.handle, methods=["POST"])])


def start_receiver() -> Receiver:
    receiver = Receiver()
    url, thread = start_app(receiver.app())
    receiver.url, receiver.thread = f"{url}/hooks", thread
    return receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = start_receiver()
    try:
        yield running
    finally:
        running.hang = False
        assert running.thread is not None
        running.thread.stop()


def wait_until(check: Callable[[], Any], *, within: float, what: str) -> Any:
    """Poll `check` until it returns something true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def feed(admin: httpx.Client) -> list[dict[str, Any]]:
    answer = admin.get("/v1/events", params={"limit": "1000"})
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def metric(broker: RunningBroker, name: str, **labels: str) -> float:
    text = httpx.get(f"{broker.admin_url}/metrics", headers=broker.auth, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def make_changes(admin: httpx.Client, sandbox: RunningSandbox) -> None:
    """Two tenants, several events each, interleaved."""
    acme = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    beta = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    assert admin.put("/v1/tenants/acme/key", json={"api_key": acme.api_key}).is_success
    assert admin.put("/v1/tenants/beta/key", json={"api_key": beta.api_key}).is_success
    rotated = sandbox.state.create_key(acme.company_id, scopes=REQUIRED_SCOPES)
    assert admin.put("/v1/tenants/acme/key", json={"api_key": rotated.api_key}).is_success
    assert admin.delete("/v1/tenants/beta").is_success
    sandbox.state.revoke(rotated.key_id)
    assert admin.post("/v1/tenants/acme/check").is_success  # broken
    assert admin.delete("/v1/tenants/acme").is_success


def check_delivered_in_order(receiver: Receiver, events: list[dict[str, Any]]) -> None:
    """Every event arrived, signed, in the feed's order per tenant; a repeat has its id."""
    for item in receiver.requests():
        verified = receiver.verify(item)
        assert verified["id"] == item.headers["webhook-id"]
    delivered = receiver.delivered()
    assert {event["id"] for event in delivered} == {event["id"] for event in events}
    for tenant in {event["data"]["tenant"] for event in events}:
        expected = [e["id"] for e in events if e["data"]["tenant"] == tenant]
        arrived = [e["id"] for e in delivered if e["data"]["tenant"] == tenant]
        first_arrivals = list(dict.fromkeys(arrived))
        assert first_arrivals == expected, tenant
