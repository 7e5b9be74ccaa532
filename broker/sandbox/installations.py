"""The integration's own installation (`/v1/installations/…`): create, update, activate, delete.

A key starts with an `ACTIVATED` installation (`resources.installation` reads it; once deleted,
`read` answers 404). `POST /v1/installations/me` (re)creates it in the `status` it is given
(else `PENDING_INTEGRATION`), `:activate` and the deprecated
`PUT /v1/installations/completions` make it `ACTIVATED`, `PUT` sets status, metadata and
error code, and `DELETE` uninstalls it (`INACTIVE`; a second `DELETE` is a 404). The key
itself keeps working, so a test can install again.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from broker.sandbox import bodies
from broker.sandbox.api import Call
from broker.sandbox.envelopes import PleoError, bad_request
from broker.sandbox.resources import installation
from broker.sandbox.state import now_iso

STATUSES = frozenset({"ACTIVATED", "INACTIVE", "AUTHORIZED", "PENDING_INTEGRATION", "ERROR"})
ERROR_CODES = frozenset({"NOT_ENTITLED", "AUTH_ERROR"})


def _metadata(body: dict[str, Any]) -> dict[str, Any] | None:
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object.")
    return metadata


def _change(call: Call, **changes: Any) -> Response:
    call.key.installation.update(changes, updatedAt=now_iso())
    return installation(call)


def read(call: Call) -> Response:
    """`GET /v1/installations/me`: 404 once deleted (until created again)."""
    if call.key.installation.get("deleted"):
        raise PleoError(404, "INSTALLATION_NOT_FOUND", "The key has no installation.")
    return installation(call)


def create(call: Call) -> Response:
    body = bodies.json_object({} if call.body is None else call.body)
    status = bodies.choice(body, "status", STATUSES, required=False)
    return _change(
        call,
        status=status or "PENDING_INTEGRATION",
        metadata=_metadata(body) or {},
        errorCode=None,
        deleted=False,
    )


def update(call: Call) -> Response:
    body = bodies.json_object(call.body)
    status = bodies.choice(body, "status", STATUSES)
    error_code = bodies.choice(body, "errorCode", ERROR_CODES, required=False)
    metadata = _metadata(body)
    if metadata is None:
        metadata = call.key.installation.get("metadata", {})
    return _change(call, status=status, metadata=metadata, errorCode=error_code)


def activate(call: Call) -> Response:
    return _change(call, status="ACTIVATED", errorCode=None, deleted=False)


def delete(call: Call) -> Response:
    if call.key.installation.get("deleted"):
        raise PleoError(404, "INSTALLATION_NOT_FOUND", "The installation is already deleted.")
    call.key.installation.update(status="INACTIVE", deleted=True, updatedAt=now_iso())
    return Response(status_code=204)
