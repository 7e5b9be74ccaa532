"""The admin listener (DESIGN §5): tenant lifecycle under `/v1/…`, health, readiness, metrics."""

from __future__ import annotations

import hmac
import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import errors
from broker.records import ApiKey, TenantState
from broker.runtime import Broker

MAX_KEY_LENGTH = 1024


class KeySubmission(BaseModel):
    """Body of `PUT /v1/tenants/{tenant}/key`."""

    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1, max_length=MAX_KEY_LENGTH)
    allow_company_change: StrictBool = False


def create_admin_app(broker: Broker) -> Starlette:
    """The admin ASGI app over an opened broker."""
    token = broker.settings.admin_token
    if token is None or not token.get_secret_value():
        raise errors.BrokerError(
            "The admin API needs BROKER_ADMIN_TOKEN; refusing to start without one."
        )
    expected = token.get_secret_value().encode()
    tenants = broker.tenants

    def authorize(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), expected
        ):
            raise errors.AdminUnauthorized()

    async def list_tenants(request: Request) -> Response:
        authorize(request)
        raw_state = request.query_params.get("state")
        state = None
        if raw_state is not None:
            try:
                state = TenantState(raw_state)
            except ValueError:
                raise errors.RequestInvalid(
                    "state must be one of: " + ", ".join(s.value for s in TenantState)
                ) from None
        return JSONResponse({"tenants": [r.view() for r in tenants.all(state)]})

    async def show_tenant(request: Request) -> Response:
        authorize(request)
        record = await tenants.fetch(request.path_params["tenant"])
        return JSONResponse(record.view())

    async def put_key(request: Request) -> Response:
        authorize(request)
        tenant = request.path_params["tenant"]
        submission = await _read_submission(request)
        record = await tenants.activate(
            tenant,
            ApiKey(submission.api_key.strip()),
            allow_company_change=submission.allow_company_change,
        )
        return JSONResponse(record.view())

    async def check_tenant(request: Request) -> Response:
        authorize(request)
        record = await tenants.check(request.path_params["tenant"])
        return JSONResponse(record.view())

    async def delete_tenant(request: Request) -> Response:
        authorize(request)
        await tenants.disconnect(request.path_params["tenant"])
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not tenants.loaded:
            body: dict[str, Any] = {"status": "unavailable", "store": tenants.store_problem}
            return JSONResponse(body, status_code=503)
        # Unreadable, or readable but refusing writes (read-only, full): served from memory.
        problem = tenants.store_problem or tenants.write_problem
        if problem is not None:
            return JSONResponse({"status": "degraded", "store": problem})
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(broker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def broker_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.BrokerError)
        return JSONResponse(exc.to_body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/tenants", list_tenants, methods=["GET"]),
        Route("/v1/tenants/{tenant}", show_tenant, methods=["GET"]),
        Route("/v1/tenants/{tenant}", delete_tenant, methods=["DELETE"]),
        Route("/v1/tenants/{tenant}/key", put_key, methods=["PUT"]),
        Route("/v1/tenants/{tenant}/check", check_tenant, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={errors.BrokerError: broker_error, HTTPException: http_error},
    )


async def _read_submission(request: Request) -> KeySubmission:
    raw = await request.body()
    if len(raw) > 16 * 1024:
        raise errors.RequestInvalid("The request body is too large for a key submission.")
    try:
        data = json.loads(raw)
    except ValueError:
        raise errors.RequestInvalid(
            'Send a JSON body like {"api_key": "…", "allow_company_change": false}.'
        ) from None
    try:
        submission = KeySubmission.model_validate(data)
    except ValidationError as exc:
        # Describe the problem without echoing the input: it may be the key itself.
        first = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.RequestInvalid(f"{field}: {first['msg']}") from None
    if not submission.api_key.strip() or any(ord(c) < 32 for c in submission.api_key.strip()):
        raise errors.RequestInvalid(
            "api_key: paste the key exactly as Pleo shows it, on one line, without spaces."
        )
    return submission
