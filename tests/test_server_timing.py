"""`Server-Timing` on every proxied answer and `broker_overhead_seconds` (issue 14).

Each proxied answer says how long the broker itself spent (`broker;dur`) and how long it
waited for Pleo's answer headers (`pleo;dur`), in milliseconds; the broker's own refusals
carry only `broker;dur`. Durations are checked against bounds the test measures itself.
"""

from __future__ import annotations

import concurrent.futures
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.servers import RunningBroker, broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

REQUIRED = ["export-jobs:read", "export-jobs:write"]
TENANT = {"X-Broker-Tenant": "acme"}
TIMING = re.compile(r"^broker;dur=(\d+\.\d{3}), pleo;dur=(\d+\.\d{3})$")


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[RecordingUpstream, RunningBroker]]:
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), REQUIRED)
    broker = start_broker(broker_settings(url, tmp_path / "store", required_scopes=REQUIRED))
    try:
        response = httpx.put(
            f"{broker.admin_url}/v1/tenants/acme/key", headers=broker.auth, json={"api_key": key}
        )
        assert response.status_code == 200, response.text
        yield upstream, broker
    finally:
        broker.thread.stop()
        thread.stop()


def timings(response: httpx.Response) -> tuple[float, float]:
    values = response.headers.get_list("server-timing")
    assert len(values) == 1, values
    match = TIMING.match(values[0])
    assert match, values[0]
    return float(match.group(1)), float(match.group(2))


def test_a_proxied_answer_says_where_its_time_went(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    began = time.perf_counter()
    response = httpx.get(f"{broker.proxy_url}/v3/export-jobs/1/items", headers=TENANT)
    elapsed_ms = (time.perf_counter() - began) * 1000
    assert response.status_code == 200
    broker_ms, pleo_ms = timings(response)
    assert broker_ms > 0 and pleo_ms > 0
    assert broker_ms + pleo_ms <= elapsed_ms


def test_the_wait_for_pleo_is_counted_as_pleo_not_broker(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    upstream, broker = recording
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        began = time.perf_counter()
        pending = pool.submit(
            httpx.get, f"{broker.proxy_url}/v3/export-jobs/held/items", headers=TENANT
        )
        deadline = time.monotonic() + 10
        while not any(s.raw_path.endswith(b"/held/items") for s in upstream.seen):
            assert time.monotonic() < deadline, "the request never reached the upstream"
            time.sleep(0.005)  # polling for the upstream to see the request
        seen_ms = (time.perf_counter() - began) * 1000
        # Hold the answer for as long as the request took to arrive, at least 50 ms.
        while (time.perf_counter() - began) * 1000 < max(2 * seen_ms, seen_ms + 50):
            time.sleep(0.005)  # the upstream holds its answer meanwhile
        held_ms = (time.perf_counter() - began) * 1000 - seen_ms
        upstream.release.set()
        response = pending.result(10)
    assert response.status_code == 200
    broker_ms, pleo_ms = timings(response)
    assert pleo_ms >= held_ms
    assert broker_ms < pleo_ms


def test_a_refusal_carries_only_the_brokers_part(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    for headers in ({"X-Broker-Tenant": "nobody"}, {}):
        response = httpx.get(f"{broker.proxy_url}/v3/export-jobs/1/items", headers=headers)
        assert response.status_code in (400, 404), response.text
        values = response.headers.get_list("server-timing")
        assert len(values) == 1 and re.fullmatch(r"broker;dur=\d+\.\d{3}", values[0]), values


def test_overhead_is_a_histogram_beside_the_upstream_one(
    recording: tuple[RecordingUpstream, RunningBroker],
) -> None:
    _, broker = recording
    for _ in range(3):
        httpx.get(f"{broker.proxy_url}/v3/export-jobs/1/items", headers=TENANT)
    httpx.get(f"{broker.proxy_url}/v3/export-jobs/1/items", headers={"X-Broker-Tenant": "nobody"})
    text = httpx.get(f"{broker.admin_url}/metrics").text
    assert "# TYPE broker_overhead_seconds histogram" in text
    assert "broker_overhead_seconds_count 4.0" in text
    assert 'broker_overhead_seconds_bucket{le="0.0005"}' in text
