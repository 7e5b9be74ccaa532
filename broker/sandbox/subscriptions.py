"""Pleo's webhooks: subscriptions (`/v1/subscriptions`) and signed deliveries with retries.

A subscription belongs to the key's company and names the event types it wants. When the
sandbox emits an event (`emit`: an export job created is `v1.export-job.created`) it POSTs
`{"data", "eventId", "eventType"}` to every active subscription of that company wanting it,
signed per the Standard Webhooks convention Pleo follows: `webhook-id`, `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the
base64 after `whsec_` of the subscription's secret (`GET /v1/subscriptions/{id}/secret`).
A delivery not answered 2xx is retried after each of `SandboxState.webhook_retry_delays`;
every attempt is listed at `GET /_sandbox/webhooks`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from typing import Any

import httpx
from starlette.responses import Response

from broker.sandbox import bodies
from broker.sandbox.api import Call, forbidden
from broker.sandbox.envelopes import PleoError, bad_request, data, page
from broker.sandbox.state import SandboxState, now_iso

SUBSCRIPTIONS = "/v1/subscriptions"
EXPORT_JOB_CREATED = "v1.export-job.created"
EVENT_TYPES = frozenset({EXPORT_JOB_CREATED, "v1.export-job.completed", "v1.export-job.failed"})
STATUSES = frozenset({"ACTIVE", "INACTIVE"})
DELIVERY_TIMEOUT = 5.0
_EDITABLE = ("endpointUrl", "eventTypes", "customHeaders", "endpointAuth", "status")


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for a delivery (Standard Webhooks, version 1)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _fields(body: dict[str, Any], subscription: dict[str, Any]) -> None:
    url = body.get("endpointUrl", subscription.get("endpointUrl"))
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise bad_request("'endpointUrl' is required and must be an http(s) URL.")
    types = body.get("eventTypes", subscription.get("eventTypes"))
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise bad_request("'eventTypes' is required: a non-empty list of event type names.")
    unknown = sorted(set(types) - EVENT_TYPES)
    if unknown:
        raise bad_request(f"Unknown event types {unknown}; known: {sorted(EVENT_TYPES)}.")
    headers = body.get("customHeaders", subscription.get("customHeaders")) or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise bad_request("'customHeaders' must be an object of strings.")
    status = body.get("status", subscription.get("status", "ACTIVE"))
    if not isinstance(status, str) or status not in STATUSES:
        raise bad_request(f"'status' must be one of {sorted(STATUSES)}.")
    auth = body.get("endpointAuth", subscription.get("endpointAuth")) or {"type": "NONE"}
    if not isinstance(auth, dict) or auth.get("type", "NONE") not in ("NONE", "BASIC"):
        raise bad_request("'endpointAuth.type' must be NONE or BASIC.")
    subscription.update(
        endpointUrl=url,
        eventTypes=list(dict.fromkeys(types)),
        customHeaders=headers,
        status=status,
        endpointAuth=auth,
        updatedAt=now_iso(),
    )


def _activity(call: Call, subscription_id: str, operation: str) -> None:
    activities = call.state.collection(SUBSCRIPTIONS + "/activities")
    entry = {
        "id": str(uuid.uuid4()),
        "subscriptionId": subscription_id,
        "companyId": call.key.company_id,
        "actorUrn": call.key.subject_urn,
        "createdAt": now_iso(),
        "operationType": operation,
        "description": f"Subscription {operation.lower()}d",
    }
    activities[entry["id"]] = entry


def _owned(call: Call) -> dict[str, Any]:
    found = call.state.collection(SUBSCRIPTIONS).get(call.params["id"])
    if found is None:
        raise PleoError(404, "SUBSCRIPTION_NOT_FOUND", "Subscription not found.")
    if found["companyId"] != call.key.company_id:
        raise forbidden("This key has no access to this subscription.")
    return found


def create(call: Call) -> Response:
    body = bodies.json_object(call.body)
    now = now_iso()
    subscription: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "companyId": call.key.company_id,
        "createdAt": now,
        "secret": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
    }
    _fields(body, subscription)
    call.state.collection(SUBSCRIPTIONS)[subscription["id"]] = subscription
    _activity(call, subscription["id"], "CREATE")
    return data(_public(subscription))


def _public(subscription: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in subscription.items() if k not in ("secret", "companyId")}


def listed(call: Call) -> Response:
    status = call.query.get("status")
    types = set(call.query.getlist("event_types"))
    found = [
        _public(s)
        for s in call.state.collection(SUBSCRIPTIONS).values()
        if s["companyId"] == call.key.company_id
        and (status is None or s["status"] == status)
        and (not types or types & set(s["eventTypes"]))
    ]
    return page(found, call.query)


def get(call: Call) -> Response:
    return data(_public(_owned(call)))


def update(call: Call) -> Response:
    subscription = _owned(call)
    body = bodies.json_object(call.body)
    _fields({k: v for k, v in body.items() if k in _EDITABLE}, subscription)
    _activity(call, subscription["id"], "UPDATE")
    return data(_public(subscription))


def delete(call: Call) -> Response:
    subscription = _owned(call)
    del call.state.collection(SUBSCRIPTIONS)[subscription["id"]]
    _activity(call, subscription["id"], "DELETE")
    return Response(status_code=204)


def secret(call: Call) -> Response:
    return data({"secretKey": _owned(call)["secret"]})


def activities(call: Call) -> Response:
    subscription_id = call.params["id"]
    found = [
        a
        for a in call.state.collection(SUBSCRIPTIONS + "/activities").values()
        if a["subscriptionId"] == subscription_id and a["companyId"] == call.key.company_id
    ]
    if not found:
        raise PleoError(404, "SUBSCRIPTION_NOT_FOUND", "Subscription not found.")
    return page([{k: v for k, v in a.items() if k != "companyId"} for a in found], call.query)


# deliveries


def emit(state: SandboxState, company_id: str, event_type: str, payload: dict[str, Any]) -> None:
    """Deliver an event to the company's subscriptions (in the background of the running loop)."""
    wanted = [
        s
        for s in state.collection(SUBSCRIPTIONS).values()
        if s["companyId"] == company_id
        and s["status"] == "ACTIVE"
        and event_type in s["eventTypes"]
    ]
    if not wanted:
        return
    event = {"data": payload, "eventId": str(uuid.uuid4()), "eventType": event_type}
    loop = asyncio.get_running_loop()
    for subscription in wanted:
        task = loop.create_task(deliver(state, subscription, event))
        state.webhook_tasks.add(task)
        task.add_done_callback(state.webhook_tasks.discard)


