"""The admin listener (docs/contract.md): tenants under `/v1/…`, health, readiness, metrics.

Every `/v1` route sits behind one guard, `AdminToken`; health, readiness and metrics need no
token. Handlers are plain functions that reach the opened broker through `request.app.state`.
"""

from __future__ import annotations

import hmac
import logging
import traceback

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import errors
from broker.events import emit
from broker.feed import list_events
from broker.records import ApiKey, TenantState
from broker.runtime import Broker
from broker.submissions import (
    read_installation_request,
    read_key_submission,
    read_link_request,
)


def create_admin_app(broker: Broker) -> Starlette:
    """The admin ASGI app over an opened broker."""
    token = broker.settings.admin_token
    if token is None or not token.get_secret_value():
        raise errors.BrokerError(
            "The admin API needs BROKER_ADMIN_TOKEN; refusing to start without one."
        )
    # One guard on every /v1 route: it runs once routing has matched path and method, so a
    # path or method no route takes is 404 or 405 with or without the token, as before.
    guarded = [Middleware(AdminToken, token=token.get_secret_value().encode())]
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/tenants", list_tenants, methods=["GET"], middleware=guarded),
        Route("/v1/events", list_events, methods=["GET"], middleware=guarded),
        Route("/v1/tenants/{tenant}", show_tenant, methods=["GET"], middleware=guarded),
        Route("/v1/tenants/{tenant}", delete_tenant, methods=["DELETE"], middleware=guarded),
        Route("/v1/tenants/{tenant}/key", put_key, methods=["PUT"], middleware=guarded),
        Route("/v1/tenants/{tenant}/check", check_tenant, methods=["POST"], middleware=guarded),
        Route(
            "/v1/tenants/{tenant}/installation",
            put_installation,
            methods=["PUT"],
            middleware=guarded,
        ),
        Route(
            "/v1/tenants/{tenant}/connect-sessions",
            create_connect_session,
            methods=["POST"],
            middleware=guarded,
        ),
        Route(
            "/v1/tenants/{tenant}/connect-sessions",
            list_connect_sessions,
            methods=["GET"],
            middleware=guarded,
        ),
        Route(
            "/v1/connect-sessions/{session}",
            revoke_connect_session,
            methods=["DELETE"],
            middleware=guarded,
        ),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(UnexpectedErrors)],
        exception_handlers={errors.BrokerError: broker_error, HTTPException: http_error},
    )
    app.state.broker = broker
    return app


def _broker(request: Request) -> Broker:
    """The opened broker this app serves (set by `create_admin_app`)."""
    broker: Broker = request.app.state.broker
    return broker


def _actor(request: Request) -> str:
    """Who the events of this change name: `admin`, or `cli` when the CLI says so
    (`X-Broker-Actor: cli`; an admin-token holder may claim nothing else)."""
    claimed = request.headers.get("x-broker-actor")
    if claimed is None:
        return "admin"
    if claimed != "cli":
        raise errors.RequestInvalid("X-Broker-Actor may only be 'cli' (or left out).")
    return "cli"


# -- /v1: tenants (behind AdminToken) ----------------------------------------------------


async def list_tenants(request: Request) -> Response:
    """`GET /v1/tenants[?state=…]`: every tenant's view, optionally of one state."""
    raw_state = request.query_params.get("state")
    state = None
    if raw_state is not None:
        try:
            state = TenantState(raw_state)
        except ValueError:
            raise errors.RequestInvalid(
                "state must be one of: " + ", ".join(s.value for s in TenantState)
            ) from None
    records = _broker(request).tenants.registry.all(state)
    return JSONResponse({"tenants": [record.view() for record in records]})


async def show_tenant(request: Request) -> Response:
    """`GET /v1/tenants/{tenant}`: one tenant's view."""
    record = await _broker(request).tenants.fetch(request.path_params["tenant"])
    return JSONResponse(record.view())


async def put_key(request: Request) -> Response:
    """`PUT /v1/tenants/{tenant}/key`: activate the tenant with a key, or rotate its key."""
    broker = _broker(request)
    submission = await read_key_submission(request, within=broker.settings.header_timeout)
    record = await broker.tenants.activate(
        request.path_params["tenant"],
        ApiKey(submission.api_key.strip()),
        allow_company_change=submission.allow_company_change,
        actor=_actor(request),
    )
    return JSONResponse(record.view())


async def check_tenant(request: Request) -> Response:
    """`POST /v1/tenants/{tenant}/check`: re-validate the tenant's key with Pleo now."""
    record = await _broker(request).tenants.check(
        request.path_params["tenant"], actor=_actor(request)
    )
    return JSONResponse(record.view())


