"""Switchable per-key rate limiting (429 with Retry-After) and key expiry (401 after it)."""

from __future__ import annotations

import httpx
import pytest
from support.sandbox_helpers import basic

from broker.sandbox import SandboxState
from broker.sandbox.state import RateLimit


async def _new_key(client: httpx.AsyncClient, **body: object) -> dict[str, str]:
    answer = await client.post("/_sandbox/keys", json=body)
    assert answer.status_code == 201, answer.text
    return basic(answer.json()["api_key"])


async def test_rate_limiting_is_off_until_switched_on(client: httpx.AsyncClient) -> None:
    auth = await _new_key(client)
    assert (await client.get("/_sandbox/rate-limit")).json() is None
    for _ in range(20):
        assert (await client.get("/v1/introspect", headers=auth)).status_code == 200


async def test_a_key_over_its_rate_gets_429_with_retry_after(client: httpx.AsyncClient) -> None:
    ours, theirs = await _new_key(client), await _new_key(client)
    switched = await client.put(
        "/_sandbox/rate-limit", json={"requests_per_second": 0.01, "burst": 2}
    )
    assert switched.json() == {"requests_per_second": 0.01, "burst": 2}
    statuses = [(await client.get("/v1/introspect", headers=ours)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = await client.get("/v2/employees", headers=ours)
    assert limited.status_code == 429
    assert limited.json()["type"] == "TOO_MANY_REQUESTS"
    assert 1 <= int(limited.headers["Retry-After"]) <= 100  # 1 / 0.01 s for the next token
    assert (await client.get("/v1/introspect", headers=theirs)).status_code == 200  # per key

    assert (await client.delete("/_sandbox/rate-limit")).status_code == 204
    assert (await client.get("/v1/introspect", headers=ours)).status_code == 200


def test_a_bucket_refills_at_the_rate() -> None:
    bucket = RateLimit(per_second=2, burst=1)
    assert bucket.take("k", now=100.0) is None
    assert bucket.take("k", now=100.0) == pytest.approx(0.5)
    assert bucket.take("k", now=100.25) == pytest.approx(0.25)
    assert bucket.take("k", now=100.5) is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "requests_per_second"),
        ({"requests_per_second": 0}, "> 0"),
        ({"requests_per_second": 5, "burst": 0}, "burst"),
        ({"requests_per_second": True}, "requests_per_second"),
    ],
)
async def test_bad_rate_limits_say_what_is_wrong(
    client: httpx.AsyncClient, body: dict[str, object], words: str
) -> None:
    answer = await client.put("/_sandbox/rate-limit", json=body)
    assert answer.status_code == 400 and words in answer.json()["message"]


async def test_a_key_answers_401_after_its_expiry(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    created = await client.post("/_sandbox/keys", json={"expires_in": 3600})
    key_id, auth = created.json()["key_id"], basic(created.json()["api_key"])
    assert created.json()["expires_at"] == state.keys[key_id].expires_at
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 200
    state.keys[key_id].expires_at = 0.0  # the hour has passed
    expired = await client.get("/v1/introspect", headers=auth)
    assert expired.status_code == 401
    assert "expired" in expired.json()["message"]


async def test_a_key_made_to_expire_now_is_refused_at_once(client: httpx.AsyncClient) -> None:
    auth = await _new_key(client, expires_in=0)
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 401
    bad = await client.post("/_sandbox/keys", json={"expires_in": -1})
    assert bad.status_code == 400 and "expires_in" in bad.json()["message"]
