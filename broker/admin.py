"""The admin listener (docs/contract.md): tenants under `/v1/…`, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import errors
from broker.events import emit
from broker.records import ApiKey, TenantState
from broker.runtime import Broker

MAX_KEY_LENGTH = 1024
MAX_BODY_BYTES = 16 * 1024
# A key submission is one flat object; anything nested deeper is refused before parsing,
# where Python's recursive JSON decoder would raise RecursionError.
MAX_BODY_DEPTH = 8

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


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
    registry = broker.tenants.registry

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
        return JSONResponse({"tenants": [r.view() for r in registry.all(state)]})

    async def show_tenant(request: Request) -> Response:
        authorize(request)
        record = await tenants.fetch(request.path_params["tenant"])
        return JSONResponse(record.view())

    async def put_key(request: Request) -> Response:
        authorize(request)
        tenant = request.path_params["tenant"]
        # The body is small: it gets the time the headers had, so a client that sends
        # headers and then trickles (or never sends) the body cannot hold the connection.
        try:
            async with asyncio.timeout(broker.settings.header_timeout):
                submission = await _read_submission(request)
        except TimeoutError:
            raise errors.RequestTimeout(
                "The request body did not arrive within BROKER_HEADER_TIMEOUT"
                f" ({broker.settings.header_timeout:g} s); send it at once."
            ) from None
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
        if not registry.loaded:
            body: dict[str, Any] = {"status": "unavailable", "store": registry.store_problem}
            return JSONResponse(body, status_code=503)
        # Unreadable, or readable but refusing writes (read-only, full): served from memory.
        problem = registry.store_problem or tenants.write_problem
        if problem is not None:
            return JSONResponse({"status": "degraded", "store": problem})
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(broker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def broker_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.BrokerError)
        # A request refused for how it arrived leaves the connection in no state to reuse.
        headers = {"connection": "close"} if isinstance(exc, errors.ListenerRefusal) else None
        return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)

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
        middleware=[Middleware(UnexpectedErrors)],
        exception_handlers={errors.BrokerError: broker_error, HTTPException: http_error},
    )


class UnexpectedErrors:
    """Turns any exception the routes did not translate into JSON 500 `internal_error`.

    The log line names the exception's type and where it was raised, never its message or a
    traceback: a library's message may quote what it was given, and that may be a key.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
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
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = "".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in last)
            emit(
                "admin.internal_error",
                level=logging.ERROR,
                method=scope.get("method"),
                error_type=type(exc).__name__,
                where=where,
                response_started=started,
            )
            if not started:
                error = errors.BrokerError()
                await JSONResponse(error.to_body(), status_code=error.status)(scope, receive, send)


async def _read_submission(request: Request) -> KeySubmission:
    _require_json_content_type(request)
    raw = await _read_bounded(request, MAX_BODY_BYTES)
    if not _nesting_within(raw, MAX_BODY_DEPTH):
        raise errors.RequestInvalid(
            f"The JSON body is nested more than {MAX_BODY_DEPTH} levels deep;"
            ' send {"api_key": "…", "allow_company_change": false}.'
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
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


def _require_json_content_type(request: Request) -> None:
    """No Content-Type, or exactly one JSON media type (`application/json`, `…+json`)."""
    values = request.headers.getlist("content-type")
    if not values:
        return
    media_type = values[0].partition(";")[0].strip().lower()
    is_json = media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if len(values) > 1 or "," in values[0] or not is_json:
        raise errors.RequestInvalid("Send the body as JSON, with Content-Type: application/json.")


async def _read_bounded(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (never buffered whole)."""
    too_large = errors.RequestInvalid(
        f"The request body is larger than {limit} bytes, too large for a key submission."
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _nesting_within(raw: bytes, limit: int) -> bool:
    """Whether no array or object in the JSON text `raw` is nested deeper than `limit`."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > limit:
                return False
        elif byte in b"]}":
            depth -= 1
    return True
