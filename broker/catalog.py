"""The route catalog: which Pleo routes exist, which scope each needs, where it names a company.

`catalog.json` beside this module lists every operation of Pleo's published OpenAPI specs
(operations present in two specs are listed once). An operator can replace it with a file
in the same format (`BROKER_CATALOG_PATH`). Each entry::

    {"method": "PUT", "path": "/v1/vendors/{id}", "operation_id": "updateVendor",
     "scope": "vendors:write", "company": [{"in": "body", "name": "companyId"}],
     "bearer_only": false, "control_plane": false}

`company` says where the operation carries a company id (path parameter, query parameter,
top-level `companyId` of the JSON body), read from the spec's parameters and request-body schemas.
`bearer_only` marks operations whose spec accepts OAuth bearer tokens only (the broker refuses
them). `control_plane` (default false) marks the integration's own control plane: creating,
updating, activating, completing and deleting its installation (`POST`/`PUT`/`DELETE
/v1/installations/me`, `POST /v1/installations/me:activate`, `PUT /v1/installations/completions`).
`DELETE /v1/installations/me` uninstalls the integration for the customer, so the proxy refuses
these unless the operator sets `BROKER_PROXY_ALLOW_CONTROL_PLANE=true`. Reading the
installation (`GET /v1/installations/me`) is not control plane: an integration may read it.

Scopes. Pleo documents `export-jobs:read|write`, `export-items:read`, `accounts:read|write`,
`vendors:read|write` and `users:read`; searches (`POST …:search`) of vendors and accounts are reads.
`/v1/introspect` and the key's own installation (`/v1/installations/…`) need no scope. For the
rest Pleo documents nothing (`companies`, `tax-codes` and `tag-groups` are named by a
third-party client only), and the catalog chooses `resource:read` for GET and for
`POST …:search` (as Pleo does for vendors and accounts), `resource:write` otherwise:

| routes | scope |
|---|---|
| `/v1/companies…` | `companies:read` |
| `/v0/tax-codes…` | `tax-codes:read|write`; `POST /v0/tax-codes:calculate-tax-amounts` is a read |
| `/v0/tag-groups…`, `/v0/aggregations/tag-groups` | `tag-groups:read|write` |
| `/v0/tags…`, `/v0/tag-groups/{groupId}/tags` | `tags:read|write` |
| `POST /v0/aggregations/tags` (a search of tags) | `tags:read` |
| `/v1/subscriptions…` (webhooks) | `subscriptions:read|write` |
| `POST /v2/accounting-entries:enrich` | `accounting-entries:write` |
| `/v2/export-jobs…`, `/v2/export-job-events` | as v3: `export-jobs:read|write` |
| `/v1/vendors/csv-import…` | `vendors:read|write` |
| `/v1-beta/accounts…` | `accounts:read|write` (bearer only) |

Matching. A request path (percent-decoded, no query) is split on `/`; a `:verb` suffix is part of
the last segment. Literal segments win over parameters (falling back to a parameter when the literal
leads nowhere), and a parameter never matches an empty segment or one containing `:`, so
`/v1/vendors/abc:archive` is `{id}:archive` with id `abc` or nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

from broker.errors import CatalogError as CatalogError  # its home is errors.py; imported here

CompanyLocation = Literal["path", "query", "body"]

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
LOCATIONS: tuple[CompanyLocation, ...] = ("path", "query", "body")

_LITERAL = re.compile(r"[A-Za-z0-9._~-]+(?::[A-Za-z0-9._~-]+)?")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}(:[A-Za-z0-9._~-]+)?")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._-]*")
# Pleo's routes of the integration's own installation: control plane whatever a catalog file
# says, so an operator's catalog written before the flag existed cannot forward them.
CONTROL_PLANE = frozenset(
    {
        ("POST", "/v1/installations/me"),
        ("PUT", "/v1/installations/me"),
        ("DELETE", "/v1/installations/me"),
        ("POST", "/v1/installations/me:activate"),
        ("PUT", "/v1/installations/completions"),
    }
)
_ENTRY_KEYS = frozenset(
    {"method", "path", "operation_id", "scope", "company", "bearer_only", "control_plane"}
)


@dataclass(frozen=True, slots=True)
class CompanyField:
    """Where an operation carries a company id."""

    location: CompanyLocation
    name: str

    def __str__(self) -> str:
        return f"{self.location}:{self.name}"


@dataclass(frozen=True, slots=True)
class Route:
    """One Pleo operation: method, path template, required scope, company fields."""

    method: str
    template: str
    operation_id: str
    scope: str | None
    company: tuple[CompanyField, ...] = ()
    bearer_only: bool = False
    control_plane: bool = False
    # Derived from `company` once, not on every request (the policy reads them per request).
    path_company: str | None = field(init=False, compare=False, repr=False)
    """The name of the path parameter holding the company id, if any."""
    query_company: CompanyField | None = field(init=False, compare=False, repr=False)
    """The query field the broker fills in when the caller left the company out."""
    body_company: CompanyField | None = field(init=False, compare=False, repr=False)
    """The top-level JSON body field the broker fills in when the caller left it out."""

    def __post_init__(self) -> None:
        path = next((f.name for f in self.company if f.location == "path"), None)
        query = next((f for f in self.company if f.location == "query"), None)
        body = next((f for f in self.company if f.location == "body"), None)
        object.__setattr__(self, "path_company", path)
        object.__setattr__(self, "query_company", query)
        object.__setattr__(self, "body_company", body)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A route and the path parameters a request gave it."""

    route: Route
    params: Mapping[str, str]


