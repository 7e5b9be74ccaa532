"""The Pleo API surface: logging, faults, Basic auth, scopes, company scoping, routing.

Order per request: record it (without credential text) → injected faults → authenticate
(401) → match a route (404/405) → the route's scope (403) → every company id the request
names, in the path, the query (`company_id`, `companyId`) or the top of a JSON body
(`companyId`), must be the key's; `organization_id` is refused for company keys (403) →
the handler. Custom verbs (`/v1/vendors:search`, `/v1/vendors/{id}:archive`) are part of
the last segment: a `{param}` never spans a `/` or a `:`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.sandbox.envelopes import PleoError, PleoJSONResponse
from broker.sandbox.state import Fault, KeyRecord, SandboxState, SeenRequest

SERVER_SEND = "sandbox.server_send"
_REDACTED_HEADERS = frozenset({"proxy-authorization"})
_FAULT_TYPES = {
    429: ("TOO_MANY_REQUESTS", "Rate limit exceeded. Retry after the time in Retry-After."),
    500: ("INTERNAL_SERVER_ERROR", "Something went wrong on our side."),
    502: ("BAD_GATEWAY", "An upstream service did not answer correctly."),
    503: ("SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
    504: ("GATEWAY_TIMEOUT", "An upstream service did not answer in time."),
}
_ORGANISATION_URN = re.compile(r"urn:pleo:organi[sz]ation:(?P<id>[0-9a-fA-F-]+)")


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated request, as a handler sees it."""

    state: SandboxState
    key: KeyRecord
    params: Mapping[str, str]
    query: QueryParams
    body: Any  # the parsed JSON body, or None


Handler = Callable[[Call], Response]


@dataclass(frozen=True, slots=True)
class PleoRoute:
    method: str
    template: str
    scope: str | None
    handler: Handler

    @property
    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/:]+)", self.template)
        return re.compile(regex)


def unauthorized(message: str) -> PleoError:
    return PleoError(401, "UNAUTHORIZED", message)


def forbidden(message: str) -> PleoError:
    return PleoError(403, "FORBIDDEN", message)


def authenticate(state: SandboxState, authorization: list[str]) -> KeyRecord:
    """The key named by the request's Authorization headers, or a 401."""
    if not authorization:
        raise unauthorized("Missing credentials: send 'Authorization: Basic base64(<key>:)'.")
    if len(authorization) > 1:
        raise unauthorized("Send exactly one Authorization header.")
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise unauthorized("API keys use HTTP Basic auth, the key as the user name.")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("Malformed Basic credentials.") from None
    api_key, colon, password = decoded.partition(":")
    if not colon or password or not api_key:
        raise unauthorized("Basic credentials must be the key as user name and an empty password.")
    key = state.key_by_text(api_key)
    expired = key is not None and key.expires_at is not None and time.time() >= key.expires_at
    if key is None or key.revoked or expired:
        raise unauthorized("The API key is invalid, expired or revoked.")
    return key


def check_companies(
    key: KeyRecord, params: Mapping[str, str], query: QueryParams, body: Any
) -> None:
    """403 unless every company the request names is the key's own."""
    named = [params[name] for name in ("companyId",) if name in params]
    named += query.getlist("company_id") + query.getlist("companyId")
    if isinstance(body, dict) and body.get("companyId") is not None:
        if not isinstance(body["companyId"], str):
            raise PleoError(400, "INVALID_REQUEST", "'companyId' must be a UUID.")
        named.append(body["companyId"])
    for company_id in named:
        if company_id.lower() != key.company_id:
            raise forbidden(f"This key has no access to company {company_id}.")
    organisation = _ORGANISATION_URN.fullmatch(key.subject_urn)
    for organization_id in query.getlist("organization_id"):
        if organisation is None or organization_id.lower() != organisation["id"].lower():
            raise forbidden("This key is scoped to a company; organisation-wide access is denied.")


