"""The Pleo sandbox in process: Pleo's shapes (checked against the OpenAPI specs), auth,
scopes, company scoping, the export workflow, pagination, faults and the control API."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx
import pytest
from support.sandbox_helpers import assert_matches_spec, basic

from broker.sandbox import SandboxKey, SandboxState, create_app

ENTRY_IDS = [str(uuid.uuid4()) for _ in range(3)]


@pytest.fixture
def key(state: SandboxState) -> SandboxKey:
    return state.create_key()


@pytest.fixture
def auth(key: SandboxKey) -> dict[str, str]:
    return basic(key.api_key)


def assert_pleo_error(response: httpx.Response, status: int, type_: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "message"} and body["message"]
    if type_ is not None:
        assert body["type"] == type_


# shapes, validated against Pleo's OpenAPI specs


async def test_key_and_company_endpoints_match_the_specs(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str]
) -> None:
    introspect = await client.get("/v1/introspect", headers=auth)
    assert_matches_spec("external-clients-api", introspect)
    assert introspect.json()["data"]["subjectURN"] == f"urn:pleo:company:{key.company_id}"
    assert introspect.json()["data"]["authMethod"] == "API_KEY"
    assert set(introspect.json()["data"]["scope"].split(" ")) == set(key.scopes)

    installation = await client.get("/v1/installations/me", headers=auth)
    assert_matches_spec("installations-api", installation)
    assert installation.json()["resource"] == f"urn:pleo:company:{key.company_id}"

    company = await client.get(f"/v1/companies/{key.company_id}", headers=auth)
    assert_matches_spec("companies-api", company)
    assert company.json()["data"]["id"] == key.company_id


async def test_employees_match_the_spec(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str]
) -> None:
    listed = await client.get("/v2/employees", params={"companyId": key.company_id}, headers=auth)
    assert_matches_spec("employees-api", listed)
    employees = listed.json()["data"]
    assert employees and {e["companyId"] for e in employees} == {key.company_id}

    one = await client.get(f"/v2/employees/{employees[0]['id']}", headers=auth)
    assert_matches_spec("employees-api", one)
    assert one.json()["data"] == employees[0]

    by_email = await client.get(
        "/v2/employees", params={"email": employees[1]["email"]}, headers=auth
    )
    assert by_email.json()["data"] == [employees[1]]


async def test_vendors_match_the_spec_and_custom_verbs_route(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str]
) -> None:
    vendor_body = {
        "companyId": key.company_id,
        "name": "Acme ApS",
        "defaultCurrency": "DKK",
        "externalId": "V-1",
        "country": "DK",
    }
    created = await client.post("/v1/vendors", json=vendor_body, headers=auth)
    assert created.status_code == 201
    assert_matches_spec("external-vendors-api", created)
    vendor_id = created.json()["data"]["id"]

    duplicate = await client.post("/v1/vendors", json=vendor_body, headers=auth)
    assert_pleo_error(duplicate, 409)

    updated = await client.put(
        f"/v1/vendors/{vendor_id}",
        json={**vendor_body, "name": "Acme A/S", "state": "ACTIVE"},
        headers=auth,
    )
    assert_matches_spec("external-vendors-api", updated)
    assert updated.json()["data"]["name"] == "Acme A/S"

    searched = await client.post(
        "/v1/vendors:search",
        params={"company_id": key.company_id},
        json={"name": "acme"},
        headers=auth,
    )
    assert_matches_spec("external-vendors-api", searched)
    assert [v["id"] for v in searched.json()["data"]] == [vendor_id]

    # `{id}` must not swallow the `:archive` verb
    not_a_vendor = await client.get(f"/v1/vendors/{vendor_id}:archive", headers=auth)
    assert not_a_vendor.status_code in (404, 405)
    archived = await client.post(f"/v1/vendors/{vendor_id}:archive", headers=auth)
    assert archived.status_code == 204
    fetched = await client.get(f"/v1/vendors/{vendor_id}", headers=auth)
    assert_matches_spec("external-vendors-api", fetched)
    assert fetched.json()["data"]["state"] == "ARCHIVED"

    missing_company = await client.post("/v1/vendors:search", json={}, headers=auth)
    assert_pleo_error(missing_company, 400)


async def test_tax_codes_and_tag_groups_match_the_specs(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str]
) -> None:
    tax_code = await client.post(
        "/v0/tax-codes",
        json={
            "companyId": key.company_id,
            "name": "VAT 25%",
            "rate": 0.25,
            "type": "inclusive",
            "archived": False,
        },
        headers=auth,
    )
    assert_matches_spec("tax-codes-api", tax_code)
    tax_code_id = tax_code.json()["data"]["id"]
    searched = await client.post("/v0/tax-codes:search", json={"type": "inclusive"}, headers=auth)
    assert_matches_spec("tax-codes-api", searched)
    assert [t["id"] for t in searched.json()["data"]] == [tax_code_id]
    fetched = await client.get(f"/v0/tax-codes/{tax_code_id}", headers=auth)
    assert_matches_spec("tax-codes-api", fetched)

    group = await client.post(
        "/v0/tag-groups",
        params={"company_id": key.company_id},
        json={"name": "Department", "code": "DEP", "archived": False},
        headers=auth,
    )
    assert_matches_spec("tag-groups-api", group)
    group_id = group.json()["data"]["id"]
    listed = await client.get("/v0/tag-groups", params={"company_id": key.company_id}, headers=auth)
    assert_matches_spec("tag-groups-api", listed)
    assert [g["id"] for g in listed.json()["data"]] == [group_id]
    fetched_group = await client.get(f"/v0/tag-groups/{group_id}", headers=auth)
    assert_matches_spec("tag-groups-api", fetched_group)

    bad = await client.post("/v0/tax-codes", json={"companyId": key.company_id}, headers=auth)
    assert_pleo_error(bad, 400, "INVALID_REQUEST")


# the export workflow


async def create_job(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str], entries: list[str]
) -> httpx.Response:
    body = {"companyId": key.company_id, "accountingEntryIds": entries}
    return await client.post("/v3/export-jobs", json=body, headers=auth)


async def test_export_workflow(
    client: httpx.AsyncClient, key: SandboxKey, auth: dict[str, str]
) -> None:
    created = await create_job(client, key, auth, ENTRY_IDS)
    assert created.status_code == 201
    assert_matches_spec("export-api-v3-api", created)
    job = created.json()["data"]
    assert (job["status"], job["numberOfItems"], job["companyId"]) == ("pending", 3, key.company_id)

    second = await create_job(client, key, auth, ENTRY_IDS)
    assert_pleo_error(second, 409, "EXPORT_ALREADY_IN_PROGRESS")
    assert_matches_spec("export-api-v3-api", second)

    event = {"jobId": job["id"], "event": "started"}
    started = await client.post("/v3/export-job-events", json=event, headers=auth)
    assert started.status_code == 202
    assert_matches_spec("export-api-v3-api", started)
    again = await client.post("/v3/export-job-events", json=event, headers=auth)
    assert_pleo_error(again, 422, "INVALID_EXPORT_JOB_STATUS_CHANGE")

    fetched = await client.get(f"/v3/export-jobs/{job['id']}", headers=auth)
    assert_matches_spec("export-api-v3-api", fetched)
    assert fetched.json()["data"]["status"] == "in_progress"

    listed = await client.get("/v3/export-jobs", params={"statuses": "in_progress"}, headers=auth)
    assert_matches_spec("export-api-v3-api", listed)
    assert [j["id"] for j in listed.json()["data"]] == [job["id"]]

    export_items = await client.get("/v3/export-items", params={"job_id": job["id"]}, headers=auth)
    assert_matches_spec("export-items-v3-api", export_items)
    assert {i["accountingEntryId"] for i in export_items.json()["data"]} == set(ENTRY_IDS)

    items = await client.get(f"/v3/export-jobs/{job['id']}/items", headers=auth)
    assert_matches_spec("export-api-v3-api", items)
    assert {i["status"] for i in items.json()["data"]} == {"in_progress"}

    unknown_entry = str(uuid.uuid4())
    updates = [
        {"accountingEntryId": entry, "status": "successful", "externalId": f"ERP-{n}"}
        for n, entry in enumerate([*ENTRY_IDS, unknown_entry])
    ]
    put = await client.put(f"/v3/export-jobs/{job['id']}/items", json=updates, headers=auth)
    assert_matches_spec("export-api-v3-api", put)
    assert len(put.json()["data"]) == 3
    assert [e["accountingEntryId"] for e in put.json()["errors"]] == [unknown_entry]

    too_many = [{"accountingEntryId": ENTRY_IDS[0], "status": "successful"}] * 101
    rejected = await client.put(f"/v3/export-jobs/{job['id']}/items", json=too_many, headers=auth)
    assert_pleo_error(rejected, 413, "EXPORT_JOB_ITEMS_UPDATE_LIMIT")
    assert_matches_spec("export-api-v3-api", rejected)

    completed = await client.post(
        "/v3/export-job-events", json={"jobId": job["id"], "event": "completed"}, headers=auth
    )
    assert completed.status_code == 202
    finished = await client.get("/v3/export-items", params={"job_id": job["id"]}, headers=auth)
    assert_pleo_error(finished, 422, "EXPORT_JOB_STATUS_UNPROCESSABLE")
    late_put = await client.put(f"/v3/export-jobs/{job['id']}/items", json=updates, headers=auth)
    assert_pleo_error(late_put, 422)

    # a finished job no longer blocks a new one
    assert (await create_job(client, key, auth, ENTRY_IDS[:1])).status_code == 201

    unknown = await client.get(f"/v3/export-jobs/{uuid.uuid4()}", headers=auth)
    assert_pleo_error(unknown, 404, "EXPORT_NOT_FOUND")
    assert_matches_spec("export-api-v3-api", unknown)


async def test_another_companys_job_is_forbidden(
    client: httpx.AsyncClient, state: SandboxState, key: SandboxKey, auth: dict[str, str]
) -> None:
    job_id = (await create_job(client, key, auth, ENTRY_IDS)).json()["data"]["id"]
    other = basic(state.create_key().api_key)
    assert_pleo_error(await client.get(f"/v3/export-jobs/{job_id}", headers=other), 403)
    listed = await client.get("/v3/export-jobs", headers=other)
    assert listed.json()["data"] == []


# pagination


async def test_pagination_walks_forward_and_back(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    everyone = (await client.get("/v2/employees", headers=auth)).json()["data"]
    assert len(everyone) == 5

    first = (await client.get("/v2/employees", params={"limit": 2}, headers=auth)).json()
    assert first["data"] == everyone[:2]
    paging = first["pagination"]
    assert paging["hasNextPage"] and not paging["hasPreviousPage"] and paging["total"] == 5
    assert paging["currentRequestPagination"]["limit"] == 2
    for cursor in (paging["startCursor"], paging["endCursor"]):
        assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=~")

    params = {"limit": 2, "after": paging["endCursor"]}
    second = (await client.get("/v2/employees", params=params, headers=auth)).json()
    assert second["data"] == everyone[2:4]
    assert second["pagination"]["hasPreviousPage"] and second["pagination"]["hasNextPage"]

    params = {"limit": 2, "before": second["pagination"]["startCursor"]}
    back = (await client.get("/v2/employees", params=params, headers=auth)).json()
    assert back["data"] == everyone[:2]

    last = (await client.get("/v2/employees", params={"offset": 4}, headers=auth)).json()
    assert last["data"] == everyone[4:] and not last["pagination"]["hasNextPage"]

    by_name = await client.get(
        "/v2/employees",
        params={"sorting_keys": "firstName", "sorting_order": "DESC"},
        headers=auth,
    )
    names = [e["firstName"] for e in by_name.json()["data"]]
    assert names == sorted(names, reverse=True)


@pytest.mark.parametrize(
    "params",
    [
        {"before": "GE======", "after": "GE======"},
        {"before": "GE======", "offset": "1"},
        {"after": "not-a-cursor"},
        {"offset": "-1"},
        {"limit": "many"},
        {"sorting_keys": "email", "sorting_order": "SIDEWAYS"},
    ],
)
async def test_bad_pagination_is_400(
    client: httpx.AsyncClient, auth: dict[str, str], params: dict[str, str]
) -> None:
    assert_pleo_error(await client.get("/v2/employees", params=params, headers=auth), 400)


# authentication, scopes, companies


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer {key}", id="bearer"),
        pytest.param("Token {key}", id="other-scheme"),
        pytest.param("Basic !!!not-base64!!!", id="malformed-base64"),
        pytest.param("Basic " + _b64("no-colon"), id="no-colon"),
        pytest.param("Basic " + _b64("pik_unknown:"), id="unknown-key"),
        pytest.param("Basic {b64_key_with_password}", id="password-given"),
    ],
)
async def test_bad_credentials_are_401(
    client: httpx.AsyncClient, key: SandboxKey, authorization: str | None
) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization.format(
            key=key.api_key, b64_key_with_password=_b64(f"{key.api_key}:secret")
        )
    response = await client.get("/v1/introspect", headers=headers)
    assert_pleo_error(response, 401, "UNAUTHORIZED")
    assert key.api_key not in response.text


async def test_two_authorization_headers_are_401(
    client: httpx.AsyncClient, state: SandboxState, key: SandboxKey, auth: dict[str, str]
) -> None:
    headers = [("Authorization", auth["Authorization"])] * 2
    assert_pleo_error(await client.get("/v1/introspect", headers=headers), 401)
    assert state.requests[-1].authorization_count == 2


async def test_revoked_key_is_401(
    client: httpx.AsyncClient, state: SandboxState, key: SandboxKey, auth: dict[str, str]
) -> None:
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 200
    state.revoke(key.key_id)
    assert_pleo_error(await client.get("/v1/introspect", headers=auth), 401)


async def test_scopes_gate_routes_and_can_change(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    key = state.create_key(scopes=["export-jobs:read"])
    auth = basic(key.api_key)
    assert (await client.get("/v3/export-jobs", headers=auth)).status_code == 200
    assert_pleo_error(await client.get("/v2/employees", headers=auth), 403, "FORBIDDEN")
    # introspection needs no scope
    introspected = await client.get("/v1/introspect", headers=auth)
    assert introspected.json()["data"]["scope"] == "export-jobs:read"

    state.set_scopes(key.key_id, ["users:read"])
    assert (await client.get("/v2/employees", headers=auth)).status_code == 200
    assert_pleo_error(await client.get("/v3/export-jobs", headers=auth), 403)
    introspected = await client.get("/v1/introspect", headers=auth)
    assert introspected.json()["data"]["scope"] == "users:read"


FOREIGN = "0f6e1c9a-3b1d-4d8e-9a57-2c1b9f0e7d11"


@pytest.mark.parametrize(
    ("method", "path", "params", "body"),
    [
        ("GET", f"/v1/companies/{FOREIGN}", {}, None),
        ("GET", "/v3/export-jobs", {"company_id": FOREIGN}, None),
        ("GET", "/v2/employees", {"companyId": FOREIGN}, None),
        ("POST", "/v3/export-jobs", {}, {"companyId": FOREIGN, "accountingEntryIds": []}),
        ("POST", "/v1/vendors:search", {"company_id": FOREIGN}, {}),
        ("GET", "/v0/tag-groups", {"organization_id": FOREIGN}, None),
    ],
)
async def test_foreign_company_or_organisation_is_403(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    method: str,
    path: str,
    params: dict[str, str],
    body: dict[str, Any] | None,
) -> None:
    response = await client.request(method, path, params=params, json=body, headers=auth)
    assert_pleo_error(response, 403, "FORBIDDEN")


async def test_a_body_labelled_otherwise_is_still_company_checked(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    body = b'{"companyId": "%s", "accountingEntryIds": []}' % FOREIGN.encode()
    headers = {**auth, "Content-Type": "text/plain"}
    response = await client.post("/v3/export-jobs", content=body, headers=headers)
    assert_pleo_error(response, 403)


async def test_custom_auth_method_and_subject(
    client: httpx.AsyncClient, state: SandboxState
) -> None:
    organisation = str(uuid.uuid4())
    key = state.create_key(
        auth_method="OAUTH2", subject_urn=f"urn:pleo:organisation:{organisation}"
    )
    auth = basic(key.api_key)
    data = (await client.get("/v1/introspect", headers=auth)).json()["data"]
    assert (data["authMethod"], data["subjectURN"]) == (
        "OAUTH2",
        f"urn:pleo:organisation:{organisation}",
    )
    own = await client.get("/v0/tag-groups", params={"organization_id": organisation}, headers=auth)
    assert own.status_code == 200


async def test_unknown_path_and_method(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    assert_pleo_error(await client.get("/v9/nothing", headers=auth), 404, "NOT_FOUND")
    assert_pleo_error(await client.delete("/v1/introspect", headers=auth), 405)


# faults


async def test_status_faults_with_retry_after_and_times(
    client: httpx.AsyncClient, state: SandboxState, auth: dict[str, str]
) -> None:
    state.add_fault("/v3/", "status", status=429, times=1)
    limited = await client.get("/v3/export-jobs", headers=auth)
    assert_pleo_error(limited, 429, "TOO_MANY_REQUESTS")
    assert limited.headers["Retry-After"] == "1"
    assert (await client.get("/v3/export-jobs", headers=auth)).status_code == 200

    state.add_fault("/v3/", "status", status=503, retry_after=7)
    assert (await client.get("/v2/employees", headers=auth)).status_code == 200
    for _ in range(2):
        unavailable = await client.get("/v3/export-jobs", headers=auth)
        assert_pleo_error(unavailable, 503)
        assert unavailable.headers["Retry-After"] == "7"
    state.clear_faults()
    assert (await client.get("/v3/export-jobs", headers=auth)).status_code == 200


async def test_latency_fault_delays(
    client: httpx.AsyncClient, state: SandboxState, auth: dict[str, str]
) -> None:
    state.add_fault("/v1/introspect", "latency", latency_ms=150, times=1)
    began = time.monotonic()
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 200
    assert time.monotonic() - began >= 0.15
    began = time.monotonic()
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 200
    assert time.monotonic() - began < 0.15


async def test_drop_fault_in_process_is_a_transport_error(
    client: httpx.AsyncClient, state: SandboxState, auth: dict[str, str]
) -> None:
    state.add_fault("/v1/", "drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get("/v1/introspect", headers=auth)
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 200


def test_add_fault_rejects_nonsense(state: SandboxState) -> None:
    with pytest.raises(ValueError, match="status"):
        state.add_fault("/", "status", status=418)
    with pytest.raises(ValueError, match="kind"):
        state.add_fault("/", "explode")  # type: ignore[arg-type]


# the request log


async def test_request_log_never_holds_the_key(
    client: httpx.AsyncClient, state: SandboxState, key: SandboxKey, auth: dict[str, str]
) -> None:
    headers = {**auth, "X-Request-Id": "r-1", "Proxy-Authorization": f"Basic {key.api_key}"}
    await client.get("/v3/export-jobs", params={"limit": 1}, headers=headers)
    seen = state.requests[-1]
    assert (seen.method, seen.path, seen.query) == ("GET", "/v3/export-jobs", "limit=1")
    assert seen.authorization_count == 1 and seen.authorization_matched
    assert seen.key_id == key.key_id
    assert seen.header_values("x-request-id") == ["r-1"]
    assert seen.header_values("x-broker-tenant") == []
    assert all(name != "authorization" for name, _ in seen.headers)

    logged = await client.get("/_sandbox/requests")
    assert logged.json()["requests"][-1]["authorization_count"] == 1
    for text in (repr(state.requests), logged.text, repr(key)):
        assert key.api_key not in text
        assert _b64(f"{key.api_key}:") not in text

    assert (await client.delete("/_sandbox/requests")).status_code == 204
    assert not state.requests


async def test_request_log_is_bounded() -> None:
    state = SandboxState(request_log_size=3)
    transport = httpx.ASGITransport(create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        for n in range(5):
            await client.get(f"/v1/introspect?n={n}")
    assert [seen.query for seen in state.requests] == ["n=2", "n=3", "n=4"]


# the control API


async def test_control_api_manages_keys(client: httpx.AsyncClient) -> None:
    company_id = str(uuid.uuid4())
    created = await client.post(
        "/_sandbox/keys", json={"company_id": company_id, "scopes": ["users:read"]}
    )
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"key_id", "api_key", "company_id", "scopes", "client_id", "expires_at"}
    assert (body["company_id"], body["scopes"]) == (company_id, ["users:read"])
    auth = basic(body["api_key"])
    assert (await client.get("/v2/employees", headers=auth)).status_code == 200

    rescoped = await client.put(
        f"/_sandbox/keys/{body['key_id']}/scopes", json={"scopes": ["vendors:read"]}
    )
    assert rescoped.status_code == 200 and rescoped.json()["scopes"] == ["vendors:read"]
    assert body["api_key"] not in rescoped.text
    assert (await client.get("/v2/employees", headers=auth)).status_code == 403

    revoked = await client.post(f"/_sandbox/keys/{body['key_id']}/revoke")
    assert revoked.status_code == 204
    assert (await client.get("/v1/introspect", headers=auth)).status_code == 401

    assert_pleo_error(await client.post("/_sandbox/keys/key_nope/revoke"), 404, "KEY_NOT_FOUND")


async def test_control_api_issues_keys_without_a_subject_and_for_a_given_client(
    client: httpx.AsyncClient,
) -> None:
    company_id = str(uuid.uuid4())
    organisation = f"urn:pleo:organisation:{uuid.uuid4()}"
    created = await client.post(
        "/_sandbox/keys",
        json={
            "company_id": company_id,
            "client_id": "client-of-acme-erp",
            "subject_in_introspection": False,
        },
    )
    assert created.status_code == 201 and created.json()["client_id"] == "client-of-acme-erp"
    auth = basic(created.json()["api_key"])
    introspect = await client.get("/v1/introspect", headers=auth)
    assert_matches_spec("external-clients-api", introspect)
    assert "subjectURN" not in introspect.json()["data"]
    assert introspect.json()["data"]["clientId"] == "client-of-acme-erp"
    installation = await client.get("/v1/installations/me", headers=auth)
    assert_matches_spec("installations-api", installation)
    assert installation.json()["resource"] == f"urn:pleo:company:{company_id}"

    elsewhere = await client.post(
        "/_sandbox/keys",
        json={"subject_in_introspection": False, "installation_resource": organisation},
    )
    auth = basic(elsewhere.json()["api_key"])
    installation = await client.get("/v1/installations/me", headers=auth)
    assert installation.json()["resource"] == organisation


async def test_control_api_manages_faults(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    added = await client.post(
        "/_sandbox/faults", json={"path_prefix": "/v2/", "kind": "status", "status": 500}
    )
    assert added.status_code == 201 and added.json()["kind"] == "status"
    assert_pleo_error(await client.get("/v2/employees", headers=auth), 500)
    # the control API itself is never faulted
    assert (await client.get("/_sandbox/health")).status_code == 200
    assert (await client.delete("/_sandbox/faults")).status_code == 204
    assert (await client.get("/v2/employees", headers=auth)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_sandbox/keys", {"company_id": "not-a-uuid"}),
        ("/_sandbox/keys", {"scopes": "vendors:read"}),
        ("/_sandbox/keys", {"scopes": ["everything"]}),
        ("/_sandbox/keys", {"auth_method": "MAGIC"}),
        ("/_sandbox/keys", {"subject_urn": "company:1"}),
        ("/_sandbox/keys", {"client_id": 7}),
        ("/_sandbox/keys", {"subject_in_introspection": "no"}),
        ("/_sandbox/keys", {"installation_resource": "company:1"}),
        ("/_sandbox/faults", {"kind": "explode"}),
        ("/_sandbox/faults", {"kind": "status", "status": 418}),
        ("/_sandbox/faults", {"kind": "status"}),
        ("/_sandbox/faults", {"kind": "latency"}),
        ("/_sandbox/faults", {"kind": "drop", "times": 0}),
        ("/_sandbox/faults", {"kind": "drop", "path_prefix": "v1"}),
        ("/_sandbox/faults", ["not", "an", "object"]),
    ],
)
async def test_control_api_rejects_bad_input(
    client: httpx.AsyncClient, path: str, body: Any
) -> None:
    assert_pleo_error(await client.post(path, json=body), 400, "INVALID_REQUEST")


async def test_control_api_rejects_non_json(client: httpx.AsyncClient) -> None:
    assert_pleo_error(await client.post("/_sandbox/keys", content=b"{nope"), 400)
