"""Every way a proxied call can end gives back the tenant's in-flight place and the upstream
slot (broker.throttle, broker.upstream): end to end with a cap of one call per tenant, so a
place that leaked shows as `429 tenant_busy` on the next call; a cancelled wait for a slot in
process, where the count itself is read."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import socket
import time
import uuid
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.inprocess import FakePleo, acme_export_jobs_scope
from support.servers import RunningBroker, broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

from broker import wire
from broker.proxy import ProxyApp
from broker.runtime import Broker
from broker.upstream import UPSTREAM_CONNECTIONS

REQUIRED = ["export-jobs:read", "export-jobs:write"]


def connect(broker: RunningBroker, upstream: RecordingUpstream, tenant: str) -> None:
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), [*REQUIRED, "export-items:read"])
    answer = httpx.put(
        f"{broker.admin_url}/v1/tenants/{tenant}/key", headers=broker.auth, json={"api_key": key}
    )
    assert answer.status_code == 200, answer.text


@pytest.fixture
def capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RecordingUpstream, RunningBroker]]:
    """A broker with one upstream slot and one in-flight call per tenant, before a recording
    upstream; tenants acme and beta connected."""
    monkeypatch.setattr("broker.upstream.UPSTREAM_CONNECTIONS", 1)
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    settings = broker_settings(
        url,
        tmp_path / "store",
        required_scopes=REQUIRED,
        tenant_max_in_flight=1,
        upstream_pool_timeout=0.2,
    )
    broker = start_broker(settings)
    try:
        connect(broker, upstream, "acme")
        connect(broker, upstream, "beta")
        yield upstream, broker
    finally:
        upstream.release.set()
        broker.thread.stop()
        thread.stop()


def get(broker: RunningBroker, tenant: str, path: str = "/v3/export-jobs") -> httpx.Response:
    return httpx.get(broker.proxy_url + path, headers={"X-Broker-Tenant": tenant}, timeout=10)


def assert_admitted_again(broker: RunningBroker, *tenants: str) -> None:
    """Each tenant's next call reaches Pleo: its place and the slot were given back (a leak
    would answer tenant_busy or upstream_busy for ever)."""
    for tenant in tenants:
        deadline = time.monotonic() + 5
        while (answer := get(broker, tenant)).status_code != 200:
            assert answer.status_code in (429, 503), answer.text
            assert time.monotonic() < deadline, f"{tenant}: {answer.json()['error']['code']}"
            time.sleep(0.02)


def port(broker: RunningBroker) -> int:
    return int(broker.proxy_url.rsplit(":", 1)[1])


def test_a_response_whose_close_raises_still_gives_the_place_back(
    capped: tuple[RecordingUpstream, RunningBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, broker = capped

    def close(self: wire.Response) -> None:
        raise RuntimeError("close failed")

    monkeypatch.setattr(wire.Response, "close", close)
    get(broker, "acme")
    second = get(broker, "acme")
    assert second.status_code == 200, second.text  # not tenant_busy: the place came back
    monkeypatch.undo()
    assert_admitted_again(broker, "acme", "beta")


def test_a_caller_gone_mid_upload_gives_the_place_back(
    capped: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = capped
    with socket.create_connection(("127.0.0.1", port(broker)), timeout=10) as sock:
        sock.sendall(
            b"PUT /v3/export-jobs/j1/items HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n"
            b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10000\r\n" + b"z" * 0x10000 + b"\r\n10000\r\n" + b"z" * 1000
        )  # ... and the caller goes away mid-chunk
    deadline = time.monotonic() + 5
    while not upstream.seen:
        assert time.monotonic() < deadline, "the upload never reached the upstream"
        time.sleep(0.01)
    assert upstream.seen[-1].complete is False
    assert_admitted_again(broker, "acme", "beta")


def test_a_caller_gone_mid_download_gives_the_place_back(
    capped: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = capped
    with httpx.stream(
        "GET",
        f"{broker.proxy_url}/v3/export-items",
        params={"endless": 1},
        headers={"X-Broker-Tenant": "acme"},
    ) as response:
        assert response.status_code == 200
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > 500_000:
                break
    assert upstream.endless_closed.wait(10)
    assert_admitted_again(broker, "acme", "beta")


def test_upstream_busy_gives_the_place_back(
    capped: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = capped
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(get, broker, "acme", "/v3/export-jobs/held/items")
        deadline = time.monotonic() + 5
        while not upstream.seen:
            assert time.monotonic() < deadline, "the held call never reached the upstream"
            time.sleep(0.01)
        for _ in range(3):  # beta waits for the one slot, in vain
            busy = get(broker, "beta")
            assert (busy.status_code, busy.json()["error"]["code"]) == (503, "upstream_busy")
        upstream.release.set()
        assert held.result().status_code == 200
    assert_admitted_again(broker, "beta", "acme")


async def test_a_cancelled_wait_for_an_upstream_slot_gives_the_place_back(
    inprocess_broker: Broker, inprocess_admin: httpx.AsyncClient, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(scopes=tuple(REQUIRED))
    answer = await inprocess_admin.put("/v1/tenants/acme/key", json={"api_key": key.reveal()})
    assert answer.status_code == 200, answer.text
    app = ProxyApp(inprocess_broker)
    upstream = inprocess_broker.upstream
    for _ in range(UPSTREAM_CONNECTIONS):  # every slot taken: the next call waits
        await upstream.acquire("other")
    scope = acme_export_jobs_scope()
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the caller sends nothing more
        raise AssertionError("not reached")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    call = asyncio.create_task(app(scope, receive, send))
    deadline = time.monotonic() + 5
    while app.throttle.in_flight("acme") != 1:
        assert time.monotonic() < deadline, "the call never took its place"
        await asyncio.sleep(0.01)
    assert not call.done()  # blocked in its wait for a slot (a GET reads no body first)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert app.throttle.in_flight("acme") == 0
    assert not sent
    for _ in range(UPSTREAM_CONNECTIONS):
        upstream.release()


def test_a_trickling_upload_is_bounded_in_total_and_gives_the_place_back(
    tmp_path: Path,
) -> None:
    # Each pause is shorter than BROKER_REQUEST_BODY_TIMEOUT; the whole body is not.
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    settings = broker_settings(
        url,
        tmp_path / "store",
        required_scopes=REQUIRED,
        tenant_max_in_flight=1,
        request_body_timeout=1.0,
    )
    broker = start_broker(settings)
    try:
        connect(broker, upstream, "acme")
        with socket.create_connection(("127.0.0.1", port(broker)), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(
                b"PUT /v3/export-jobs/j1/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"X-Broker-Tenant: acme\r\nContent-Type: application/octet-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            sock.settimeout(0.2)  # a byte every 0.2 s, until the broker answers
            answer = b""
            while not answer:
                assert time.monotonic() - started < 5, "a trickling body was never cut off"
                sock.sendall(b"1\r\nz\r\n")
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
            took = time.monotonic() - started
            sock.settimeout(5)
            while b"request_timeout" not in answer and (more := sock.recv(65536)):
                answer += more
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"request_timeout" in answer
        assert 0.9 <= took < 2.5
        deadline = time.monotonic() + 5
        while not upstream.seen:
            assert time.monotonic() < deadline, "the upload never reached the upstream"
            time.sleep(0.01)
        assert upstream.seen[-1].complete is False  # aborted, never ended as if complete
        assert_admitted_again(broker, "acme")
    finally:
        broker.thread.stop()
        thread.stop()
