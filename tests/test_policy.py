from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import unquote, unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.catalog import METHODS, Route, load_catalog
from broker.errors import (
    BodyInvalid,
    CompanyMismatch,
    PolicyDenied,
    RouteNotAllowed,
    ScopeNotGranted,
)
from broker.headers import BodyKind
from broker.policy import (
    BODY_METHODS,
    REFUSED_METHODS,
    BodyHandling,
    Decision,
    Decisions,
    Policy,
    body_handling,
    check_body,
)

CATALOG = load_catalog()
ROUTES = {(r.method, r.template): r for r in CATALOG.routes}
ALL_SCOPES = frozenset(r.scope for r in CATALOG.routes if r.scope is not None)
COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"
OTHER = "ffffffff-0000-4000-8000-000000000000"
UPPER = COMPANY.upper()
C = COMPANY.encode()
O = OTHER.encode()  # noqa: E741


def _decide(
    method: str, path: bytes, query: bytes = b"", scopes: frozenset[str] = ALL_SCOPES
) -> Decision:
    return Policy(CATALOG).decide(method, path, query, company_id=COMPANY, scopes=scopes)


DENIED: list[tuple[str, bytes, bytes, type[PolicyDenied], str]] = [
    # 1. canonical target
    ("CONNECT", b"/v1/introspect", b"", RouteNotAllowed, "does not forward CONNECT"),
    ("TRACE", b"/v1/introspect", b"", RouteNotAllowed, "does not forward TRACE"),
    ("CONNECT", b"external.pleo.io:443", b"", RouteNotAllowed, "does not forward CONNECT"),
    ("GET", b"https://external.pleo.io/v1/introspect", b"", RouteNotAllowed, "absolute URL"),
    ("GET", b"external.pleo.io:443", b"", RouteNotAllowed, "not an origin-form path"),
    ("OPTIONS", b"*", b"", RouteNotAllowed, "not an origin-form path"),
    ("GET", b"", b"", RouteNotAllowed, "not an origin-form path"),
    ("GET", b"//v1/introspect", b"", RouteNotAllowed, "'//'"),
    ("GET", b"/v1//introspect", b"", RouteNotAllowed, "'//'"),
    ("GET", b"/v1/./introspect", b"", RouteNotAllowed, "'.' or '..' segment"),
    ("GET", b"/v1/x/../introspect", b"", RouteNotAllowed, "'.' or '..' segment"),
    ("GET", b"/v1/vendors/..", b"", RouteNotAllowed, "'.' or '..' segment"),
    ("GET", b"/v1/vendors/.", b"", RouteNotAllowed, "'.' or '..' segment"),
    ("GET", b"/v1/vendors/..;/introspect", b"", RouteNotAllowed, "';'"),
    ("GET", b"/v1/vendors/abc;jsessionid=1", b"", RouteNotAllowed, "';'"),
    ("GET", b"/v1/vendors/%2e%2e", b"", RouteNotAllowed, "percent-encodes a dot"),
    ("GET", b"/v1/vendors/%2E", b"", RouteNotAllowed, "percent-encodes a dot"),
    ("GET", b"/v1/vendors/a%2e", b"", RouteNotAllowed, "percent-encodes a dot"),
    ("GET", b"/v1/vendors/a%2fb", b"", RouteNotAllowed, "percent-encodes a dot, a slash"),
    ("GET", b"/v1/vendors/a%2Fb", b"", RouteNotAllowed, "percent-encodes a dot, a slash"),
    ("GET", b"/v1/vendors/a%5cb", b"", RouteNotAllowed, "a backslash"),
    ("GET", b"/v1/vendors/a%5Cb", b"", RouteNotAllowed, "a backslash"),
    ("GET", b"/v1/vendors/a%00b", b"", RouteNotAllowed, "or a control character"),
    ("GET", b"/v1/vendors/a%0Ab", b"", RouteNotAllowed, "or a control character"),
    ("GET", b"/v1/vendors/a%7fb", b"", RouteNotAllowed, "or a control character"),
    ("GET", b"/v1/vendors/a\\b", b"", RouteNotAllowed, "a backslash"),
    ("GET", b"/v1/vendors/a\x00b", b"", RouteNotAllowed, "a control character"),
    ("GET", b"/v1/vendors/a\tb", b"", RouteNotAllowed, "a control character"),
    ("GET", b"/v1/vendors/a\x7fb", b"", RouteNotAllowed, "a control character"),
    ("GET", b"/v1/vendors/a b", b"", RouteNotAllowed, "must be percent-encoded"),
    ("GET", b"/v1/vendors/caf\xc3\xa9", b"", RouteNotAllowed, "must be percent-encoded"),
    ("GET", b"/v1/vendors/a?b", b"", RouteNotAllowed, "must be percent-encoded"),
    ("GET", b"/v1/vendors/a#b", b"", RouteNotAllowed, "must be percent-encoded"),
    ("GET", b"/v1/vendors/a%zz", b"", RouteNotAllowed, "malformed percent escape"),
    ("GET", b"/v1/vendors/a%2", b"", RouteNotAllowed, "malformed percent escape"),
    ("GET", b"/v1/vendors/a%", b"", RouteNotAllowed, "malformed percent escape"),
    ("GET", b"/v1/vendors/%ff", b"", RouteNotAllowed, "does not decode to UTF-8"),
    # ... and a catalog route that takes API keys
    ("GET", b"/v9/things", b"", RouteNotAllowed, "GET /v9/things is not a Pleo route"),
    ("DELETE", b"/v1/vendors", b"", RouteNotAllowed, "is not a Pleo route"),
    ("GET", b"/v1/vendors/abc:archive", b"", RouteNotAllowed, "is not a Pleo route"),
    ("GET", b"/v1/vendors/a%3Aarchive", b"", RouteNotAllowed, "is not a Pleo route"),
    ("GET", b"/v1/vendors/", b"", RouteNotAllowed, "is not a Pleo route"),
    ("get", b"/v1/introspect", b"", RouteNotAllowed, "is not a Pleo route"),
    ("GET", b"/v1-beta/accounts/a1", b"", RouteNotAllowed, "accepts only OAuth bearer tokens"),
    # 2. scope
    ("GET", b"/v1/vendors/v1", b"", ScopeNotGranted, "needs the scope 'vendors:read'"),
    # 3. company ids: path, query (every occurrence, any spelling), organisation
    ("GET", b"/v1/companies/" + O, b"", CompanyMismatch,
     f"The path names company '{OTHER}' but this tenant is connected to company '{COMPANY}'"),
    ("GET", b"/v1/companies/x" + C, b"", CompanyMismatch, "The path names company"),
    ("GET", b"/v3/export-jobs", b"company_id=" + O, CompanyMismatch,
     f"The query names company '{OTHER}' in 'company_id'"),
    ("GET", b"/v2/employees", b"companyId=" + O, CompanyMismatch, "in 'companyId'"),
    ("GET", b"/v3/export-jobs", b"company_id=" + C + b"&company_id=" + O, CompanyMismatch,
     "The query names company"),
    ("GET", b"/v3/export-jobs", b"company_id=" + C + b"&companyId=" + O, CompanyMismatch,
     "in 'companyId'"),
    ("GET", b"/v1/vendors/v1", b"company_id=" + O, CompanyMismatch, "The query names company"),
    ("GET", b"/v3/export-jobs", b"Company_Id=" + O, CompanyMismatch, "in 'Company_Id'"),
    ("GET", b"/v3/export-jobs", b"company%5Fid=" + O, CompanyMismatch, "in 'company_id'"),
    ("GET", b"/v3/export-jobs", b"company-id=" + O, CompanyMismatch, "in 'company-id'"),
    ("GET", b"/v3/export-jobs", b"company_id[]=" + O, CompanyMismatch, "in 'company_id[]'"),
    ("GET", b"/v3/export-jobs", b"company.id=" + O, CompanyMismatch, "in 'company.id'"),
    ("GET", b"/v3/export-jobs", b"limit=1;company_id=" + O, CompanyMismatch, "The query names"),
    ("GET", b"/v3/export-jobs", b"company_id=", CompanyMismatch, "The query names company ''"),
    ("GET", b"/v3/export-jobs", b"company_id", CompanyMismatch, "The query names company ''"),
    ("GET", b"/v3/export-jobs", b"company_id=" + C + b"+", CompanyMismatch, "The query names"),
    ("GET", b"/v0/tag-groups", b"organization_id=org-1", CompanyMismatch,
     "The query names an organisation ('organization_id')"),
    ("GET", b"/v1/companies", b"organization_id", CompanyMismatch, "an organisation"),
    ("GET", b"/v0/tag-groups", b"company_id=" + C + b"&ORGANIZATION_ID=o", CompanyMismatch,
     "an organisation"),
    ("POST", b"/v0/tags:search", b"organisationId=o", CompanyMismatch, "an organisation"),
    # indexed and bracketed names are the name they start with
    ("GET", b"/v3/export-jobs", b"company_id[0]=" + O, CompanyMismatch, "in 'company_id[0]'"),
    ("GET", b"/v3/export-jobs", b"companyId[0]=" + O, CompanyMismatch, "in 'companyId[0]'"),
    ("GET", b"/v3/export-jobs", b"company_id[x]=" + O, CompanyMismatch, "in 'company_id[x]'"),
    ("GET", b"/v3/export-jobs", b"company_id[0][a]=" + O, CompanyMismatch, "in 'company_id[0]"),
    ("GET", b"/v3/export-jobs", b"company_id%5B0%5D=" + O, CompanyMismatch,
     "in 'company_id[0]'"),
    ("GET", b"/v3/export-jobs", b"company_id%5b%5d=" + O, CompanyMismatch, "in 'company_id[]'"),
    ("GET", b"/v3/export-jobs", b"Company-Id[1]=" + O, CompanyMismatch, "in 'Company-Id[1]'"),
    ("GET", b"/v3/export-jobs", b"company[id]=" + O, CompanyMismatch, "in 'company[id]'"),
    ("GET", b"/v3/export-jobs", b"company_id[0]=" + C + b"&company_id[1]=" + O, CompanyMismatch,
     "in 'company_id[1]'"),
    ("GET", b"/v3/export-jobs", b"company_id[]", CompanyMismatch, "The query names company ''"),
    ("GET", b"/v0/tag-groups", b"organization_id[0]=o", CompanyMismatch, "an organisation"),
    ("GET", b"/v0/tag-groups", b"organizationId%5Bx%5D=o", CompanyMismatch, "an organisation"),
    # a method override parameter
    ("GET", b"/v3/export-jobs", b"_method=DELETE", RouteNotAllowed, "'_method', a method override"),
    ("POST", b"/v3/export-jobs", b"_METHOD=get", RouteNotAllowed, "a method override"),
    ("GET", b"/v3/export-jobs", b"%5Fmethod=DELETE", RouteNotAllowed, "a method override"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "query", "error", "message"), DENIED)
