"""The sandbox's control API under `/_sandbox/`: keys, faults and the seen-request log.

No Pleo auth; bind the sandbox to 127.0.0.1. Every answer is JSON; bad input is a 400
`{"type": "INVALID_REQUEST", "message": ...}`, an unknown key a 404 `KEY_NOT_FOUND`.
The endpoints are listed in `broker/sandbox/app.py`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.sandbox import seed
from broker.sandbox.envelopes import PleoError, bad_request
from broker.sandbox.state import ALL_SCOPES, AUTH_METHODS, SandboxState, UnknownKey

_SCOPE = re.compile(r"[a-z][a-z0-9-]*:[a-z][a-z0-9-]*")


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The body must be JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    return body


def _scopes(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("'scopes' must be a list of strings such as 'vendors:read'.")
    wrong = [scope for scope in value if not _SCOPE.fullmatch(scope)]
    if wrong:
        raise bad_request(f"Not a scope (want 'resource:action'): {', '.join(wrong)}")
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.")
    return value


async def create_key(request: Request) -> Response:
    body = await _body(request)
    company_id = _optional_str(body, "company_id")
    if company_id is not None:
        try:
            uuid.UUID(company_id)
        except ValueError:
            raise bad_request("'company_id' must be a UUID.") from None
    scopes = _scopes(body["scopes"]) if body.get("scopes") is not None else list(ALL_SCOPES)
    auth_method = _optional_str(body, "auth_method") or "API_KEY"
    if auth_method not in AUTH_METHODS:
        raise bad_request(f"'auth_method' must be one of {sorted(AUTH_METHODS)}.")
    subject_urn = _optional_str(body, "subject_urn")
    if subject_urn is not None and not subject_urn.startswith("urn:pleo:"):
        raise bad_request("'subject_urn' must start with 'urn:pleo:'.")
    installation_resource = _optional_str(body, "installation_resource")
    if installation_resource is not None and not installation_resource.startswith("urn:pleo:"):
        raise bad_request("'installation_resource' must start with 'urn:pleo:'.")
    subject_in_introspection = body.get("subject_in_introspection", True)
    if not isinstance(subject_in_introspection, bool):
        raise bad_request("'subject_in_introspection' must be true or false.")
    expires_in = body.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in < 0
    ):
        raise bad_request("'expires_in' must be a number of seconds >= 0.")
    state = _state(request)
    key = state.create_key(
        company_id,
        scopes,
        auth_method,
        subject_urn,
        client_id=_optional_str(body, "client_id"),
        subject_in_introspection=subject_in_introspection,
        installation_resource=installation_resource,
        expires_in=expires_in,
    )
    return JSONResponse(
        {
            "key_id": key.key_id,
            "api_key": key.api_key,
            "company_id": key.company_id,
            "scopes": list(key.scopes),
            "client_id": state.keys[key.key_id].client_id,
            "expires_at": state.keys[key.key_id].expires_at,
        },
        201,
    )


def _key_not_found(key_id: str) -> PleoError:
    return PleoError(404, "KEY_NOT_FOUND", f"No sandbox key {key_id}.")


async def revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    try:
        _state(request).revoke(key_id)
    except UnknownKey:
        raise _key_not_found(key_id) from None
    return Response(status_code=204)


async def set_scopes(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    body = await _body(request)
    scopes = _scopes(body.get("scopes"))
    state = _state(request)
    try:
        state.set_scopes(key_id, scopes)
    except UnknownKey:
        raise _key_not_found(key_id) from None
    key = state.keys[key_id]
    return JSONResponse(
        {"key_id": key_id, "company_id": key.company_id, "scopes": list(key.scopes)}
    )


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(f"'{name}' must be an integer.")
    return value


async def add_fault(request: Request) -> Response:
    body = await _body(request)
    path_prefix = _optional_str(body, "path_prefix") or "/"
    kind = body.get("kind")
    if kind not in ("latency", "status", "drop"):
        raise bad_request("'kind' must be 'latency', 'status' or 'drop'.")
    latency_ms = _optional_int(body, "latency_ms")
    if kind == "latency" and latency_ms is None:
        raise bad_request("A latency fault needs 'latency_ms'.")
    status = _optional_int(body, "status")
    if kind == "status" and status is None:
        raise bad_request("A status fault needs 'status' (429, 500, 502, 503 or 504).")
    try:
        fault = _state(request).add_fault(
            path_prefix,
            kind,
            latency_ms=latency_ms or 0,
            status=status or 503,
            retry_after=_optional_int(body, "retry_after"),
            times=_optional_int(body, "times"),
        )
    except ValueError as error:
        raise bad_request(str(error)) from None
    return JSONResponse(fault.to_json(), 201)


async def clear_faults(request: Request) -> Response:
    _state(request).clear_faults()
    return Response(status_code=204)


async def list_requests(request: Request) -> Response:
    return JSONResponse({"requests": [seen.to_json() for seen in _state(request).requests]})


async def clear_requests(request: Request) -> Response:
    _state(request).clear_requests()
    return Response(status_code=204)


async def seed_company(request: Request) -> Response:
    body = await _body(request)
    company_id = _optional_str(body, "company_id")
    key_id = _optional_str(body, "key_id")
    state = _state(request)
    if key_id is not None:
        if key_id not in state.keys:
            raise _key_not_found(key_id)
        company_id = state.keys[key_id].company_id
    if company_id is None:
        raise bad_request("Name the company to seed: 'company_id' or 'key_id'.")
    try:
        uuid.UUID(company_id)
    except ValueError:
        raise bad_request("'company_id' must be a UUID.") from None
    number = _optional_int(body, "seed")
    return JSONResponse(seed.seed(state, company_id, 0 if number is None else number), 201)


async def get_rate_limit(request: Request) -> Response:
    limit = _state(request).rate_limit
    return JSONResponse(None if limit is None else limit.to_json())


async def set_rate_limit(request: Request) -> Response:
    body = await _body(request)
    per_second = body.get("requests_per_second")
    if isinstance(per_second, bool) or not isinstance(per_second, int | float):
        raise bad_request("'requests_per_second' must be a number > 0.")
    try:
        _state(request).limit_rate(float(per_second), _optional_int(body, "burst"))
    except ValueError as error:
        raise bad_request(str(error)) from None
    return await get_rate_limit(request)


async def clear_rate_limit(request: Request) -> Response:
    _state(request).limit_rate(None)
    return Response(status_code=204)


async def webhooks(request: Request) -> Response:
    return JSONResponse({"deliveries": list(_state(request).webhook_deliveries)})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


CONTROL_ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/keys", create_key, methods=["POST"]),
    Route("/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
    Route("/keys/{key_id}/scopes", set_scopes, methods=["PUT"]),
    Route("/faults", add_fault, methods=["POST"]),
    Route("/faults", clear_faults, methods=["DELETE"]),
    Route("/requests", list_requests, methods=["GET"]),
    Route("/requests", clear_requests, methods=["DELETE"]),
    Route("/webhooks", webhooks, methods=["GET"]),
    Route("/seed", seed_company, methods=["POST"]),
    Route("/rate-limit", get_rate_limit, methods=["GET"]),
    Route("/rate-limit", set_rate_limit, methods=["PUT"]),
    Route("/rate-limit", clear_rate_limit, methods=["DELETE"]),
]
