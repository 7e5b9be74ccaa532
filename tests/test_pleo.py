from __future__ import annotations

import base64
import secrets

import httpx
import pytest
import respx

from broker import errors
from broker.pleo import (
    PleoClient,
    PleoError,
    PleoKeyRejected,
    PleoUnexpectedAnswer,
    PleoUnreachable,
    basic_auth,
    explain,
)
from broker.records import ApiKey

BASE = "https://pleo.test"
COMPANY = "7b2c1a52-7b9f-4c1e-9a65-3f0d2b8c75ab"


def _key() -> ApiKey:
    return ApiKey("pik_" + secrets.token_hex(16))


def _introspection(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "authMethod": "API_KEY",
        "clientId": "client-1",
        "scope": "export-jobs:read export-jobs:write",
        "applicationName": "Acme ERP",
        "subjectURN": f"urn:pleo:company:{COMPANY.upper()}",
    }
    data.update(overrides)
    return {"data": data}


def test_basic_auth_is_key_as_user_with_empty_password() -> None:
    key = ApiKey("abc")
    assert basic_auth(key) == "Basic " + base64.b64encode(b"abc:").decode()


@respx.mock
async def test_introspect_sends_basic_auth_and_parses_the_answer() -> None:
    key = _key()
    route = respx.get(f"{BASE}/v1/introspect").respond(200, json=_introspection())
    client = PleoClient(BASE)
    try:
        info = await client.introspect(key)
    finally:
        await client.aclose()
    sent = route.calls.last.request
    assert sent.headers["authorization"] == basic_auth(key)
    assert info.auth_method == "API_KEY"
    assert info.company_id == COMPANY  # lower-cased
    assert info.scopes == frozenset({"export-jobs:read", "export-jobs:write"})
    assert info.application_name == "Acme ERP"


@pytest.mark.parametrize("status", [401, 403])
@respx.mock
async def test_rejected_key(status: int) -> None:
    respx.get(f"{BASE}/v1/introspect").respond(status, json={"type": "UNAUTHORIZED"})
    client = PleoClient(BASE)
    with pytest.raises(PleoKeyRejected) as caught:
        await client.introspect(_key())
    await client.aclose()
    assert caught.value.status == status


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500),
        httpx.Response(503),
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(407, headers={"Proxy-Authenticate": "Basic"}),  # the egress proxy
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
)
@respx.mock
async def test_unavailable(answer: httpx.Response | Exception) -> None:
    route = respx.get(f"{BASE}/v1/introspect")
    if isinstance(answer, Exception):
        route.side_effect = answer
    else:
        route.return_value = answer
    client = PleoClient(BASE)
    with pytest.raises(PleoUnreachable):
        await client.introspect(_key())
    await client.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, json={"type": "NOT_FOUND"}),
        httpx.Response(302, headers={"Location": "https://elsewhere.test/"}),
        httpx.Response(200, text="<html>maintenance</html>"),
        httpx.Response(200, json={"data": {"scope": "x"}}),
        httpx.Response(200, json={"data": {"authMethod": "API_KEY", "scope": 7}}),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
@respx.mock
async def test_unexpected_answers(answer: httpx.Response) -> None:
    respx.get(f"{BASE}/v1/introspect").return_value = answer
    client = PleoClient(BASE)
    with pytest.raises(PleoUnexpectedAnswer):
        await client.introspect(_key())
    await client.aclose()


@respx.mock
async def test_organisation_subject_has_no_company() -> None:
    urn = f"urn:pleo:organisation:{COMPANY}"
    respx.get(f"{BASE}/v1/introspect").respond(200, json=_introspection(subjectURN=urn))
    client = PleoClient(BASE)
    info = await client.introspect(_key())
    await client.aclose()
    assert info.company_id is None


@respx.mock
async def test_errors_never_carry_the_key() -> None:
    key = _key()
    respx.get(f"{BASE}/v1/introspect").side_effect = httpx.ConnectError("refused")
    client = PleoClient(BASE)
    with pytest.raises(PleoUnreachable) as caught:
        await client.introspect(key)
    await client.aclose()
    assert key.reveal() not in str(caught.value) + repr(caught.value)
    assert key.reveal() not in repr(key) + str(key)


@respx.mock
async def test_cookies_from_one_introspection_never_reach_the_next() -> None:
    route = respx.get(f"{BASE}/v1/introspect").respond(
        200, json=_introspection(), headers={"Set-Cookie": "session=abc; Path=/"}
    )
    client = PleoClient(BASE)
    await client.introspect(_key())
    await client.introspect(_key())
    await client.aclose()
    assert "cookie" not in route.calls.last.request.headers


def _installation(resource: object) -> dict[str, object]:
    return {
        "id": "5b0e6b8c-1e0c-4d3c-9a3e-2b1f7c9d8e7a",
        "applicationId": "0c6f1a2b-3d4e-4f5a-8b9c-0d1e2f3a4b5c",
        "resource": resource,
        "status": "ACTIVATED",
        "metadata": {},
        "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z",
    }


