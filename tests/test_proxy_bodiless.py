"""Pleo's answers that have no body, passed through the proxy over real sockets: a 304 with
the Content-Length of the full answer, a 204 with one. The caller gets a whole answer and
keeps its connection; the broker counts the status Pleo gave, not a 500 of its own."""

from __future__ import annotations

import secrets
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.servers import RunningBroker, broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

pytestmark = pytest.mark.real

REQUIRED = ["export-jobs:read", "export-jobs:write"]
BODILESS = "/v3/export-jobs/{status}/items"


class BodilessUpstream(RecordingUpstream):
    """Answers `/v3/export-jobs/304/items` 304 and `/v3/export-jobs/204/items` 204, each
    with a Content-Length and no body; everything else as the recording upstream does."""

    async def _answer(self, path: str, send: Any) -> None:
        for status in (204, 304):
            if path == BODILESS.format(status=status):
                headers = [(b"etag", b'"v7"'), (b"content-length", b"1234")]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await super()._answer(path, send)


@pytest.fixture
def bodiless(tmp_path: Path) -> Iterator[RunningBroker]:
    upstream = BodilessUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    broker = start_broker(broker_settings(url, tmp_path / "store", required_scopes=REQUIRED))
    try:
        connected = httpx.put(
            f"{broker.admin_url}/v1/tenants/acme/key", headers=broker.auth, json={"api_key": key}
        )
        assert connected.status_code == 200, connected.text
        yield broker
    finally:
        broker.thread.stop()
        thread.stop()


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert rest == b"", rest  # nothing after the head: the answer has no body
    return head


@pytest.mark.parametrize("status", [304, 204])
def test_a_bodiless_answer_with_a_content_length_is_passed_through_whole(
    bodiless: RunningBroker, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    target = BODILESS.format(status=status).encode()
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n" % target
    with socket.create_connection(("127.0.0.1", bodiless.proxy_port), timeout=5) as sock:
        sock.sendall(request + b'If-None-Match: "v7"\r\n\r\n')
        first = read_head(sock)
        # The connection is kept: a second request on it is answered too.
        sock.sendall(request + b"\r\n")
        second = read_head(sock)
    for head in (first, second):
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        assert b"transfer-encoding" not in head.lower()
    assert b'etag: "v7"' in first.lower()
    assert not [r for r in caplog.records if r.getMessage() == "proxy.internal_error"]
    metrics = httpx.get(f"{bodiless.admin_url}/metrics").text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("broker_proxy_requests_total{") and 'route="/v3/export-jobs' in line
    ]
    assert counted and all(f'code="{status}"' in line for line in counted), counted