async def delete_tenant(request: Request) -> Response:
    """`DELETE /v1/tenants/{tenant}[?uninstall=true]`: forget the tenant and destroy its key;
    its installation in Pleo is set `INACTIVE`, or with `uninstall=true` deleted."""
    uninstall = request.query_params.get("uninstall", "false")
    if uninstall not in ("true", "false"):
        raise errors.RequestInvalid("uninstall must be 'true' or 'false'.")
    outcome = await _broker(request).tenants.disconnect(
        request.path_params["tenant"], actor=_actor(request), uninstall=uninstall == "true"
    )
    # What became of the installation in Pleo, for the CLI (the 204 keeps its empty body).
    return Response(status_code=204, headers={"X-Broker-Installation": outcome})


async def put_installation(request: Request) -> Response:
    """`PUT /v1/tenants/{tenant}/installation`: the integration's own installation status
    (e.g. `PENDING_INTEGRATION` while it syncs, then `ACTIVATED`), sent with the tenant's key."""
    broker = _broker(request)
    wanted = await read_installation_request(request, within=broker.settings.header_timeout)
    record = await broker.tenants.installation.set_status(
        request.path_params["tenant"], wanted.status, wanted.metadata, actor=_actor(request)
    )
    return JSONResponse(record.view())


# -- /v1: connect sessions (behind AdminToken) --------------------------------------------


async def create_connect_session(request: Request) -> Response:
    """`POST /v1/tenants/{tenant}/connect-sessions`: a one-time link to the connect page."""
    broker = _broker(request)
    wanted = await read_link_request(request, within=broker.settings.header_timeout)
    link = await broker.sessions.create(
        request.path_params["tenant"],
        ttl_seconds=wanted.ttl_seconds,
        return_url=wanted.return_url,
        allow_company_change=wanted.allow_company_change,
    )
    return JSONResponse(link.view(), status_code=201)


async def list_connect_sessions(request: Request) -> Response:
    """`GET /v1/tenants/{tenant}/connect-sessions`: the tenant's open sessions (no tokens)."""
    sessions = await _broker(request).sessions.open_for(request.path_params["tenant"])
    return JSONResponse({"sessions": [session.view() for session in sessions]})


async def revoke_connect_session(request: Request) -> Response:
    """`DELETE /v1/connect-sessions/{session}`: end a session now."""
    await _broker(request).sessions.revoke(request.path_params["session"])
    return Response(status_code=204)


# -- probes and metrics (no token) --------------------------------------------------------


async def healthz(request: Request) -> Response:
    """`GET /healthz`: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """`GET /readyz`: ok, degraded (served from memory) or unavailable (nothing loaded)."""
    tenants = _broker(request).tenants
    registry = tenants.registry
    if not registry.loaded:
        return JSONResponse(
            {"status": "unavailable", "store": registry.store_problem}, status_code=503
        )
    # Unreadable, or readable but refusing writes (read-only, full): served from memory.
    problem = registry.store_problem or tenants.write_problem
    if problem is not None:
        return JSONResponse({"status": "degraded", "store": problem})
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """`GET /metrics`: the broker's Prometheus registry."""
    registry = _broker(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# -- errors -------------------------------------------------------------------------------


async def broker_error(request: Request, exc: Exception) -> Response:
    """A `BrokerError` as its JSON body and status."""
    assert isinstance(exc, errors.BrokerError)
    # A request refused for how it arrived leaves the connection in no state to reuse.
    headers = {"connection": "close"} if isinstance(exc, errors.ListenerRefusal) else None
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405) in the broker's JSON error shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


# -- middleware ---------------------------------------------------------------------------


class AdminToken:
    """Lets a request through only with `Authorization: Bearer <admin token>`.

    Anything else is refused with 401 `admin_unauthorized` before the handler runs.
    """

    def __init__(self, app: ASGIApp, *, token: bytes) -> None:
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._authorized(Headers(scope=scope)):
            raise errors.AdminUnauthorized()
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, supplied = headers.get("authorization", "").partition(" ")
        # Compared in constant time: how long a refusal takes tells nothing of the token.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            supplied.strip().encode(), self._token
        )


class UnexpectedErrors:
    """Turns any exception the routes did not translate into JSON 500 `internal_error`.

    The log line names the exception's type and where it was raised, never its message or a
    traceback: a library's message may quote what it was given, and that may be a key.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            _log_unexpected(scope, exc, response_started=started)
            if not started:
                error = errors.BrokerError()
                await JSONResponse(error.to_body(), status_code=error.status)(scope, receive, send)


def _log_unexpected(scope: Scope, exc: Exception, *, response_started: bool) -> None:
    last = traceback.extract_tb(exc.__traceback__)[-1:]
    where = "".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in last)
    emit(
        "admin.internal_error",
        level=logging.ERROR,
        method=scope.get("method"),
        error_type=type(exc).__name__,
        where=where,
        response_started=response_started,
    )
