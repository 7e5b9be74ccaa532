"""Per-tenant protection (docs/contract.md): Pleo's 429 honoured per tenant, and at most
`BROKER_TENANT_MAX_IN_FLIGHT` of one tenant's requests in flight; the rules alone, then end to
end through the proxy listener against the sandbox's faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox

from broker import errors
from broker.metrics import Metrics
from broker.sandbox import ALL_SCOPES
from broker.throttle import MAX_BACKOFF, TenantThrottle, retry_after_seconds

NOW = datetime(2026, 11, 30, 1, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 30 ", 30.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Mon, 30 Nov 2026 01:00:05 GMT", 5.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),  # already passed
        ("999999", MAX_BACKOFF),
        ("-1", None),
        ("1.5", 1.5),  # fractional: honoured as given (answered rounded up)
        ("0.0", 0.0),
        ("\u00b2", None),  # a superscript two is a digit to str.isdigit, not to HTTP
        ("\u0663", None),  # an Arabic-Indic three
        ("\uff13", None),  # a fullwidth three
        ("1e3", None),
        ("1.", None),
        (".5", None),
        ("+5", None),
        ("9" * 400, MAX_BACKOFF),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, now=NOW) == seconds


def test_a_backed_off_tenant_is_answered_locally_and_others_are_not() -> None:
    metrics = Metrics()
    throttle = TenantThrottle(64, metrics)
    assert throttle.rate_limited("acme", "2") == 2.0
    with pytest.raises(errors.UpstreamRateLimited) as raised:
        throttle.enter("acme")
    assert raised.value.retry_after == 2
    assert raised.value.to_body()["error"]["retry_after"] == 2
    throttle.enter("beta")
    throttle.leave("beta")
    assert throttle.rate_limited("acme", None) is None  # no Retry-After: nothing changes
    assert throttle.rate_limited("beta", "0") == 0.0
    throttle.enter("beta")
    value = metrics.registry.get_sample_value(
        "broker_proxy_throttled_total", {"reason": "upstream_rate_limited"}
    )
    assert value == 1.0


def test_a_shorter_retry_after_never_shortens_a_running_back_off() -> None:
    throttle = TenantThrottle(64, Metrics())
    throttle.rate_limited("acme", "30")
    for value in ("0", "1", "\u00b2", None):
        throttle.rate_limited("acme", value)
    with pytest.raises(errors.UpstreamRateLimited) as raised:
        throttle.enter("acme")
    assert raised.value.retry_after >= 29


def test_the_in_flight_cap_is_per_tenant() -> None:
    throttle = TenantThrottle(2, Metrics())
    throttle.enter("acme")
    throttle.enter("acme")
    with pytest.raises(errors.TenantBusy) as raised:
        throttle.enter("acme")
    assert (raised.value.status, raised.value.retry_after) == (429, 1)
    throttle.enter("beta")
    throttle.leave("acme")
    throttle.enter("acme")
    assert throttle.in_flight("acme") == 2
    for _ in range(2):
        throttle.leave("acme")
    throttle.leave("beta")
    assert throttle.in_flight("acme") == throttle.in_flight("beta") == 0


# -- end to end ---------------------------------------------------------------------------------


def connect_tenants(
    broker: RunningBroker, sandbox: RunningSandbox, *tenants: str
) -> dict[str, str]:
    """Connect each tenant with a key of its own; their key ids."""
    scopes = [s for s in ALL_SCOPES if not s.startswith("accounts:")]
    ids = {}
    for tenant in tenants:
        key = sandbox.state.create_key(scopes=scopes)
        answer = httpx.put(
            f"{broker.admin_url}/v1/tenants/{tenant}/key",
            headers=broker.auth,
            json={"api_key": key.api_key},
        )
        assert answer.status_code == 200, answer.text
        ids[tenant] = key.key_id
    sandbox.state.clear_requests()
    return ids


def seen_by(sandbox: RunningSandbox, key_id: str) -> int:
    return sum(1 for seen in list(sandbox.state.requests) if seen.key_id == key_id)


def get(broker: RunningBroker, tenant: str, path: str = "/v3/export-jobs") -> httpx.Response:
    return httpx.get(broker.proxy_url + path, headers={"X-Broker-Tenant": tenant}, timeout=10)


def add_fault(sandbox: RunningSandbox, **fault: Any) -> None:
    answer = httpx.post(f"{sandbox.url}/_sandbox/faults", json=fault)
    assert answer.status_code == 201, answer.text


def test_pleos_429_backs_off_that_tenant_only(
    broker: RunningBroker, sandbox: RunningSandbox
) -> None:
    ids = connect_tenants(broker, sandbox, "acme", "beta")
    add_fault(sandbox, path_prefix="/v3/", kind="status", status=429, retry_after=2, times=1)
    first = get(broker, "acme")
    limited_at = time.monotonic()
    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"  # Pleo's own answer, relayed
    assert seen_by(sandbox, ids["acme"]) == 1

    local = get(broker, "acme")
    assert local.status_code == 429
    assert local.json()["error"]["code"] == "upstream_rate_limited"
    assert local.headers["retry-after"] in ("1", "2")
    assert local.json()["error"]["retry_after"] == int(local.headers["retry-after"])
    assert seen_by(sandbox, ids["acme"]) == 1  # answered by the broker: Pleo saw no more

    assert get(broker, "beta").status_code == 200  # another tenant goes through meanwhile

    while (answer := get(broker, "acme")).status_code == 429:
        assert answer.json()["error"]["code"] == "upstream_rate_limited"
        assert time.monotonic() - limited_at < 3.0, "the back-off did not end"
        time.sleep(0.05)
    waited = time.monotonic() - limited_at
    assert answer.status_code == 200
    assert 1.9 <= waited < 3.0
    assert seen_by(sandbox, ids["acme"]) == 2  # the 429, then the call after the back-off
    metrics = httpx.get(f"{broker.admin_url}/metrics").text
    assert 'broker_proxy_throttled_total{reason="upstream_rate_limited"}' in metrics


async def test_a_tenants_burst_is_capped_and_others_keep_their_latency(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(tenant_max_in_flight=10)
    ids = connect_tenants(broker, sandbox, "acme", "beta")
    add_fault(sandbox, path_prefix="/v3/export-jobs", kind="latency", latency_ms=1500)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=broker.proxy_url, limits=limits, timeout=20) as client:
        burst = [
            asyncio.create_task(client.get("/v3/export-jobs", headers={"X-Broker-Tenant": "acme"}))
            for _ in range(100)
        ]
        deadline = time.monotonic() + 5
        while seen_by(sandbox, ids["acme"]) < 10 or sum(t.done() for t in burst) < 90:
            assert time.monotonic() < deadline, "the burst did not settle"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        other = await client.post(
            "/v1/vendors:search", headers={"X-Broker-Tenant": "beta"}, json={}
        )
        other_latency = time.monotonic() - started
        answers = await asyncio.gather(*burst)
    assert other.status_code == 200
    assert other_latency < 0.5  # not held behind acme's burst
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 10 and codes.count(429) == 90
    busy = [a for a in answers if a.status_code == 429]
    assert {a.json()["error"]["code"] for a in busy} == {"tenant_busy"}
    assert {a.headers["retry-after"] for a in busy} == {"1"}
    assert seen_by(sandbox, ids["acme"]) == 10
    metrics = (await asyncio.to_thread(httpx.get, f"{broker.admin_url}/metrics")).text
    assert 'broker_proxy_throttled_total{reason="tenant_busy"} 90.0' in metrics
    # once the burst is over, acme's calls are admitted again
    await asyncio.to_thread(httpx.delete, f"{sandbox.url}/_sandbox/faults")
    assert (await asyncio.to_thread(get, broker, "acme")).status_code == 200