def _without_subject() -> dict[str, object]:
    answer = _introspection()
    data = answer["data"]
    assert isinstance(data, dict)
    del data["subjectURN"]
    return answer


@respx.mock
async def test_a_missing_subject_is_taken_from_the_installation() -> None:
    key = _key()
    respx.get(f"{BASE}/v1/introspect").respond(200, json=_without_subject())
    installation = respx.get(f"{BASE}/v1/installations/me").respond(
        200, json=_installation(f"urn:pleo:company:{COMPANY}")
    )
    client = PleoClient(BASE)
    try:
        info = await client.introspect(key)
    finally:
        await client.aclose()
    assert installation.calls.last.request.headers["authorization"] == basic_auth(key)
    assert info.company_id == COMPANY
    assert info.subject_from_installation
    assert (info.client_id, info.application_name) == ("client-1", "Acme ERP")


@respx.mock
async def test_a_present_subject_is_not_second_guessed() -> None:
    urn = f"urn:pleo:organisation:{COMPANY}"
    respx.get(f"{BASE}/v1/introspect").respond(200, json=_introspection(subjectURN=urn))
    installation = respx.get(f"{BASE}/v1/installations/me").respond(
        200, json=_installation(f"urn:pleo:company:{COMPANY}")
    )
    client = PleoClient(BASE)
    info = await client.introspect(_key())
    await client.aclose()
    assert info.company_id is None and not installation.called


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, json={"type": "NOT_FOUND"}),
        httpx.Response(403, json={"type": "FORBIDDEN"}),
        httpx.Response(200, json=_installation(f"urn:pleo:organisation:{COMPANY}")),
    ],
)
@respx.mock
async def test_no_company_when_neither_names_one(answer: httpx.Response) -> None:
    respx.get(f"{BASE}/v1/introspect").respond(200, json=_without_subject())
    respx.get(f"{BASE}/v1/installations/me").return_value = answer
    client = PleoClient(BASE)
    info = await client.introspect(_key())
    await client.aclose()
    assert info.company_id is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(401), PleoKeyRejected),
        (httpx.Response(503), PleoUnreachable),
        (httpx.ConnectError("refused"), PleoUnreachable),
        (httpx.Response(200, json={"resource": 7}), PleoUnexpectedAnswer),
        (httpx.Response(200, text="<html>"), PleoUnexpectedAnswer),
        (
            httpx.Response(302, headers={"Location": "https://elsewhere.test/"}),
            PleoUnexpectedAnswer,
        ),
    ],
)
@respx.mock
async def test_installation_failures(
    answer: httpx.Response | Exception, error: type[Exception]
) -> None:
    respx.get(f"{BASE}/v1/introspect").respond(200, json=_without_subject())
    route = respx.get(f"{BASE}/v1/installations/me")
    if isinstance(answer, Exception):
        route.side_effect = answer
    else:
        route.return_value = answer
    client = PleoClient(BASE)
    with pytest.raises(error):
        await client.introspect(_key())
    await client.aclose()


CHECK_LATER = "Pleo could not be reached to check the key. Try again in a few minutes."
NOT_UNDERSTOOD = (
    "Pleo gave an answer the broker did not understand while checking the key."
    " Try again in a few minutes; if it persists, contact support."
)


@pytest.mark.parametrize(
    ("failure", "tenant", "code", "message"),
    [
        (PleoKeyRejected(401), None, "key_invalid", errors.KeyInvalid.default_message),
        (PleoKeyRejected(403), None, "key_invalid", errors.KeyInvalid.default_message),
        (PleoUnreachable("Pleo answered HTTP 503"), None, "pleo_unavailable", CHECK_LATER),
        (PleoUnexpectedAnswer("Pleo answered HTTP 302"), None, "pleo_unavailable", NOT_UNDERSTOOD),
        (PleoUnreachable("Pleo did not answer in time"), "acme", "pleo_unavailable", CHECK_LATER),
        (PleoUnexpectedAnswer("not understood"), "acme", "pleo_unavailable", CHECK_LATER),
    ],
    ids=[
        "activation-401",
        "activation-403",
        "activation-unreachable",
        "activation-not-understood",
        "check-unreachable",
        "check-not-understood",
    ],
)
def test_pleo_failures_are_explained_once(
    failure: PleoError, tenant: str | None, code: str, message: str
) -> None:
    """The one translation of the client's failures into the admin API's errors: activating a
    key (no tenant) and checking a tenant's stored key."""
    explained = explain(failure, tenant=tenant)
    assert isinstance(explained, errors.ActivationError)
    assert (explained.code, explained.message, explained.tenant) == (code, message, tenant)
    assert explained.details == {}


async def test_a_closed_client_refuses_calls_even_if_it_never_made_one() -> None:
    # Its HTTP client is made at the first call (docs/decisions.md, "What `broker serve`
    # imports when"): closing before that must not leave a way to open one afterwards.
    client = PleoClient(BASE, transport=httpx.MockTransport(lambda _: httpx.Response(200)))
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.introspect(_key())
