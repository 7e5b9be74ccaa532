"""Pleo's answer reaches the caller before the broker's own bookkeeping (issue 14).

At one connection a request's latency is everything the broker does between reading Pleo's
answer and writing it to the caller. The histograms (`broker_upstream_duration_seconds`,
`broker_overhead_seconds`) and giving the upstream connection back to the pool come after
that write; they still happen, once, for every answered call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

import httpx
import pytest
from support.inprocess import FakePleo, acme_export_jobs_scope

from broker.proxy import ProxyApp
from broker.runtime import Broker
from broker.upstream import Upstream

REQUIRED = ("export-jobs:read", "export-jobs:write")
BODY = b'{"data": []}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


class Origin(asyncio.Protocol):
    """Answers every request head with `ANSWER`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self.transport.write(ANSWER)


@pytest.fixture
async def origin_url() -> AsyncIterator[str]:
    server = await asyncio.get_running_loop().create_server(Origin, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def samples(broker: Broker, name: str, labels: dict[str, str] | None = None) -> float:
    value = broker.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_the_answer_is_written_before_the_bookkeeping(
    inprocess_broker: Broker,
    inprocess_admin: httpx.AsyncClient,
    fake_pleo: FakePleo,
    origin_url: str,
) -> None:
    key = fake_pleo.add_key(scopes=REQUIRED)
    answer = await inprocess_admin.put("/v1/tenants/acme/key", json={"api_key": key.reveal()})
    assert answer.status_code == 200, answer.text
    app = ProxyApp(inprocess_broker)
    settings = inprocess_broker.settings.model_copy(update={"pleo_base_url": origin_url})
    app.upstream = Upstream(settings)
    scope = acme_export_jobs_scope()
    upstream_count = "broker_upstream_duration_seconds_count"
    route = {"route": "/v3/export-jobs"}
    seen: list[tuple[str, float, float, int]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the caller sends nothing more
        raise AssertionError("not reached")

    async def send(message: MutableMapping[str, Any]) -> None:
        seen.append(
            (
                message["type"],
                samples(inprocess_broker, upstream_count, route),
                samples(inprocess_broker, "broker_overhead_seconds_count"),
                len(app.upstream.pool._idle),
            )
        )

    try:
        for done in range(2):
            seen.clear()
            await app(scope, receive, send)
            assert seen == [
                ("http.response.start", done, done, 0),
                ("http.response.body", done, done, 0),  # nothing counted, nothing given back
            ]
            # ... and once the answer is out, all of it, once: the connection is kept.
            assert samples(inprocess_broker, upstream_count, route) == done + 1
            assert samples(inprocess_broker, "broker_overhead_seconds_count") == done + 1
            assert len(app.upstream.pool._idle) == 1
    finally:
        await app.upstream.close()
