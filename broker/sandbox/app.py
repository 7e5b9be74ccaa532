"""A local stand-in for Pleo's External API, true to Pleo's OpenAPI specs (`openapi/`).

Pleo surface (HTTP Basic, the key as user name and an empty password): every operation of
every spec (`broker.sandbox.specs`; the README lists them, `broker.sandbox.inventory`).
`HANDWRITTEN` routes have real handlers where Pleo's behaviour matters (export jobs and items,
vendors, tax codes, tag groups, accounts, installations, subscriptions and webhooks); the
rest are spec-driven (`broker.sandbox.generic`), scopes taken from the route catalog.

Lists are cursor-paginated (`before` | `after` | `offset`, `limit`, `sorting_keys`,
`sorting_order`); errors are `{"type", "message"}`; 401 for a missing, malformed, unknown or
revoked key; 403 for a missing scope, a foreign company or `organization_id`; 404 elsewhere.

Control API (JSON, no Pleo auth — bind to 127.0.0.1):

    GET    /_sandbox/health            → 200 {"status": "ok"}
    POST   /_sandbox/keys {"company_id"?, "scopes"?, "auth_method"?, "subject_urn"?,
                           "client_id"?, "subject_in_introspection"? (default true),
                           "installation_resource"? (default: the subject URN)}
                                       → 201 {"key_id", "api_key", "company_id", "scopes",
                                              "client_id"}
    POST   /_sandbox/keys/{key_id}/revoke
                                       → 204 (the key gets 401 from now on)
    PUT    /_sandbox/keys/{key_id}/scopes {"scopes": [...]}
                                       → 200 {"key_id", "company_id", "scopes"}
    POST   /_sandbox/faults {"path_prefix": "/v3/", "kind": "latency"|"status"|"drop",
                             "latency_ms"?, "status"? (429|500|502|503|504),
                             "retry_after"?, "times"? (default: until cleared)}
                                       → 201 the fault
    DELETE /_sandbox/faults            → 204
    GET    /_sandbox/requests          → 200 {"requests": [{"method", "path", "query",
                                         "headers", "authorization_count",
                                         "authorization_matched", "key_id", "at"}, ...]}
                                         (Authorization is only counted and matched)
    DELETE /_sandbox/requests          → 204
    GET    /_sandbox/webhooks          → 200 {"deliveries": [{"subscription_id", "event_id",
                                         "event_type", "url", "attempts", "delivered"}]}
    POST   /_sandbox/seed {"company_id" | "key_id", "seed"? (default 0)}
                                       → 201 {"company_id", "seed", "counts",
                                              "export_job_id"} (`broker.sandbox.seed`)
    GET    /_sandbox/rate-limit        → 200 {"requests_per_second", "burst"} or null
    PUT    /_sandbox/rate-limit {"requests_per_second", "burst"?}
                                       → 200 (each key over it: 429 + Retry-After)
    DELETE /_sandbox/rate-limit        → 204 (off)

`POST /_sandbox/keys` also takes `"expires_in"` (seconds): the key answers 401 after it.
Latency faults add up; of the matching status/drop faults the first answers. A "drop"
fault closes the connection without an answer; 429 faults carry `Retry-After`.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from broker.catalog import load_catalog
from broker.sandbox import (
    accounting,
    exports,
    generic,
    installations,
    persist,
    resources,
    specs,
    subscriptions,
)
from broker.sandbox.api import SERVER_SEND, PleoApi, PleoRoute
from broker.sandbox.control import CONTROL_ROUTES
from broker.sandbox.envelopes import PleoError
from broker.sandbox.state import SandboxKey, SandboxState

__all__ = ["PLEO_ROUTES", "SandboxApp", "SandboxKey", "SandboxState", "create_app", "run"]

HANDWRITTEN: tuple[PleoRoute, ...] = (
    PleoRoute("GET", "/v1/introspect", None, resources.introspect),
    PleoRoute("GET", "/v1/installations/me", None, installations.read),
    PleoRoute("POST", "/v1/installations/me", None, installations.create),
    PleoRoute("PUT", "/v1/installations/me", None, installations.update),
    PleoRoute("DELETE", "/v1/installations/me", None, installations.delete),
    PleoRoute("POST", "/v1/installations/me:activate", None, installations.activate),
    PleoRoute("PUT", "/v1/installations/completions", None, installations.activate),
    PleoRoute("GET", "/v1/companies/{companyId}", "companies:read", resources.company),
    PleoRoute("GET", "/v1/companies", "companies:read", accounting.companies),
    PleoRoute("POST", "/v1/chart-of-accounts", "accounts:write", accounting.create_account),
    PleoRoute("POST", "/v1/chart-of-accounts/batch", "accounts:write", accounting.batch_accounts),
    PleoRoute(
        "POST", "/v0/tax-codes:calculate-tax-amounts", "tax-codes:read", accounting.calculate_taxes
    ),
    PleoRoute(
        "GET", "/v0/aggregations/tag-groups", "tag-groups:read", accounting.tag_group_aggregations
    ),
    PleoRoute("POST", "/v0/aggregations/tags", "tags:read", accounting.tag_aggregations),
    PleoRoute("POST", "/v0/tags/archive", "tags:write", accounting.archive_tags),
    PleoRoute("GET", "/v2/employees", "users:read", resources.employees),
    PleoRoute("GET", "/v2/employees/{employeeId}", "users:read", resources.employee),
    PleoRoute("GET", "/v3/export-jobs", "export-jobs:read", exports.list_jobs),
    PleoRoute("POST", "/v3/export-jobs", "export-jobs:write", exports.create_job),
    PleoRoute("GET", "/v3/export-jobs/{jobId}", "export-jobs:read", exports.get_job),
    PleoRoute("POST", "/v3/export-job-events", "export-jobs:write", exports.job_event),
    PleoRoute("GET", "/v3/export-jobs/{jobId}/items", "export-jobs:read", exports.get_items),
    PleoRoute("PUT", "/v3/export-jobs/{jobId}/items", "export-jobs:write", exports.update_items),
    PleoRoute("GET", "/v3/export-items", "export-items:read", exports.export_items),
    PleoRoute("GET", "/v3/export-job-items", "export-jobs:read", exports.get_job_item),
    PleoRoute("POST", "/v3/export-job-items:search", "export-jobs:read", exports.search_job_items),
    PleoRoute("GET", "/v1/subscriptions", "subscriptions:read", subscriptions.listed),
    PleoRoute("POST", "/v1/subscriptions", "subscriptions:write", subscriptions.create),
    PleoRoute("GET", "/v1/subscriptions/{id}", "subscriptions:read", subscriptions.get),
    PleoRoute("PUT", "/v1/subscriptions/{id}", "subscriptions:write", subscriptions.update),
    PleoRoute("DELETE", "/v1/subscriptions/{id}", "subscriptions:write", subscriptions.delete),
    PleoRoute("GET", "/v1/subscriptions/{id}/secret", "subscriptions:read", subscriptions.secret),
    PleoRoute(
        "GET", "/v1/subscriptions/{id}/activities", "subscriptions:read", subscriptions.activities
    ),
    # v2 is v3's workflow under older paths: the same jobs, items and events
    PleoRoute("GET", "/v2/export-jobs", "export-jobs:read", exports.list_jobs),
    PleoRoute("POST", "/v2/export-jobs", "export-jobs:write", exports.create_job),
    PleoRoute("GET", "/v2/export-jobs/{jobId}", "export-jobs:read", exports.get_job),
    PleoRoute("POST", "/v2/export-job-events", "export-jobs:write", exports.job_event),
    PleoRoute("GET", "/v2/export-jobs/{jobId}/items", "export-jobs:read", exports.get_items),
    PleoRoute("PUT", "/v2/export-jobs/{jobId}/items", "export-jobs:write", exports.update_items),
    PleoRoute("POST", "/v1/vendors", "vendors:write", resources.create_vendor),
    PleoRoute("GET", "/v1/vendors/{id}", "vendors:read", resources.get_vendor),
    PleoRoute("PUT", "/v1/vendors/{id}", "vendors:write", resources.update_vendor),
    PleoRoute("POST", "/v1/vendors/{id}:archive", "vendors:write", resources.archive_vendor),
    PleoRoute("POST", "/v1/vendors:search", "vendors:read", resources.search_vendors),
    PleoRoute("POST", "/v0/tax-codes", "tax-codes:write", resources.create_tax_code),
    PleoRoute("GET", "/v0/tax-codes/{taxCodeId}", "tax-codes:read", resources.get_tax_code),
    PleoRoute("POST", "/v0/tax-codes:search", "tax-codes:read", resources.search_tax_codes),
    PleoRoute("GET", "/v0/tag-groups", "tag-groups:read", resources.list_tag_groups),
    PleoRoute("POST", "/v0/tag-groups", "tag-groups:write", resources.create_tag_group),
    PleoRoute("GET", "/v0/tag-groups/{groupId}", "tag-groups:read", resources.get_tag_group),
)


def _spec_routes(written: tuple[PleoRoute, ...]) -> tuple[PleoRoute, ...]:
    """A generic route (`broker.sandbox.generic`) for every spec operation not in `written`."""
    scopes = {(r.method, r.template): r.scope for r in load_catalog().routes}
    have = {(route.method, route.template) for route in written}
    return tuple(
        PleoRoute(op.method, op.template, scopes.get(key), generic.handler(op))
        for key, op in sorted(specs.operations().items())
        if key not in have
    )


PLEO_ROUTES: tuple[PleoRoute, ...] = HANDWRITTEN + _spec_routes(HANDWRITTEN)


class SandboxApp(Starlette):
    """A Starlette app that keeps the server's own `send` in the scope (see `api._drop`)
    and, given a state file, saves the state after every request that may change it."""

    state_file: Path | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)
        changing = scope["type"] == "http" and scope["method"] not in ("GET", "HEAD")
        if changing and self.state_file is not None:
            persist.save(self.state.sandbox, self.state_file)


async def _pleo_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, PleoError):
        return exc.response()
    assert isinstance(exc, HTTPException)
    return PleoError(
        exc.status_code, "NOT_FOUND" if exc.status_code == 404 else "ERROR", exc.detail
    ).response()


def create_app(state: SandboxState | None = None, state_file: Path | None = None) -> Starlette:
    """The sandbox app; `app.state.sandbox` is its `SandboxState`, kept in `state_file` if
    given (see `broker.sandbox.persist`)."""
    state = state or SandboxState()
    app = SandboxApp(
        routes=[
            Mount("/_sandbox", routes=CONTROL_ROUTES),
            Route("/{path:path}", PleoApi(state, PLEO_ROUTES)),
        ],
        exception_handlers={PleoError: _pleo_error, HTTPException: _pleo_error},
    )
    app.state.sandbox = state
    app.state_file = state_file
    return app


def run(host: str, port: int, state_file: Path | None = None) -> None:
    """Serve the sandbox on the broker's listener until interrupted; state kept in
    `state_file` if given (raises `persist.StateFileError` when that file is not a sandbox's
    state)."""
    import uvloop

    from broker.server import Listener, bind, run_listeners

    state = None if state_file is None else persist.load(state_file)
    app = create_app(state, state_file)
    sock = bind(host, port)
    uvloop.run(run_listeners([Listener("sandbox", app, sock)]))
