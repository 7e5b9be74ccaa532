"""Key submissions: the body of `PUT /v1/tenants/{tenant}/key`, read within bounds.

The body is refused before it is parsed when it is too large, nested too deep, not JSON, or
slower to arrive than a head may be; every refusal is 400 `request_invalid` (408
`request_timeout` for the slow one), and no message quotes what was sent: it may be the key.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.requests import ClientDisconnect, Request

from broker import errors

MAX_KEY_LENGTH = 1024
MAX_BODY_BYTES = 16 * 1024
# A key submission is one flat object; anything nested deeper is refused before parsing,
# where Python's recursive JSON decoder would raise RecursionError.
MAX_BODY_DEPTH = 8
EXAMPLE = '{"api_key": "…", "allow_company_change": false}'


class KeySubmission(BaseModel):
    """Body of `PUT /v1/tenants/{tenant}/key`."""

    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1, max_length=MAX_KEY_LENGTH)
    allow_company_change: StrictBool = False


class LinkRequest(BaseModel):
    """Body of `POST /v1/tenants/{tenant}/connect-sessions` (all optional)."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: StrictInt = Field(1800, ge=60, le=86_400)
    return_url: str | None = Field(None, max_length=2048)
    allow_company_change: StrictBool = False


async def read_link_request(request: Request, *, within: float) -> LinkRequest:
    """The connect-link request in the body (an empty body asks for the defaults)."""
    try:
        async with asyncio.timeout(within):
            raw = await _read_json_body(request)
    except TimeoutError:
        raise errors.RequestTimeout() from None
    if not raw.strip():
        return LinkRequest()
    if not _nesting_within(raw, MAX_BODY_DEPTH):
        raise errors.RequestInvalid(f"The JSON body is nested more than {MAX_BODY_DEPTH} deep.")
    try:
        return LinkRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.RequestInvalid(f"{field}: {first['msg']}") from None


class InstallationRequest(BaseModel):
    """Body of `PUT /v1/tenants/{tenant}/installation` (the status is checked against Pleo's
    enum by `broker.installation`, whose message lists it)."""

    model_config = ConfigDict(extra="forbid")

    status: str = Field(max_length=64)
    metadata: dict[str, Any] | None = None


async def read_installation_request(request: Request, *, within: float) -> InstallationRequest:
    """The installation change in the body, refused unless it arrives whole in `within` s."""
    try:
        async with asyncio.timeout(within):
            raw = await _read_json_body(request)
    except TimeoutError:
        raise errors.RequestTimeout() from None
    if not _nesting_within(raw, MAX_BODY_DEPTH):
        raise errors.RequestInvalid(f"The JSON body is nested more than {MAX_BODY_DEPTH} deep.")
    try:
        return InstallationRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.RequestInvalid(
            f'{field}: {first["msg"]} (send {{"status": "ACTIVATED", "metadata": {{…}}}})'
        ) from None


async def read_key_submission(request: Request, *, within: float) -> KeySubmission:
    """The key submission in the request's body, refused unless it arrives whole in `within` s."""
    # The body is small: it gets the time the headers had, so a client that sends
    # headers and then trickles (or never sends) the body cannot hold the connection.
    try:
        async with asyncio.timeout(within):
            raw = await _read_json_body(request)
    except TimeoutError:
        raise errors.RequestTimeout(
            "The request body did not arrive within BROKER_HEADER_TIMEOUT"
            f" ({within:g} s); send it at once."
        ) from None
    return _parse(raw)


async def _read_json_body(request: Request) -> bytes:
    _require_json_content_type(request)
    return await _read_bounded(request, MAX_BODY_BYTES)


def _parse(raw: bytes) -> KeySubmission:
    if not _nesting_within(raw, MAX_BODY_DEPTH):
        raise errors.RequestInvalid(
            f"The JSON body is nested more than {MAX_BODY_DEPTH} levels deep; send {EXAMPLE}."
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise errors.RequestInvalid(f"Send a JSON body like {EXAMPLE}.") from None
    try:
        submission = KeySubmission.model_validate(data)
    except ValidationError as exc:
        # Describe the problem without echoing the input: it may be the key itself.
        first = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.RequestInvalid(f"{field}: {first['msg']}") from None
    key = submission.api_key.strip()
    if not key or any(ord(c) < 32 for c in key):
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
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        # The caller hung up mid-body: nothing to answer, and nothing wrong with the broker.
        raise errors.RequestInvalid("The request body broke off before its end.") from None
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