class _Node:
    """A trie node: one path segment deeper per level."""

    __slots__ = ("literals", "params", "route")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        # (name, suffix, child); values never hold ':', so `{id}` and `{id}:verb` never both match.
        self.params: list[tuple[str, str, _Node]] = []
        self.route: Route | None = None

    def child_param(self, name: str, suffix: str) -> _Node:
        for existing_name, existing_suffix, child in self.params:
            if (existing_name, existing_suffix) == (name, suffix):
                return child
        child = _Node()
        self.params.append((name, suffix, child))
        return child


class Catalog:
    """The routes the broker forwards, matched by method and path."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._roots: dict[str, _Node] = {}
        for route in self.routes:
            node = self._roots.setdefault(route.method, _Node())
            for literal, name, suffix in _parse_template(route.template):
                if name is None:
                    node = node.literals.setdefault(literal, _Node())
                else:
                    node = node.child_param(name, suffix)
            if node.route is not None:
                raise CatalogError(f"{route.method} {route.template} is listed twice")
            node.route = route

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The route for a percent-decoded origin-form path without query, or None."""
        root = self._roots.get(method)
        if root is None or not path.startswith("/"):
            return None
        params: dict[str, str] = {}
        route = _walk(root, path[1:].split("/"), 0, params)
        return RouteMatch(route, params) if route is not None else None


def _walk(node: _Node, segments: list[str], index: int, params: dict[str, str]) -> Route | None:
    if index == len(segments):
        return node.route
    segment = segments[index]
    child = node.literals.get(segment)
    if child is not None:
        found = _walk(child, segments, index + 1, params)
        if found is not None:
            return found
    for name, suffix, child in node.params:
        if suffix:
            if not segment.endswith(suffix):
                continue
            value = segment[: -len(suffix)]
        else:
            value = segment
        if not value or ":" in value:
            continue
        params[name] = value
        found = _walk(child, segments, index + 1, params)
        if found is not None:
            return found
        del params[name]
    return None


def _parse_template(template: str) -> list[tuple[str, str | None, str]]:
    """Segments of a template as (literal, param name or None, `:verb` suffix)."""
    if not template.startswith("/"):
        raise CatalogError(f"path {template!r} does not start with '/'")
    segments: list[tuple[str, str | None, str]] = []
    names: set[str] = set()
    for segment in template[1:].split("/"):
        if segment in (".", ".."):
            raise CatalogError(f"path {template!r} has a '{segment}' segment")
        if _LITERAL.fullmatch(segment):
            segments.append((segment, None, ""))
            continue
        param = _PARAM.fullmatch(segment)
        if param is None:
            raise CatalogError(
                f"path {template!r} has a malformed segment {segment!r}"
                " (expected a literal, '{name}' or '{name}:verb')"
            )
        name = param.group(1)
        if name in names:
            raise CatalogError(f"path {template!r} names parameter {{{name}}} twice")
        names.add(name)
        segments.append(("", name, param.group(2) or ""))
    return segments


