from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.catalog import (
    CONTROL_PLANE,
    Catalog,
    CatalogError,
    CompanyField,
    Route,
    format_table,
    load_catalog,
)

OPENAPI = Path(__file__).parent / "openapi"
HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head", "options", "trace")


def _spec_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation of every vendored spec: (METHOD, template) → facts read from the spec."""
    operations: dict[tuple[str, str], dict[str, Any]] = {}
    for spec_file in sorted(OPENAPI.glob("*.yml")):
        spec = yaml.safe_load(spec_file.read_text("utf-8"))
        for template, item in spec["paths"].items():
            for method in HTTP_METHODS:
                if method in item:
                    operations[(method.upper(), template)] = _operation_facts(spec, item, method)
    return operations


def _resolve(spec: Any, node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _operation_facts(spec: Any, item: Any, method: str) -> dict[str, Any]:
    operation = item[method]
    company: set[CompanyField] = set()
    for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
        parameter = _resolve(spec, parameter)
        if parameter["name"] in ("company_id", "companyId"):
            company.add(CompanyField(parameter["in"], parameter["name"]))
    body = _resolve(spec, operation.get("requestBody")) or {}
    for media in body.get("content", {}).values():
        if "companyId" in _resolve(spec, media.get("schema", {})).get("properties", {}):
            company.add(CompanyField("body", "companyId"))
    security = operation.get("security", spec.get("security")) or []
    return {
        "operation_id": operation.get("operationId"),
        "company": company,
        "bearer_only": bool(security) and all(set(s) == {"bearerAuth"} for s in security),
    }


SPEC = _spec_operations()
CATALOG = load_catalog()
ROUTES = {(r.method, r.template): r for r in CATALOG.routes}


def test_catalog_lists_every_operation_of_every_spec_once() -> None:
    assert len(ROUTES) == len(CATALOG.routes)
    assert set(ROUTES) == set(SPEC)


def test_company_locations_match_the_specs() -> None:
    wrong = {
        key: (set(route.company), SPEC[key]["company"])
        for key, route in ROUTES.items()
        if set(route.company) != SPEC[key]["company"]
    }
    assert wrong == {}


def test_operation_ids_and_bearer_only_match_the_specs() -> None:
    for key, route in ROUTES.items():
        assert route.operation_id == SPEC[key]["operation_id"], key
        assert route.bearer_only == SPEC[key]["bearer_only"], key
    assert ROUTES[("GET", "/v1-beta/accounts/{accountId}")].bearer_only
    assert not ROUTES[("GET", "/v1/chart-of-accounts/{accountId}")].bearer_only


def test_the_installation_lifecycle_is_control_plane_and_reading_it_is_not() -> None:
    control_plane = {key for key, route in ROUTES.items() if route.control_plane}
    assert control_plane == {
        ("POST", "/v1/installations/me"),
        ("PUT", "/v1/installations/me"),
        ("DELETE", "/v1/installations/me"),
        ("POST", "/v1/installations/me:activate"),
        ("PUT", "/v1/installations/completions"),
    }
    assert not ROUTES[("GET", "/v1/installations/me")].control_plane


def test_control_plane_flag_is_read_from_an_operator_catalog(tmp_path: Path) -> None:
    flagged = _entry(method="DELETE", control_plane=True)
    catalog = load_catalog(_write(tmp_path, {"routes": [_entry(), flagged]}))
    get = catalog.match("GET", "/v1/things/t1")
    delete = catalog.match("DELETE", "/v1/things/t1")
    assert get is not None and not get.route.control_plane
    assert delete is not None and delete.route.control_plane


def test_the_installation_is_control_plane_even_in_a_catalog_without_the_flag(
    tmp_path: Path,
) -> None:
    # An operator's catalog written before `control_plane` existed must not forward them.
    entries = [
        _entry(method=method, path=path, scope=None, company=[])
        for method, path in sorted(CONTROL_PLANE)
    ]
    catalog = load_catalog(_write(tmp_path, {"routes": [*entries, _entry()]}))
    for method, path in CONTROL_PLANE:
        found = catalog.match(method, path.replace("{", "").replace("}", ""))
        assert found is not None and found.route.control_plane, (method, path)
    thing = catalog.match("GET", "/v1/things/t1")
    assert thing is not None and not thing.route.control_plane


# API-NOTES "Scopes": the operations Pleo documents, and the routes that need none.
DOCUMENTED_SCOPES = [
    ("GET", "/v3/export-jobs", "export-jobs:read"),
    ("GET", "/v3/export-jobs/{jobId}", "export-jobs:read"),
    ("GET", "/v3/export-jobs/{jobId}/items", "export-jobs:read"),
    ("POST", "/v3/export-jobs", "export-jobs:write"),
    ("POST", "/v3/export-job-events", "export-jobs:write"),
    ("PUT", "/v3/export-jobs/{jobId}/items", "export-jobs:write"),
    ("GET", "/v3/export-items", "export-items:read"),
    ("GET", "/v1/chart-of-accounts/{accountId}", "accounts:read"),
    ("POST", "/v1/chart-of-accounts:search", "accounts:read"),
    ("POST", "/v1/chart-of-accounts", "accounts:write"),
    ("PUT", "/v1/chart-of-accounts/{accountId}", "accounts:write"),
    ("DELETE", "/v1/chart-of-accounts/{accountId}", "accounts:write"),
    ("POST", "/v1/vendors:search", "vendors:read"),
    ("GET", "/v1/vendors/{id}", "vendors:read"),
    ("POST", "/v1/vendors", "vendors:write"),
    ("PUT", "/v1/vendors/{id}", "vendors:write"),
    ("POST", "/v1/vendors/{id}:archive", "vendors:write"),
    ("GET", "/v2/employees", "users:read"),
    ("GET", "/v2/employees/{employeeId}", "users:read"),
    ("GET", "/v1/introspect", None),
    ("GET", "/v1/installations/me", None),
    ("POST", "/v1/installations/me:activate", None),
]


@pytest.mark.parametrize(("method", "template", "scope"), DOCUMENTED_SCOPES)
def test_documented_scopes_are_honoured(method: str, template: str, scope: str | None) -> None:
    assert ROUTES[(method, template)].scope == scope


def test_only_the_key_itself_needs_no_scope_and_reads_never_need_write() -> None:
    unscoped = {t for (_, t), r in ROUTES.items() if r.scope is None}
    assert unscoped == {
        "/v1/introspect",
        "/v1/installations/me",
        "/v1/installations/me:activate",
        "/v1/installations/completions",
    }
    for (method, template), route in ROUTES.items():
        if method == "GET" and route.scope is not None:
            assert route.scope.endswith(":read"), template


def test_route_properties_pick_the_fill_in_fields() -> None:
    company = ROUTES[("GET", "/v1/companies/{companyId}")]
    assert company.path_company == "companyId"
    assert company.query_company is None and company.body_company is None
    employees = ROUTES[("GET", "/v2/employees")]
    assert employees.query_company == CompanyField("query", "companyId")
    vendor = ROUTES[("POST", "/v1/vendors")]
    assert vendor.body_company == CompanyField("body", "companyId")
    assert vendor.path_company is None and vendor.query_company is None
    mixed = Route(
        "POST",
        "/x/{companyId}",
        "x",
        None,
        (
            CompanyField("path", "companyId"),
            CompanyField("query", "company_id"),
            CompanyField("query", "companyId"),
            CompanyField("body", "companyId"),
        ),
    )
    assert mixed.query_company == CompanyField("query", "company_id")


MATCHES = [
    ("POST", "/v1/vendors/abc:archive", "/v1/vendors/{id}:archive", {"id": "abc"}),
    ("POST", "/v1/vendors/abc:activate", "/v1/vendors/{id}:activate", {"id": "abc"}),
    ("POST", "/v1/vendors:search", "/v1/vendors:search", {}),
    ("GET", "/v1/vendors/abc", "/v1/vendors/{id}", {"id": "abc"}),
    ("POST", "/v1/vendors/csv-import/jobs:search", "/v1/vendors/csv-import/jobs:search", {}),
    ("POST", "/v1/vendors/csv-import/jobs", "/v1/vendors/csv-import/jobs", {}),
    ("POST", "/v1/vendors/csv-import/jobs/j-1:run", "/v1/vendors/csv-import/jobs/{jobId}:run",
     {"jobId": "j-1"}),
    ("POST", "/v1/vendors/csv-import/jobs/j-1:get-presigned-url",
     "/v1/vendors/csv-import/jobs/{jobId}:get-presigned-url", {"jobId": "j-1"}),
    ("GET", "/v1/vendors/csv-import/jobs/j-1/errors",
     "/v1/vendors/csv-import/jobs/{jobId}/errors", {"jobId": "j-1"}),
    # Literal-first with fallback: no GET route continues below "csv-import", so it is an id.
    ("GET", "/v1/vendors/csv-import", "/v1/vendors/{id}", {"id": "csv-import"}),
    ("GET", "/v3/export-jobs/J1/items", "/v3/export-jobs/{jobId}/items", {"jobId": "J1"}),
    ("PUT", "/v3/export-jobs/J1/items", "/v3/export-jobs/{jobId}/items", {"jobId": "J1"}),
    ("GET", "/v0/tag-groups/g/dimensions/d", "/v0/tag-groups/{groupId}/dimensions/{dimensionId}",
     {"groupId": "g", "dimensionId": "d"}),
    ("POST", "/v0/tags/archive", "/v0/tags/archive", {}),
    ("PUT", "/v0/tags/archive", "/v0/tags/{tagId}", {"tagId": "archive"}),
    ("POST", "/v1/installations/me:activate", "/v1/installations/me:activate", {}),
    ("POST", "/v0/tax-codes:calculate-tax-amounts", "/v0/tax-codes:calculate-tax-amounts", {}),
    ("GET", "/v1/companies/ABC", "/v1/companies/{companyId}", {"companyId": "ABC"}),
    ("GET", "/v1/vendors/a b%", "/v1/vendors/{id}", {"id": "a b%"}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "template", "params"), MATCHES)
def test_match_finds_the_route(
    method: str, path: str, template: str, params: dict[str, str]
) -> None:
    found = CATALOG.match(method, path)
    assert found is not None
    assert (found.route.method, found.route.template) == (method, template)
    assert dict(found.params) == params


NO_MATCHES = [
    ("GET", "/v1/vendors/abc:archive"),  # verb routes are POST only; not {id}="abc:archive"
    ("POST", "/v1/vendors/abc:frobnicate"),  # unknown verb is not an id either
    ("GET", "/v1/vendors/abc:"),
    ("POST", "/v1/vendors/:archive"),  # empty id before the verb
    ("GET", "/v1/vendors/"),  # empty segment
    ("GET", "/v1/vendors//x"),
    ("GET", "/v1/vendors"),  # wrong method: only POST exists
    ("DELETE", "/v1/vendors/abc"),
    ("PATCH", "/v1/vendors/abc"),
    ("get", "/v1/vendors/abc"),  # methods are case-sensitive
    ("GET", "/v1/vendors/abc/extra"),
    ("GET", "/v9/introspect"),
    ("GET", "/v1/introspect/"),
    ("GET", "/"),
    ("GET", ""),
    ("GET", "v1/introspect"),
    ("CONNECT", "/v1/introspect"),
]


@pytest.mark.parametrize(("method", "path"), NO_MATCHES)
def test_match_refuses(method: str, path: str) -> None:
    assert CATALOG.match(method, path) is None


def test_literal_wins_and_a_verb_is_never_part_of_a_param() -> None:
    catalog = Catalog(
        [
            Route("POST", "/x/{id}", "bare", None),
            Route("POST", "/x/{id}:go", "verb", None),
            Route("POST", "/x/now:go", "literal", None),
            Route("POST", "/y/{a}/one", "one", None),
            Route("POST", "/y/{b}/two", "two", None),
        ]
    )

    def op(path: str) -> tuple[str, dict[str, str]] | None:
        found = catalog.match("POST", path)
        return (found.route.operation_id, dict(found.params)) if found else None

    assert op("/x/abc:go") == ("verb", {"id": "abc"})
    assert op("/x/now:go") == ("literal", {})
    assert op("/x/abc") == ("bare", {"id": "abc"})
    assert op("/x/abc:stop") is None
    assert op("/y/p/one") == ("one", {"a": "p"})
    assert op("/y/p/two") == ("two", {"b": "p"})
    assert op("/y/p/three") is None


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "method": "GET",
        "path": "/v1/things/{thingId}",
        "operation_id": "getThing",
        "scope": "things:read",
        "company": [{"in": "query", "name": "company_id"}],
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not ...}


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(document), "utf-8")
    return path


def test_override_file_replaces_the_shipped_catalog(tmp_path: Path) -> None:
    minimal = {"method": "POST", "path": "/v1/things", "scope": None}
    catalog = load_catalog(_write(tmp_path, {"routes": [_entry(), minimal]}))
    assert len(catalog.routes) == 2
    found = catalog.match("GET", "/v1/things/t1")
    assert found is not None
    assert found.route == Route(
        "GET", "/v1/things/{thingId}", "getThing", "things:read",
        (CompanyField("query", "company_id"),), False,
    )  # fmt: skip
    posted = catalog.match("POST", "/v1/things")
    assert posted is not None
    assert posted.route == Route("POST", "/v1/things", "", None, (), False)
    assert catalog.match("GET", "/v1/introspect") is None


BAD_CATALOGS: list[tuple[object, str]] = [
    ([_entry()], 'expected an object {"routes": [ … ]}'),
    ({"routes": {}}, 'expected an object {"routes": [ … ]}'),
    ({"routes": ["GET /x"]}, "entry 1: is not an object"),
    ({"routes": [_entry(), _entry(method="FETCH")]},
     "entry 2 (FETCH /v1/things/{thingId}): method"),
    ({"routes": [_entry(method="TRACE")]}, "method 'TRACE' is not one of"),
    ({"routes": [_entry(method=...)]}, "entry 1: lacks 'method'"),
    ({"routes": [_entry(scope=...)]}, "lacks 'scope'"),
    ({"routes": [_entry(path="v1/things")]}, "does not start with '/'"),
    ({"routes": [_entry(path="/v1//things")]}, "malformed segment ''"),
    ({"routes": [_entry(path="/v1/things/")]}, "malformed segment ''"),
    ({"routes": [_entry(path="/v1/{thing")]}, "malformed segment '{thing'"),
    ({"routes": [_entry(path="/v1/{1thing}")]}, "malformed segment '{1thing}'"),
    ({"routes": [_entry(path="/v1/x{thing}")]}, "malformed segment 'x{thing}'"),
    ({"routes": [_entry(path="/v1/{a}{b}")]}, "malformed segment '{a}{b}'"),
    ({"routes": [_entry(path="/v1/{a}/{a}")]}, "names parameter {a} twice"),
    ({"routes": [_entry(path="/v1/../x")]}, "has a '..' segment"),
    ({"routes": [_entry(path="/v1/x?y=1")]}, "malformed segment 'x?y=1'"),
    ({"routes": [_entry(path=7)]}, "'path' is not a string"),
    ({"routes": [_entry(scope="things")]}, "scope 'things' is not of the form resource:action"),
    ({"routes": [_entry(scope="things:read things:write")]}, "is not of the form"),
    ({"routes": [_entry(scope="")]}, "is not of the form"),
    ({"routes": [_entry(operation_id=3)]}, "'operation_id' is not a string"),
    ({"routes": [_entry(bearer_only="yes")]}, "'bearer_only' is not true or false"),
    ({"routes": [_entry(control_plane=1)]}, "'control_plane' is not true or false"),
    ({"routes": [_entry(scopes="a:b")]}, "unknown field(s) scopes"),
    ({"routes": [_entry(company={"in": "query"})]}, "'company' is not a list"),
    ({"routes": [_entry(company=[{"in": "header", "name": "x"}])]},
     "company field location 'header' is not path, query or body"),
    ({"routes": [_entry(company=[{"in": "query"}])]}, "is not {\"in\": …, \"name\": …}"),
    ({"routes": [_entry(company=[{"in": "query", "name": ""}])]}, "is not a non-empty string"),
    ({"routes": [_entry(company=[{"in": "path", "name": "companyId"}])]},
     "company path parameter {companyId} is not in the path"),
    ({"routes": [_entry(company=[{"in": "body", "name": "a"}, {"in": "body", "name": "b"}])]},
     "more than one body company field"),
    ({"routes": [_entry(company=[{"in": "query", "name": "a"}, {"in": "query", "name": "a"}])]},
     "company field query:a is listed twice"),
    ({"routes": [_entry(), _entry(operation_id="again")]},
     "entry 2 (GET /v1/things/{thingId}): duplicates entry 1"),
]  # fmt: skip


@pytest.mark.parametrize(("document", "message"), BAD_CATALOGS)
def test_malformed_catalog_is_refused_with_one_line(
    tmp_path: Path, document: object, message: str
) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    text = str(caught.value)
    assert message in text
    assert text.startswith(str(path))
    assert "\n" not in text


def test_unreadable_or_invalid_json_catalog(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(CatalogError, match=r"missing\.json: cannot be read"):
        load_catalog(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"routes": [\n  {"method": "GET",}\n]}', "utf-8")
    with pytest.raises(CatalogError, match=r"not valid JSON at line 2, column 20"):
        load_catalog(broken)
    assert issubclass(CatalogError, ValueError)


def test_catalog_refuses_a_route_listed_twice() -> None:
    route = Route("GET", "/a/{b}", "x", None)
    with pytest.raises(CatalogError, match=r"GET /a/\{b\} is listed twice"):
        Catalog([route, Route("GET", "/a/{b}", "y", "a:read")])


def test_format_table_is_aligned_and_sorted_by_path_then_method() -> None:
    catalog = Catalog(
        [
            Route("POST", "/v1/b", "x", "b:write", (CompanyField("body", "companyId"),)),
            Route("GET", "/v1/b", "x", "b:read", (CompanyField("query", "company_id"),)),
            Route(
                "DELETE",
                "/v1/a/{companyId}",
                "x",
                None,
                (CompanyField("path", "companyId"), CompanyField("query", "companyId")),
            ),
        ]
    )
    assert format_table(catalog).splitlines() == [
        "METHOD  PATH               SCOPE    COMPANY                         NOTES",
        "DELETE  /v1/a/{companyId}  -        path:companyId,query:companyId  -",
        "GET     /v1/b              b:read   query:company_id                -",
        "POST    /v1/b              b:write  body:companyId                  -",
    ]


def test_format_table_of_the_shipped_catalog_lists_every_route() -> None:
    lines = format_table(CATALOG).splitlines()
    assert lines[0].split() == ["METHOD", "PATH", "SCOPE", "COMPANY", "NOTES"]
    assert len(lines) == len(CATALOG.routes) + 1
    assert any(
        line.split()
        == ["GET", "/v1/companies/{companyId}", "companies:read", "path:companyId", "-"]
        for line in lines
    )
    assert any(line.split() == ["GET", "/v1/introspect", "-", "-", "-"] for line in lines)
    assert any(
        line.split() == ["DELETE", "/v1/installations/me", "-", "-", "control-plane"]
        for line in lines
    )
    assert any(
        line.split()[:2] == ["GET", "/v1-beta/accounts/{accountId}"]
        and line.split()[-1] == "bearer-only"
        for line in lines
    )
    column = lines[0].index("PATH")
    assert all(line[column - 1] == " " and line[column] == "/" for line in lines[1:])


def test_decide_refuses_the_control_plane_unless_allowed() -> None:
    from broker.errors import RouteNotAllowed
    from broker.policy import Policy

    company = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"
    for method, path in [
        ("DELETE", b"/v1/installations/me"),
        ("POST", b"/v1/installations/me:activate"),
        ("PUT", b"/v1/installations/completions"),
    ]:
        with pytest.raises(RouteNotAllowed, match="control plane"):
            Policy(CATALOG).decide(method, path, b"", company_id=company, scopes=frozenset())
        allowed = Policy(CATALOG, allow_control_plane=True).decide(
            method, path, b"", company_id=company, scopes=frozenset()
        )
        assert allowed.route.control_plane
    read = Policy(CATALOG).decide(
        "GET", b"/v1/installations/me", b"", company_id=company, scopes=frozenset()
    )
    assert read.query_string == f"company_id={company}".encode()