def test_decide_refuses(
    method: str, path: bytes, query: bytes, error: type[PolicyDenied], message: str
) -> None:
    scopes = frozenset({"vendors:write"}) if error is ScopeNotGranted else ALL_SCOPES
    with pytest.raises(error) as caught:
        _decide(method, path, query, scopes)
    assert type(caught.value) is error
    assert message in caught.value.message


def test_scope_not_granted_names_the_scope_in_the_error_body() -> None:
    with pytest.raises(ScopeNotGranted) as caught:
        _decide("POST", b"/v3/export-jobs", b"", frozenset({"export-jobs:read"}))
    assert caught.value.to_body()["error"]["required_scope"] == "export-jobs:write"
    assert caught.value.status == 403


ALLOWED: list[tuple[str, bytes, bytes, bytes, str, bool]] = [
    # method, path, query in, query forwarded, template, inspect_body
    ("GET", b"/v1/introspect", b"", b"", "/v1/introspect", False),
    ("GET", b"/v3/export-jobs", b"", b"company_id=" + C, "/v3/export-jobs", False),
    ("GET", b"/v3/export-jobs", b"limit=10", b"limit=10&company_id=" + C, "/v3/export-jobs",
     False),
    ("GET", b"/v3/export-jobs", b"limit=10&", b"limit=10&company_id=" + C, "/v3/export-jobs",
     False),
    ("GET", b"/v3/export-jobs", b"q=a+b&x=%2F", b"q=a+b&x=%2F&company_id=" + C,
     "/v3/export-jobs", False),
    ("GET", b"/v3/export-jobs", b"company_id=" + UPPER.encode() + b"&limit=1",
     b"company_id=" + UPPER.encode() + b"&limit=1", "/v3/export-jobs", False),
    ("GET", b"/v3/export-jobs", b"company%5Fid=" + C, b"company%5Fid=" + C, "/v3/export-jobs",
     False),
    ("GET", b"/v3/export-jobs", b"company_id[0]=" + C, b"company_id[0]=" + C + b"&company_id=" + C,
     "/v3/export-jobs", False),
    ("GET", b"/v3/export-jobs", b"companyIds=x&company_identity=y&method=z",
     b"companyIds=x&company_identity=y&method=z&company_id=" + C, "/v3/export-jobs", False),
    ("GET", b"/v3/export-jobs", b"sorting_keys=a&sorting_order=desc&company_id=" + C,
     b"sorting_keys=a&sorting_order=desc&company_id=" + C, "/v3/export-jobs", False),
    ("GET", b"/v2/employees", b"", b"companyId=" + C, "/v2/employees", False),
    ("GET", b"/v2/employees", b"companyId=" + C, b"companyId=" + C, "/v2/employees", False),
    ("GET", b"/v2/employees", b"company_id=" + C, b"company_id=" + C + b"&companyId=" + C,
     "/v2/employees", False),
    ("GET", b"/v1/installations/me", b"", b"company_id=" + C, "/v1/installations/me", False),
    ("GET", b"/v1/companies/" + C, b"", b"", "/v1/companies/{companyId}", False),
    ("GET", b"/v1/companies/" + UPPER.encode(), b"", b"", "/v1/companies/{companyId}", False),
    ("GET", b"/v1/companies/%30" + C[1:], b"", b"", "/v1/companies/{companyId}", False),
    ("GET", b"/v1/companies", b"", b"", "/v1/companies", False),
    ("GET", b"/v1/vendors/v1", b"limit=1", b"limit=1", "/v1/vendors/{id}", False),
    ("GET", b"/v1/vendors/v1", b"company_id=" + C, b"company_id=" + C, "/v1/vendors/{id}",
     False),
    ("GET", b"/v1/vendors/caf%C3%A9", b"", b"", "/v1/vendors/{id}", False),
    ("POST", b"/v1/vendors:search", b"", b"company_id=" + C, "/v1/vendors:search", False),
    ("POST", b"/v1/vendors", b"", b"", "/v1/vendors", True),
    ("PUT", b"/v1/vendors/v1", b"", b"", "/v1/vendors/{id}", True),
    ("DELETE", b"/v0/tags", b"", b"", "/v0/tags", True),
    ("POST", b"/v3/export-jobs", b"", b"", "/v3/export-jobs", True),
    ("PUT", b"/v3/export-jobs/j1/items", b"", b"", "/v3/export-jobs/{jobId}/items", False),
    ("POST", b"/v1/vendors/v1:archive", b"", b"", "/v1/vendors/{id}:archive", False),
    ("POST", b"/v1/vendors/v1:activate", b"", b"", "/v1/vendors/{id}:activate", False),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "query", "forwarded", "template", "inspect"), ALLOWED)