class PleoApi:
    """The ASGI app behind every non-control path."""

    def __init__(self, state: SandboxState, routes: tuple[PleoRoute, ...]) -> None:
        self.state = state
        self.routes = tuple((route, route.pattern) for route in routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        authorization = request.headers.getlist("authorization")
        try:
            auth: KeyRecord | PleoError = authenticate(self.state, authorization)
        except PleoError as error:
            auth = error
        key = None if isinstance(auth, PleoError) else auth
        self.state.requests.append(self._seen(request, len(authorization), key))

        faults = self.state.take_faults(request.url.path)
        latency = sum(fault.latency_ms for fault in faults if fault.kind == "latency")
        if latency:
            await asyncio.sleep(latency / 1000)
        answering = next((fault for fault in faults if fault.kind != "latency"), None)
        if answering is not None and answering.kind == "drop":
            await _drop(scope, receive)
            return
        if answering is not None:
            response = _fault_response(answering)
        elif isinstance(auth, PleoError):
            response = auth.response()
        elif (wait := self.state.throttled(auth.key_id)) is not None:
            response = _rate_limited(wait)
        else:
            try:
                response = await self._dispatch(request, auth)
            except PleoError as error:
                response = error.response()
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, key: KeyRecord) -> Response:
        path, method = request.url.path, request.method
        matched = [
            (route, found) for route, regex in self.routes if (found := regex.fullmatch(path))
        ]
        if not matched:
            raise PleoError(404, "NOT_FOUND", f"No such endpoint: {path}")
        chosen = next(((r, m) for r, m in matched if r.method == method), None)
        if chosen is None:
            raise PleoError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}.")
        route, found = chosen
        if route.scope is not None and route.scope not in key.scopes:
            raise forbidden(f"The API key lacks the scope '{route.scope}' this endpoint needs.")
        body = await _json_body(request)
        params = found.groupdict()
        check_companies(key, params, request.query_params, body)
        return route.handler(Call(self.state, key, params, request.query_params, body))

    @staticmethod
    def _seen(request: Request, authorization_count: int, key: KeyRecord | None) -> SeenRequest:
        headers = tuple(
            (name.decode("latin-1").lower(), _header_value(name, value))
            for name, value in request.scope["headers"]
            if name.lower() != b"authorization"
        )
        return SeenRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers=headers,
            authorization_count=authorization_count,
            authorization_matched=key is not None,
            key_id=None if key is None else key.key_id,
        )


def _header_value(name: bytes, value: bytes) -> str:
    if name.decode("latin-1").lower() in _REDACTED_HEADERS:
        return "[redacted]"
    return value.decode("latin-1")


async def _json_body(request: Request) -> Any:
    """The parsed body, whatever its Content-Type claims (so no label dodges the company
    check); None when empty, or when it is not JSON and does not claim to be."""
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        if "json" in request.headers.get("content-type", "application/json"):
            raise PleoError(400, "INVALID_REQUEST", "The request body is not valid JSON.") from None
        return None


def _fault_response(fault: Fault) -> Response:
    type_, message = _FAULT_TYPES[fault.status]
    headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
    return PleoJSONResponse({"type": type_, "message": message}, fault.status, headers=headers)


def _rate_limited(wait: float) -> Response:
    type_, message = _FAULT_TYPES[429]
    headers = {"Retry-After": str(max(1, math.ceil(wait)))}
    return PleoJSONResponse({"type": type_, "message": message}, 429, headers=headers)


async def _drop(scope: Scope, receive: Receive) -> None:
    """Close the connection without answering.

    ASGI has no way to say this, so reach for the server's transport: the listener's `send` is a
    method of its request cycle, which holds it (`SandboxApp` keeps the server's own `send`
    in the scope). In-process (httpx.ASGITransport) raise what httpx raises when a server
    hangs up.
    """
    server_send = scope.get(SERVER_SEND)
    transport = getattr(getattr(server_send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
    transport.abort()
    # Wait for the server to notice, so it does not answer with a 500 of its own.
    while (await receive())["type"] != "http.disconnect":
        pass
