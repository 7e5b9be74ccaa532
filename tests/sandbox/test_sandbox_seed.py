"""Seed data from the control API: a realistic company, the same for the same seed, enough
to run a whole export against."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from support.sandbox_helpers import assert_matches_spec, basic

from broker.sandbox import SandboxKey, SandboxState, create_app

LISTS: list[tuple[str, str, str, Any]] = [
    ("GET", "/v2/employees", "employees-api", None),
    ("POST", "/v1/vendors:search", "external-vendors-api", {}),
    ("POST", "/v0/tax-codes:search", "tax-codes-api", {}),
    ("POST", "/v1/chart-of-accounts:search", "accounts-api", "company"),
    ("GET", "/v0/tag-groups", "tag-groups-api", None),
    ("GET", "/v0/tags", "tags-api", None),
    ("GET", "/v3/export-jobs", "export-api-v3-api", None),
]


async def _seed(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer = await client.post("/_sandbox/seed", json=body)
    assert answer.status_code == 201, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def _everything(client: httpx.AsyncClient, key: SandboxKey) -> list[Any]:
    found = []
    for method, path, spec, body in LISTS:
        answer = await client.request(
            method,
            path,
            params={"company_id": key.company_id, "companyId": key.company_id},
            json={"companyId": key.company_id} if body == "company" else body,
            headers=basic(key.api_key),
        )
        assert answer.status_code == 200, (path, answer.text)
        assert_matches_spec(spec, answer)
        found.append(answer.json()["data"])
    return found


async def test_the_same_seed_gives_the_same_company(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    key = state.create_key()
    first = await _seed(client, key_id=key.key_id, seed=7)
    assert first["counts"] == {
        "employees": 6,
        "vendors": 5,
        "tax_codes": 3,
        "accounts": 8,
        "tag_groups": 2,
        "tags": 5,
    }
    before = await _everything(client, key)
    assert all(before), "every list has seeded records"
    again = await _seed(client, company_id=key.company_id, seed=7)
    assert again == first
    assert await _everything(client, key) == before


async def test_another_seed_or_company_gives_other_ids(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    one, two = state.create_key(), state.create_key()
    job_one = (await _seed(client, key_id=one.key_id, seed=1))["export_job_id"]
    job_two = (await _seed(client, key_id=two.key_id, seed=1))["export_job_id"]
    assert job_one != job_two
    other = SandboxState()
    transport = httpx.ASGITransport(create_app(other))
    async with httpx.AsyncClient(transport=transport, base_url="http://other") as fresh:
        replay = await fresh.post("/_sandbox/seed", json={"company_id": one.company_id, "seed": 1})
        assert replay.json()["export_job_id"] == job_one  # deterministic across sandboxes
        changed = await fresh.post("/_sandbox/seed", json={"company_id": two.company_id, "seed": 2})
        assert changed.json()["export_job_id"] != job_two


async def test_a_whole_export_runs_on_seeded_data(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    key = state.create_key()
    auth = basic(key.api_key)
    job_id = (await _seed(client, key_id=key.key_id))["export_job_id"]
    started = {"jobId": job_id, "event": "started"}
    assert (
        await client.post("/v3/export-job-events", json=started, headers=auth)
    ).status_code == 202
    items = await client.get("/v3/export-items", params={"job_id": job_id}, headers=auth)
    assert_matches_spec("export-items-v3-api", items)
    entries = [item["accountingEntryId"] for item in items.json()["data"]]
    assert len(entries) == 12
    updates = [{"accountingEntryId": e, "status": "successful"} for e in entries]
    put = await client.put(f"/v3/export-jobs/{job_id}/items", json=updates, headers=auth)
    assert len(put.json()["data"]) == 12
    done = {"jobId": job_id, "event": "completed"}
    assert (await client.post("/v3/export-job-events", json=done, headers=auth)).status_code == 202
    job = (await client.get(f"/v3/export-jobs/{job_id}", headers=auth)).json()["data"]
    assert job["status"] == "completed"


async def test_seeding_keeps_an_unfinished_job(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    key = state.create_key()
    first = await _seed(client, key_id=key.key_id, seed=3)
    second = await _seed(client, key_id=key.key_id, seed=4)
    assert second["export_job_id"] == first["export_job_id"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, "company_id"),
        ({"company_id": "nope"}, 400, "UUID"),
        ({"key_id": "key_missing"}, 404, "key_missing"),
        ({"company_id": "4f1c2a7e-8b1d-4c8e-9a57-3b2f1d6e0a11", "seed": "x"}, 400, "seed"),
    ],
)
async def test_bad_seed_requests_say_what_is_wrong(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, words: str
) -> None:
    answer = await client.post("/_sandbox/seed", json=body)
    assert answer.status_code == status
    assert words in answer.json()["message"]