def test_decide_allows_and_fills_in(
    method: str, path: bytes, query: bytes, forwarded: bytes, template: str, inspect: bool
) -> None:
    decision = _decide(method, path, query)
    assert decision.route is ROUTES[(method, template)]
    assert decision.path == path.decode("ascii")
    assert decision.query_string == forwarded
    assert decision.inspect_body is inspect


def test_routes_without_a_scope_need_none() -> None:
    decision = _decide("GET", b"/v1/introspect", b"", frozenset())
    assert decision.route.scope is None


VENDOR = ROUTES[("POST", "/v1/vendors")]
ITEMS = ROUTES[("PUT", "/v3/export-jobs/{jobId}/items")]

BODY_DENIED: list[tuple[Route, bytes, type[PolicyDenied], str]] = [
    (VENDOR, b"", BodyInvalid, "not valid JSON"),
    (VENDOR, b"{", BodyInvalid, "not valid JSON"),
    (VENDOR, b"\xff{}", BodyInvalid, "it is not UTF-8"),
    (VENDOR, b"\xef\xbb\xbf{}", BodyInvalid, "not valid JSON"),
    (VENDOR, b'{"a": NaN}', BodyInvalid, "NaN is not JSON"),
    (VENDOR, b'{"a": 1} {}', BodyInvalid, "Extra data"),
    (VENDOR, b'{"companyId": "' + C + b'", "companyId": "' + O + b'"}', BodyInvalid,
     "names the same key twice"),
    (VENDOR, b"[" * 100_000 + b"]" * 100_000, BodyInvalid, "not valid JSON"),
    (VENDOR, b'{"companyId": "' + O + b'"}', CompanyMismatch,
     f'The body names company "{OTHER}" in \'companyId\' but this tenant is connected'),
    (VENDOR, b'{"companyId": null}', CompanyMismatch, "The body names company null"),
    (VENDOR, b'{"companyId": 5}', CompanyMismatch, "The body names company 5"),
    (VENDOR, b'{"companyId": ["' + C + b'"]}', CompanyMismatch, "The body names company"),
    (VENDOR, b'{"CompanyId": "' + O + b'"}', CompanyMismatch, "in 'CompanyId'"),
    (VENDOR, b'{"company_id": "' + O + b'"}', CompanyMismatch, "in 'company_id'"),
    (VENDOR, b'{"company\\u0049d": "' + O + b'"}', CompanyMismatch, "in 'companyId'"),
    (VENDOR, b'{"name": "x", "organizationId": "o"}', CompanyMismatch, "an organisation"),
    (ITEMS, b'{"companyId": "' + O + b'"}', CompanyMismatch, "The body names company"),
    # a route carrying the company in its body takes an object only
    (VENDOR, b'[{"companyId": "' + O + b'"}]', BodyInvalid,
     "must be a JSON object: POST /v1/vendors carries the company id in its 'companyId'"),
    (VENDOR, b'[{"name": "x"}]', BodyInvalid, "must be a JSON object"),
    (VENDOR, b'"text"', BodyInvalid, "must be a JSON object"),
    (VENDOR, b"null", BodyInvalid, "must be a JSON object"),
    (VENDOR, b"5", BodyInvalid, "must be a JSON object"),
    (VENDOR, b"[" * 5000 + b"]" * 5000, BodyInvalid, "nested too deeply"),
    (VENDOR, b'{"a":' * 5000 + b"1" + b"}" * 5000, BodyInvalid, "nested too deeply"),
    (VENDOR, b'{"a": ' + b"1" * 5000 + b"}", BodyInvalid, "not valid JSON"),
    # elsewhere every object of a top-level array is checked
    (ITEMS, b'[{"companyId": "' + O + b'"}]', CompanyMismatch, "The body names company"),
    (ITEMS, b'[{"companyId": "' + C + b'"}, {"companyId": "' + O + b'"}]', CompanyMismatch,
     "The body names company"),
    (ITEMS, b'[[{"company_id": "' + O + b'"}]]', CompanyMismatch, "in 'company_id'"),
    (ITEMS, b'[{}, {"organizationId": "o"}]', CompanyMismatch, "an organisation"),
    (ITEMS, b'[{"companyId[0]": "' + O + b'"}]', CompanyMismatch, "in 'companyId[0]'"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "error", "message"), BODY_DENIED)