def load_catalog(path: Path | None = None) -> Catalog:
    """The shipped catalog, or an operator's file in the same format."""
    source = str(path) if path is not None else "the shipped catalog.json"
    try:
        if path is None:
            text = resources.files("broker").joinpath("catalog.json").read_text("utf-8")
        else:
            text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{source}: cannot be read ({exc})") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{source}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(document, dict) or not isinstance(document.get("routes"), list):
        raise CatalogError(f'{source}: expected an object {{"routes": [ … ]}}')
    routes: list[Route] = []
    seen: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(cast(list[Any], document["routes"]), start=1):
        where = f"{source}: entry {index}"
        if isinstance(entry, dict) and isinstance(entry.get("method"), str):
            where += f" ({entry['method']} {entry.get('path')})"
        try:
            route = _route_from_entry(entry)
        except CatalogError as exc:
            raise CatalogError(f"{where}: {exc}") from None
        key = (route.method, route.template)
        if key in seen:
            raise CatalogError(f"{where}: duplicates entry {seen[key]}")
        seen[key] = index
        routes.append(route)
    try:
        return Catalog(routes)
    except CatalogError as exc:
        raise CatalogError(f"{source}: {exc}") from None


def _route_from_entry(entry: object) -> Route:
    fields = _entry_fields(entry)
    method, template = fields["method"], fields["path"]
    if method not in METHODS:
        raise CatalogError(f"method {method!r} is not one of {', '.join(sorted(METHODS))}")
    if not isinstance(template, str):
        raise CatalogError("'path' is not a string")
    segments = _parse_template(template)
    operation_id = fields.get("operation_id", "")
    if not isinstance(operation_id, str):
        raise CatalogError("'operation_id' is not a string")
    scope = fields["scope"]
    if scope is not None and not (isinstance(scope, str) and _SCOPE.fullmatch(scope)):
        raise CatalogError(f"scope {scope!r} is not of the form resource:action (or null)")
    company = _company_fields(fields.get("company", []), {n for _, n, _ in segments if n})
    return Route(
        method,
        template,
        operation_id,
        scope,
        company,
        _flag(fields, "bearer_only"),
        _flag(fields, "control_plane") or (method, template) in CONTROL_PLANE,
    )


def _entry_fields(entry: object) -> dict[str, Any]:
    """The entry as an object with only known fields and every required one."""
    if not isinstance(entry, dict):
        raise CatalogError("is not an object")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise CatalogError(f"has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for required in ("method", "path", "scope"):
        if required not in entry:
            raise CatalogError(f"lacks {required!r}")
    return entry


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise CatalogError(f"{name!r} is not true or false")
    return value


def _company_fields(raw: object, path_params: set[str]) -> tuple[CompanyField, ...]:
    if not isinstance(raw, list):
        raise CatalogError("'company' is not a list")
    fields: list[CompanyField] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"in", "name"}:
            raise CatalogError(f'company field {item!r} is not {{"in": …, "name": …}}')
        location, name = item["in"], item["name"]
        if location not in LOCATIONS:
            raise CatalogError(f"company field location {location!r} is not path, query or body")
        if not isinstance(name, str) or not name:
            raise CatalogError(f"company field name {name!r} is not a non-empty string")
        if location == "path" and name not in path_params:
            raise CatalogError(f"company path parameter {{{name}}} is not in the path")
        field = CompanyField(cast(CompanyLocation, location), name)
        if field in fields:
            raise CatalogError(f"company field {field} is listed twice")
        fields.append(field)
    if sum(f.location == "body" for f in fields) > 1:
        raise CatalogError("more than one body company field")
    return tuple(fields)


def format_table(catalog: Catalog) -> str:
    """The `broker catalog` inventory: METHOD, PATH, SCOPE, COMPANY, NOTES, sorted by path.

    NOTES names `bearer-only` and `control-plane` routes (refused by the proxy), else `-`.
    """
    header = ("METHOD", "PATH", "SCOPE", "COMPANY", "NOTES")
    rows = [
        (
            route.method,
            route.template,
            route.scope or "-",
            ",".join(str(f) for f in route.company) or "-",
            _notes(route),
        )
        for route in sorted(catalog.routes, key=lambda r: (r.template, r.method))
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def _notes(route: Route) -> str:
    flags = (("bearer-only", route.bearer_only), ("control-plane", route.control_plane))
    return ",".join(name for name, flag in flags if flag) or "-"