def _headers(subscription: dict[str, Any], event_id: str, body: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    headers = {
        **subscription["customHeaders"],
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(subscription["secret"], event_id, timestamp, body),
    }
    credentials = subscription["endpointAuth"].get("credentials") or {}
    if subscription["endpointAuth"].get("type") == "BASIC":
        user_pass = f"{credentials.get('username', '')}:{credentials.get('password', '')}"
        headers["authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
    return headers


async def deliver(state: SandboxState, subscription: dict[str, Any], event: dict[str, Any]) -> bool:
    """POST `event` to the subscription's URL until it answers 2xx or the retries run out."""
    body = json.dumps(event).encode()
    record: dict[str, Any] = {
        "subscription_id": subscription["id"],
        "event_id": event["eventId"],
        "event_type": event["eventType"],
        "url": subscription["endpointUrl"],
        "attempts": [],
        "delivered": False,
    }
    state.webhook_deliveries.append(record)
    async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as client:
        for delay in (0.0, *state.webhook_retry_delays):
            await asyncio.sleep(delay)
            headers = _headers(subscription, event["eventId"], body)
            try:
                answer = await client.post(
                    subscription["endpointUrl"], content=body, headers=headers
                )
                outcome: int | str = answer.status_code
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            record["attempts"].append({"at": now_iso(), "outcome": outcome})
            if isinstance(outcome, int) and 200 <= outcome < 300:
                record["delivered"] = True
                return True
    return False