def test_check_body_refuses(
    route: Route, body: bytes, error: type[PolicyDenied], message: str
) -> None:
    with pytest.raises(error) as caught:
        check_body(route, body, company_id=COMPANY)
    assert type(caught.value) is error
    assert message in caught.value.message


BODY_ALLOWED: list[tuple[Route, bytes, bytes]] = [
    # unchanged: the caller's company id, any case
    (VENDOR, b'{"companyId": "' + C + b'", "name": "x"}', b""),
    (VENDOR, b'{"companyId":"' + UPPER.encode() + b'"}', b""),
    # filled in as the first member, every other byte as sent
    (VENDOR, b'{"name": "x"}', b'{"companyId":"' + C + b'","name": "x"}'),
    (VENDOR, b"  {}  ", b'  {"companyId":"' + C + b'"}  '),
    (VENDOR, b'\n{ "amount": 1e400, "rate": 1.10, "n": 12345678901234567890 }',
     b'\n{"companyId":"' + C + b'", "amount": 1e400, "rate": 1.10, "n": 12345678901234567890 }'),
    (VENDOR, b'{"items": [{"companyId": "' + O + b'"}]}',
     b'{"companyId":"' + C + b'","items": [{"companyId": "' + O + b'"}]}'),
    # not an object, on a route without a body company field: checked element by element
    (ITEMS, b'[{"companyId": "' + C + b'"}, {"name": "x"}, [{"companyId": "' + UPPER.encode()
     + b'"}]]', b""),
    (ITEMS, b'[{"items": [{"companyId": "' + O + b'"}]}]', b""),
    (ITEMS, b'"text"', b""),
    (ITEMS, b"null", b""),
    (ITEMS, b"[]", b""),
    # a route without a body company field is checked, never filled in
    (ITEMS, b'{"name": "x"}', b""),
    (ITEMS, b'{"companyId": "' + C + b'"}', b""),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "expected"), BODY_ALLOWED)
