"""State across calls for the sandbox's newer operations: chart of accounts, tags and tag
groups with dimensions, tax amounts, companies, installations; company scoping and scopes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from support.sandbox_helpers import assert_matches_spec, basic

from broker.sandbox import SandboxKey, SandboxState, create_app

ACCOUNT = {"externalId": "6000", "name": "Travel", "archived": False, "code": "6000"}


@pytest.fixture
def state() -> SandboxState:
    return SandboxState()


@pytest.fixture
def key(state: SandboxState) -> SandboxKey:
    return state.create_key()


@pytest.fixture
async def client(state: SandboxState, key: SandboxKey) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(create_app(state))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://sandbox", headers=basic(key.api_key)
    ) as client:
        yield client


async def test_chart_of_accounts_lifecycle(client: httpx.AsyncClient, key: SandboxKey) -> None:
    body = {**ACCOUNT, "companyId": key.company_id}
    created = await client.post("/v1/chart-of-accounts", json=body)
    assert created.status_code == 201, created.text
    assert_matches_spec("accounts-api", created)
    account_id = created.json()["data"]["id"]
    same = await client.post("/v1/chart-of-accounts", json=body)
    assert (same.status_code, same.json()["data"]["id"]) == (200, account_id)
    clash = await client.post("/v1/chart-of-accounts", json={**body, "name": "Other"})
    assert clash.status_code == 409 and clash.json()["type"] == "EXTERNAL_ID_ALREADY_EXISTS"

    path = f"/v1/chart-of-accounts/{account_id}"
    updated = await client.put(path, json={**body, "name": "Travel & Hotels"})
    assert_matches_spec("accounts-api", updated)
    assert (await client.get(path)).json()["data"]["name"] == "Travel & Hotels"
    searched = await client.post("/v1/chart-of-accounts:search", json={"companyId": key.company_id})
    assert [a["id"] for a in searched.json()["data"]] == [account_id]
    assert (await client.delete(path)).status_code == 204
    gone = await client.get(path)
    assert gone.status_code == 404 and gone.json()["type"] == "CHART_OF_ACCOUNT_NOT_FOUND"


async def test_a_batch_creates_each_account_or_says_why_not(
    client: httpx.AsyncClient, key: SandboxKey
) -> None:
    items = [ACCOUNT, {**ACCOUNT, "externalId": "6100", "name": ""}, ACCOUNT]
    answer = await client.post(
        "/v1/chart-of-accounts/batch", json={"companyId": key.company_id, "items": items}
    )
    assert answer.status_code == 201, answer.text
    assert_matches_spec("accounts-api", answer)
    result = answer.json()["data"]
    assert [a["externalId"] for a in result["created"]] == ["6000"]
    assert [f["reasons"] for f in result["failed"]] == [
        ["NAME_EMPTY"],
        ["EXTERNAL_ID_ALREADY_EXISTS"],
    ]


async def test_tags_live_in_groups_with_dimensions(
    client: httpx.AsyncClient, key: SandboxKey
) -> None:
    company = {"company_id": key.company_id}
    group = await client.post(
        "/v0/tag-groups", params=company, json={"name": "Project", "code": "PRJ", "archived": False}
    )
    group_id = group.json()["data"]["id"]
    dimension = await client.post(
        f"/v0/tag-groups/{group_id}/dimensions",
        json={"name": "Client", "code": "CLI", "displayOrder": 1, "visible": True},
    )
    assert dimension.status_code == 200, dimension.text
    tag = await client.post(
        f"/v0/tag-groups/{group_id}/tags", json={"name": "Apollo", "code": "A1", "archived": False}
    )
    assert tag.status_code == 201, tag.text
    tag_id = tag.json()["data"]["id"]
    assert (await client.get(f"/v0/tags/{tag_id}")).json()["data"]["groupId"] == group_id
    in_group = await client.get(f"/v0/tag-groups/{group_id}/tags")
    assert [t["id"] for t in in_group.json()["data"]] == [tag_id]

    groups = await client.get("/v0/aggregations/tag-groups", params=company)
    assert_matches_spec("tag-groups-api", groups)
    (aggregated,) = groups.json()["data"]
    assert [d["name"] for d in aggregated["dimensions"]] == ["Client"]
    tags = await client.post("/v0/aggregations/tags", params=company, json={"textSearch": "apo"})
    assert_matches_spec("tags-api", tags)
    assert [(t["id"], t["group"]["id"]) for t in tags.json()["data"]] == [(tag_id, group_id)]

    archived = await client.post(
        "/v0/tags/archive",
        json={"companyId": key.company_id, "archived": True, "tagIds": [tag_id]},
    )
    assert_matches_spec("tags-api", archived)
    assert [t["archived"] for t in archived.json()["data"]] == [True]
    hidden = await client.post("/v0/aggregations/tags", params=company, json={})
    assert hidden.json()["data"] == []
    await client.put(f"/v0/tags/{tag_id}", json={"name": "Apollo 2"})
    assert (await client.get(f"/v0/tags/{tag_id}")).json()["data"]["name"] == "Apollo 2"
    assert (await client.delete(f"/v0/tags/{tag_id}")).status_code == 204
    assert (await client.get(f"/v0/tags/{tag_id}")).status_code == 404
    unknown_group = await client.get("/v0/tag-groups/00000000-0000-4000-8000-000000000000/tags")
    assert unknown_group.json()["type"] == "TAG_GROUP_NOT_FOUND"


async def test_tax_amounts_follow_the_tax_codes_type(
    client: httpx.AsyncClient, key: SandboxKey
) -> None:
    ids = {}
    for type_ in ("inclusive", "exclusive", "reverse"):
        made = await client.post(
            "/v0/tax-codes",
            json={
                "companyId": key.company_id,
                "name": type_,
                "rate": 0.25,
                "type": type_,
                "archived": False,
            },
        )
        ids[type_] = made.json()["data"]["id"]
    amount = [{"id": "line-1", "amount": {"currency": "DKK", "minors": 10000}}]
    answer = await client.post(
        "/v0/tax-codes:calculate-tax-amounts",
        json={"amountsByTaxCodeId": {tax_id: amount for tax_id in ids.values()}},
    )
    assert_matches_spec("tax-codes-api", answer)
    taxes = answer.json()["data"]["taxes"]
    minors = {
        type_: {k: v["minors"] for k, v in taxes[ids[type_]][0]["amountTaxBreakdown"].items()}
        for type_ in ids
    }
    assert minors == {
        "inclusive": {"gross": 10000, "net": 8000, "tax": 2000},
        "exclusive": {"gross": 12500, "net": 10000, "tax": 2500},
        "reverse": {"gross": 10000, "net": 10000, "tax": 0},
    }
    path = f"/v0/tax-codes/{ids['reverse']}"
    assert (await client.delete(path)).status_code == 204
    assert (await client.get(path)).status_code == 404


async def test_another_companys_records_are_forbidden(
    client: httpx.AsyncClient, state: SandboxState, key: SandboxKey
) -> None:
    body = {**ACCOUNT, "companyId": key.company_id}
    account_id = (await client.post("/v1/chart-of-accounts", json=body)).json()["data"]["id"]
    other = basic(state.create_key().api_key)
    foreign = await client.get(f"/v1/chart-of-accounts/{account_id}", headers=other)
    assert foreign.status_code == 403 and foreign.json()["type"] == "FORBIDDEN"
    hook = {"endpointUrl": "http://127.0.0.1:9/", "eventTypes": ["v1.export-job.created"]}
    subscription = (await client.post("/v1/subscriptions", json=hook)).json()["data"]
    secret = await client.get(f"/v1/subscriptions/{subscription['id']}/secret", headers=other)
    assert secret.status_code == 403
    listed = await client.get("/v1/companies", headers=other)
    assert [c["id"] for c in listed.json()["data"]] != [key.company_id]


async def test_a_missing_scope_is_403_on_every_new_route(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    narrow = basic(state.create_key(scopes=["users:read"]).api_key)
    for method, path in [
        ("GET", "/v0/tags"),
        ("POST", "/v1/subscriptions"),
        ("POST", "/v1/chart-of-accounts:search"),
        ("POST", "/v2/accounting-entries:enrich"),
    ]:
        answer = await client.request(method, path, headers=narrow, json={})
        assert answer.status_code == 403, (method, path, answer.text)


async def test_the_installation_lifecycle(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/installations/me", json={"metadata": {"erp": {"id": 7}}})
    assert_matches_spec("installations-api", created)
    assert created.json()["status"] == "PENDING_INTEGRATION"
    activated = await client.post("/v1/installations/me:activate")
    assert activated.json()["status"] == "ACTIVATED"
    failed = await client.put(
        "/v1/installations/me", json={"status": "ERROR", "errorCode": "AUTH_ERROR"}
    )
    assert_matches_spec("installations-api", failed)
    assert (failed.json()["status"], failed.json()["errorCode"]) == ("ERROR", "AUTH_ERROR")
    assert failed.json()["metadata"] == {"erp": {"id": 7}}
    assert (await client.delete("/v1/installations/me")).status_code == 204
    assert (await client.get("/v1/installations/me")).status_code == 404  # none until created
    assert (await client.delete("/v1/installations/me")).status_code == 404
    bad = await client.put("/v1/installations/me", json={"status": "DONE"})
    assert bad.status_code == 400


async def test_v2_export_routes_share_v3_jobs(client: httpx.AsyncClient, key: SandboxKey) -> None:
    body = {"companyId": key.company_id, "accountingEntryIds": [str(uuid.uuid4())]}
    created = await client.post("/v2/export-jobs", json=body)
    assert created.status_code == 201
    assert_matches_spec("export-api-v2-api", created)
    job_id = created.json()["data"]["id"]
    assert (await client.get(f"/v3/export-jobs/{job_id}")).json()["data"]["id"] == job_id
    started = await client.post("/v2/export-job-events", json={"jobId": job_id, "event": "started"})
    assert started.status_code == 202
    items = await client.get(f"/v2/export-jobs/{job_id}/items")
    assert_matches_spec("export-api-v2-api", items)
    assert {i["status"] for i in items.json()["data"]} == {"in_progress"}