def test_check_body_allows_and_fills_in(route: Route, body: bytes, expected: bytes) -> None:
    forwarded = check_body(route, body, company_id=COMPANY)
    assert forwarded == (expected or body)
    if expected:
        assert json.loads(forwarded)["companyId"] == COMPANY


# Property tests: whatever the shape, the request is refused or stays inside the company.

_LITERALS = sorted(
    {seg for r in CATALOG.routes for seg in r.template.split("/") if seg and "{" not in seg}
)
_COMPANY_ROUTES = [r for r in CATALOG.routes if r.company]
_GOOD_IDS = [COMPANY, UPPER, "v1", "j-1", "caf%C3%A9", "%41", "a%3Bb", "x~y"]
_BAD_IDS = [OTHER, "", ".", "..", "%2e", "%2E%2e", "a%2fb", "a%5Cb", "%", "%zz", "%ff",
            "a:archive", ":archive", "x:search", "%3Aarchive", "a%00", "a\\b", "a b",
            "..%2f", "http:", "%2F%2F"]  # fmt: skip
_ids = st.one_of(st.sampled_from(_GOOD_IDS), st.sampled_from(_GOOD_IDS), st.sampled_from(_BAD_IDS))
_segment = st.one_of(
    st.sampled_from(_LITERALS),
    _ids,
    st.text(st.sampled_from("aZ09-._~:%/\\?#;=&+ \x00é2fF"), max_size=6),
)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and a raw path: mostly shaped like a catalog route, sometimes anything."""
    if draw(st.integers(0, 3)) == 0:
        method = draw(st.sampled_from(_METHODS))
        path = "/" + "/".join(draw(st.lists(_segment, max_size=6)))
    else:
        route = draw(st.sampled_from(CATALOG.routes) | st.sampled_from(_COMPANY_ROUTES))
        method = route.method if draw(st.integers(0, 5)) else draw(st.sampled_from(_METHODS))
        parts = []
        for segment in route.template[1:].split("/"):
            if "{" in segment:
                suffix = segment[segment.index("}") + 1 :]
                keep = draw(st.integers(0, 5)) > 0
                segment = draw(_ids) + (suffix if keep else draw(st.sampled_from(_LITERALS)))
            parts.append(segment)
        if draw(st.integers(0, 5)) == 0:
            parts.insert(draw(st.integers(0, len(parts))), draw(_segment))
        path = "/" + "/".join(parts)
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(["http://pleo", "/", "x", "pleo:443"])) + path
    return method, path.encode("utf-8")


_NAMES = ["company_id", "companyId", "Company_Id", "company%5Fid", "COMPANYID", "company-id",
          "organization_id", "organizationId", "limit", "q", "", "company_id[]", "company_id[0]",
          "companyId[x]", "company_id%5B1%5D", "organization_id[0]", "_method"]  # fmt: skip
_VALUES = [COMPANY, UPPER, COMPANY, UPPER, COMPANY.replace("-", "%2D"), OTHER, "", "a+b",
           "%41", f"{COMPANY};company_id={OTHER}", "%zz", f"{COMPANY}+"]  # fmt: skip
_queries = st.lists(
    st.tuples(st.sampled_from(_NAMES), st.booleans(), st.sampled_from(_VALUES)), max_size=4
).flatmap(
    lambda pairs: st.sampled_from(["&", ";"]).map(
        lambda sep: sep.join(n + ("=" + v if eq else "") for n, eq, v in pairs).encode()
    )
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
_objects = st.dictionaries(
    st.sampled_from(["companyId", "CompanyId", "company_id", "organizationId", "name", "items"]),
    st.one_of(st.sampled_from([COMPANY, UPPER, COMPANY, OTHER, ""]), _json),
    max_size=4,
)
_bodies = st.one_of(
    _objects.map(lambda o: json.dumps(o).encode()),
    _objects.map(lambda o: json.dumps(o).encode()),
    _json.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=12),
    st.sampled_from([b"{", b'{"a": NaN}', b'{"companyId": 1, "companyId": 2}', b" {} "]),
)
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"]
_scopes = st.frozensets(st.sampled_from(sorted(ALL_SCOPES)))


def _query_pairs(query: bytes) -> list[tuple[str, str]]:
    pairs = []
    for part in re.split(r"[&;]", query.decode("latin-1")):
        name, _, value = part.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def _is_company(name: str) -> bool:
    return re.sub(r"[_-]", "", name.lower().partition("[")[0]) == "companyid"


@settings(max_examples=600, derandomize=True, deadline=None, database=None)
@given(
    request=_requests(),
    query=_queries,
    body=_bodies,
    scopes=st.one_of(st.just(ALL_SCOPES), st.just(ALL_SCOPES), _scopes),
)
def test_forwarded_requests_stay_inside_the_tenants_company(
    request: tuple[str, bytes], query: bytes, body: bytes, scopes: frozenset[str]
) -> None:
    method, path = request
    try:
        decision = Policy(CATALOG).decide(method, path, query, company_id=COMPANY, scopes=scopes)
        forwarded_body = (
            check_body(decision.route, body, company_id=COMPANY) if decision.inspect_body else None
        )
    except PolicyDenied:
        return
    route = decision.route
    # the path is canonical, as received, and matches the route decided
    assert decision.path.encode() == path
    assert path.startswith(b"/") and b"//" not in path and b"\\" not in path
    assert all(0x21 <= byte < 0x7F for byte in path)
    lowered = decision.path.lower()
    assert not any(bad in lowered for bad in ("%2e", "%2f", "%5c", "%00"))
    decoded = unquote(decision.path, errors="strict")
    assert not {".", ".."} & set(decoded.split("/"))
    found = CATALOG.match(method, decoded)
    assert found is not None and found.route == route
    assert method not in ("CONNECT", "TRACE") and not route.bearer_only
    assert route.scope is None or route.scope in scopes
    # every company id in path, query and body is the tenant's
    if route.path_company is not None:
        assert found.params[route.path_company].lower() == COMPANY
    pairs = _query_pairs(decision.query_string)
    assert decision.query_string.startswith(query)
    for name, value in pairs:
        assert "organi" not in name.lower().replace("-", "").replace("_", "")
        assert name.lower() != "_method"
        if _is_company(name):
            assert value.lower() == COMPANY
    if route.query_company is not None:
        assert any(name == route.query_company.name for name, _ in pairs)
    if forwarded_body is not None:
        document: Any = json.loads(forwarded_body)
        if isinstance(document, dict):
            companies = [v for k, v in document.items() if _is_company(k)]
            assert all(isinstance(v, str) and v.lower() == COMPANY for v in companies)
            assert route.body_company is None or companies
            assert not any("organi" in k.lower() for k in document)
        else:
            assert route.body_company is None
            assert forwarded_body == body
            elements = document if isinstance(document, list) else []
            for element in elements:
                if isinstance(element, dict):
                    companies = [v for k, v in element.items() if _is_company(k)]
                    assert all(isinstance(v, str) and v.lower() == COMPANY for v in companies)
                    assert not any("organi" in k.lower() for k in element)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(document=_objects, indent=st.sampled_from([None, 2]))
def test_filled_in_body_is_the_callers_object_plus_the_company(
    document: dict[str, Any], indent: int | None
) -> None:
    body = json.dumps(document, indent=indent).encode()
    try:
        forwarded = check_body(VENDOR, body, company_id=COMPANY)
    except CompanyMismatch:
        assert any(
            (_is_company(k) and v not in (COMPANY, UPPER)) or "organi" in k.lower()
            for k, v in document.items()
        )
        return
    if any(_is_company(k) for k in document):
        assert forwarded == body
    else:
        assert json.loads(forwarded) == {"companyId": COMPANY, **document}


BODIES: list[tuple[str, str, BodyKind | None, BodyHandling]] = [
    # method, route template, body kind (None: no body), what the proxy does with the body
    ("POST", "/v1/vendors", None, BodyHandling.INSPECT_JSON),  # company in the body: always
    ("POST", "/v1/vendors", BodyKind.OTHER, BodyHandling.INSPECT_JSON),
    ("POST", "/v1/vendors", BodyKind.JSON, BodyHandling.INSPECT_JSON),
    ("PUT", "/v1/vendors/{id}", None, BodyHandling.INSPECT_JSON),
    ("DELETE", "/v0/tags", None, BodyHandling.INSPECT_JSON),
    ("GET", "/v3/export-jobs", None, BodyHandling.NONE),
    ("GET", "/v3/export-jobs", BodyKind.JSON, BodyHandling.INSPECT_JSON),  # every JSON body
    ("GET", "/v3/export-jobs", BodyKind.OTHER, BodyHandling.STREAM),
    ("PUT", "/v3/export-jobs/{jobId}/items", None, BodyHandling.NONE),
    ("PUT", "/v3/export-jobs/{jobId}/items", BodyKind.JSON, BodyHandling.INSPECT_JSON),
    ("PUT", "/v3/export-jobs/{jobId}/items", BodyKind.OTHER, BodyHandling.STREAM),
    ("POST", "/v1/vendors/{id}:archive", BodyKind.OTHER, BodyHandling.STREAM),
]


@pytest.mark.parametrize(("method", "template", "kind", "handling"), BODIES)
def test_body_handling(
    method: str, template: str, kind: BodyKind | None, handling: BodyHandling
) -> None:
    assert body_handling(ROUTES[(method, template)], method, kind) is handling


def test_decide_says_what_to_do_with_the_body() -> None:
    path = b"/v3/export-jobs/j1/items"
    for kind, handling in [
        (None, BodyHandling.NONE),
        (BodyKind.JSON, BodyHandling.INSPECT_JSON),
        (BodyKind.OTHER, BodyHandling.STREAM),
    ]:
        decision = Policy(CATALOG).decide(
            "PUT", path, b"", company_id=COMPANY, scopes=ALL_SCOPES, content=kind
        )
        assert decision.body is handling
        assert decision.inspect_body is (handling is BodyHandling.INSPECT_JSON)


def test_body_methods_are_the_catalogs_methods_that_carry_a_body() -> None:
    assert {"POST", "PUT", "PATCH", "DELETE"} == BODY_METHODS
    assert BODY_METHODS < METHODS
    assert not REFUSED_METHODS & METHODS


# -- remembered decisions -------------------------------------------------------------------


def test_remembered_decisions_are_the_policys() -> None:
    decisions = Decisions(Policy(CATALOG))
    for _ in range(2):  # decided, then remembered
        for method, path, query, *_ in ALLOWED:
            got = decisions.decide(method, path, query, company_id=COMPANY, scopes=ALL_SCOPES)
            assert got == _decide(method, path, query)


def test_remembered_decisions_still_refuse_every_time() -> None:
    decisions = Decisions(Policy(CATALOG))
    for method, path, query, error, _ in DENIED:
        scopes = frozenset({"vendors:write"}) if error is ScopeNotGranted else ALL_SCOPES
        for _ in range(2):
            with pytest.raises(error):
                decisions.decide(method, path, query, company_id=COMPANY, scopes=scopes)


def test_a_decision_depends_on_the_tenants_company_and_scopes() -> None:
    decisions = Decisions(Policy(CATALOG))
    path, query = b"/v1/companies/" + C, b""
    assert decisions.decide("GET", path, query, company_id=COMPANY, scopes=ALL_SCOPES)
    with pytest.raises(CompanyMismatch):
        decisions.decide("GET", path, query, company_id=OTHER, scopes=ALL_SCOPES)
    allowed = decisions.decide("GET", b"/v3/export-jobs", b"", company_id=OTHER, scopes=ALL_SCOPES)
    assert allowed.query_string == b"company_id=" + O
    with pytest.raises(ScopeNotGranted):
        decisions.decide("GET", b"/v3/export-jobs", b"", company_id=OTHER, scopes=frozenset())
    posted = decisions.decide(
        "POST", b"/v1/vendors:search", b"", company_id=COMPANY, scopes=ALL_SCOPES, content=None
    )
    assert posted.body is BodyHandling.NONE
    streamed = decisions.decide(
        "POST",
        b"/v1/vendors:search",
        b"",
        company_id=COMPANY,
        scopes=ALL_SCOPES,
        content=BodyKind.OTHER,
    )
    assert streamed.body is BodyHandling.STREAM


def test_remembered_decisions_are_bounded() -> None:
    decisions = Decisions(Policy(CATALOG), size=8, max_target=64)
    for i in range(20):
        decisions.decide(
            "GET", b"/v3/export-jobs", b"limit=%d" % i, company_id=COMPANY, scopes=ALL_SCOPES
        )
        assert len(decisions._known) <= 8
    decisions._known.clear()
    long_query = b"limit=1&" + b"x=1&" * 20
    decisions.decide("GET", b"/v3/export-jobs", long_query, company_id=COMPANY, scopes=ALL_SCOPES)
    assert not decisions._known


def test_tenants_taking_turns_share_one_remembered_target() -> None:
    # 50,000 tenants of one integration ask the same few targets: what a target is is kept
    # once, what each tenant may do with it is decided for each.
    decisions = Decisions(Policy(CATALOG))
    companies = [str(uuid.uuid4()) for _ in range(50)]
    for company in companies:
        allowed = decisions.decide(
            "GET", b"/v3/export-jobs", b"limit=5", company_id=company, scopes=ALL_SCOPES
        )
        assert allowed.query_string == b"limit=5&company_id=" + company.encode()
        own = f"company_id={company.upper()}".encode()
        assert (
            decisions.decide(
                "GET", b"/v3/export-jobs", own, company_id=company, scopes=ALL_SCOPES
            ).query_string
            == own
        )
    assert len(decisions._known) == 1 + len(companies)  # one target each with its own company
    first = f"company_id={companies[0]}".encode()
    for company in companies[1:]:
        with pytest.raises(CompanyMismatch):  # another tenant's company, remembered target
            decisions.decide(
                "GET", b"/v3/export-jobs", first, company_id=company, scopes=ALL_SCOPES
            )
    with pytest.raises(ScopeNotGranted):
        decisions.decide(
            "GET", b"/v3/export-jobs", b"limit=5", company_id=companies[0], scopes=frozenset()
        )


def test_a_filled_in_company_id_is_percent_encoded_when_it_needs_to_be() -> None:
    policy = Policy(CATALOG)
    plain = policy.decide("GET", b"/v3/export-jobs", b"", company_id=COMPANY, scopes=ALL_SCOPES)
    assert plain.query_string == b"company_id=" + C
    odd = policy.decide("GET", b"/v3/export-jobs", b"a=1", company_id="a b/c&d", scopes=ALL_SCOPES)
    assert odd.query_string == b"a=1&company_id=a%20b%2Fc%26d"


def test_a_company_id_needing_no_escapes_is_filled_in_as_it_is() -> None:
    decisions = Decisions(Policy(CATALOG))
    SCOPES = ALL_SCOPES
    for company, filled in (
        ("Ab-1._~", b"Ab-1._~"),
        ("a b/é", b"a%20b%2F%C3%A9"),
        ("a&b=c", b"a%26b%3Dc"),
    ):
        got = decisions.decide("GET", b"/v3/export-jobs", b"", company_id=company, scopes=SCOPES)
        assert got.query_string == b"company_id=" + filled
