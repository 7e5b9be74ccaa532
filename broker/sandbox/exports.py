"""The v3 export workflow: jobs, job events, job items and export items.

A job is `pending` when created, `in_progress` after a `started` event, and finishes with
`completed`, `completed_with_errors` or `failed`. A company has at most one unfinished
(pending or in-progress) job: creating another answers 409 `EXPORT_ALREADY_IN_PROGRESS`.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from starlette.responses import Response

from broker.sandbox import bodies, subscriptions
from broker.sandbox.api import Call
from broker.sandbox.envelopes import PleoError, PleoJSONResponse, bad_request, data, page
from broker.sandbox.resources import owned
from broker.sandbox.state import now_iso

JOB_STATUSES = frozenset({"pending", "in_progress", "failed", "completed", "completed_with_errors"})
ITEM_STATUSES = frozenset({"pending", "in_progress", "failed", "successful", "abandoned"})
UNFINISHED = frozenset({"pending", "in_progress"})
MAX_ITEMS_PER_UPDATE = 100
JOB_EXPIRES_IN = 3600
# event → (statuses it may follow, status it leads to)
_TRANSITIONS = {
    "started": (frozenset({"pending"}), "in_progress"),
    "completed": (frozenset({"in_progress"}), "completed"),
    "completed_with_errors": (frozenset({"in_progress"}), "completed_with_errors"),
    "failed": (UNFINISHED, "failed"),
}
_ITEM_OPTIONAL_FIELDS = (
    "exportedAt",
    "externalId",
    "externalUrl",
    "failureReason",
    "failureReasonType",
)


def _job(call: Call, job_id: str) -> dict[str, Any]:
    return owned(call, call.state.export_jobs.get(job_id), "EXPORT_NOT_FOUND", "Export job")


def create_job(call: Call) -> Response:
    body = bodies.json_object(call.body)
    bodies.required_text(body, "companyId")
    entry_ids = body.get("accountingEntryIds")
    if not isinstance(entry_ids, list):
        raise bad_request("'accountingEntryIds' is required and must be a list of UUIDs.")
    entries = list(dict.fromkeys(bodies.uuid_text(e, "accountingEntryIds") for e in entry_ids))
    interactive = bodies.boolean(body, "isInteractive", required=False)
    employee_id = body.get("employeeId")
    if employee_id is not None:
        employee_id = bodies.uuid_text(employee_id, "employeeId")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_request("'options' must be an object.")
    company_id = call.key.company_id
    if any(
        job["companyId"] == company_id and job["status"] in UNFINISHED
        for job in call.state.export_jobs.values()
    ):
        raise PleoError(
            409, "EXPORT_ALREADY_IN_PROGRESS", "Export Job already in progress for this company."
        )
    now = now_iso()
    job: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "companyId": company_id,
        "status": "pending",
        "createdAt": now,
        "lastUpdatedAt": now,
        "createdBy": employee_id,
        "expiresIn": JOB_EXPIRES_IN,
        "isInteractive": True if interactive is None else interactive,
        "numberOfItems": len(entries),
        "vendorBasedBookkeeping": bool(options.get("vendorBasedBookkeeping")),
        "startedAt": None,
        "completedAt": None,
        "failureReason": None,
    }
    call.state.export_jobs[job["id"]] = job
    call.state.job_items[job["id"]] = [
        {"accountingEntryId": entry, "exportJobId": job["id"], "status": "pending"}
        for entry in entries
    ]
    subscriptions.emit(call.state, company_id, subscriptions.EXPORT_JOB_CREATED, dict(job))
    return data(job, 201)


def list_jobs(call: Call) -> Response:
    statuses = call.query.getlist("statuses")
    if any(status not in JOB_STATUSES for status in statuses):
        raise bad_request(f"'statuses' values must be among {sorted(JOB_STATUSES)}.")
    jobs = [
        job
        for job in call.state.export_jobs.values()
        if job["companyId"] == call.key.company_id and (not statuses or job["status"] in statuses)
    ]
    return page(jobs, call.query)


def get_job(call: Call) -> Response:
    return data(_job(call, call.params["jobId"]))


def job_event(call: Call) -> Response:
    body = bodies.json_object(call.body)
    job = _job(call, bodies.uuid_text(body.get("jobId"), "jobId"))
    event = bodies.required_text(body, "event")
    if event not in _TRANSITIONS:
        raise bad_request(f"'event' must be one of {sorted(_TRANSITIONS)}.")
    allowed_from, to_status = _TRANSITIONS[event]
    if job["status"] not in allowed_from:
        raise PleoError(
            422,
            "INVALID_EXPORT_JOB_STATUS_CHANGE",
            f"Export Job status change failed: cannot apply '{event}' to a {job['status']} job.",
        )
    now = now_iso()
    job.update(status=to_status, lastUpdatedAt=now)
    if event == "started":
        job["startedAt"] = now
        for item in call.state.job_items[job["id"]]:
            item["status"] = "in_progress"
    else:
        job["completedAt"] = now
    if event == "failed":
        job["failureReason"] = bodies.text(body, "failureReason", required=False)
        reason_type = bodies.text(body, "failureReasonType", required=False)
        if reason_type is not None:
            job["failureReasonType"] = reason_type
        for item in call.state.job_items[job["id"]]:
            if item["status"] in UNFINISHED:
                item["status"] = "abandoned"
    if event != "started":
        kind = "failed" if event == "failed" else "completed"
        subscriptions.emit(call.state, job["companyId"], f"v1.export-job.{kind}", dict(job))
    return Response(status_code=202)


def get_items(call: Call) -> Response:
    job = _job(call, call.params["jobId"])
    items = call.state.job_items[job["id"]]
    status = call.query.get("status")
    if status is not None:
        if status not in ITEM_STATUSES:
            raise bad_request(f"'status' must be one of {sorted(ITEM_STATUSES)}.")
        items = [item for item in items if item["status"] == status]
    return page(items, call.query)


def update_items(call: Call) -> Response:
    job = _job(call, call.params["jobId"])
    if not isinstance(call.body, list):
        raise bad_request("The request body must be a JSON list of export job items.")
    if len(call.body) > MAX_ITEMS_PER_UPDATE:
        raise PleoError(
            413, "EXPORT_JOB_ITEMS_UPDATE_LIMIT", "Number of items to update is more than 100."
        )
    if job["status"] not in UNFINISHED:
        raise PleoError(422, "EXPORT_JOB_STATUS_UNPROCESSABLE", "Export job is finished.")
    items = {item["accountingEntryId"]: item for item in call.state.job_items[job["id"]]}
    updated: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for raw in call.body:
        update = bodies.json_object(raw)
        entry_id = bodies.uuid_text(update.get("accountingEntryId"), "accountingEntryId")
        status = bodies.choice(update, "status", ITEM_STATUSES)
        item = items.get(entry_id)
        if item is None:
            errors.append(
                {
                    "accountingEntryId": entry_id,
                    "type": "ACCOUNTING_ENTRY_DOES_NOT_EXIST",
                    "message": "The accounting entry is not part of this export job.",
                }
            )
            continue
        item["status"] = status
        for field in _ITEM_OPTIONAL_FIELDS:
            value = bodies.text(update, field, required=False)
            if value is not None:
                item[field] = value
        updated.append(item)
    job["lastUpdatedAt"] = now_iso()
    return PleoJSONResponse({"data": updated, "errors": errors})


def export_items(call: Call) -> Response:
    job_id = call.query.get("job_id")
    if job_id is None:
        raise bad_request("'job_id' is required.")
    job = _job(call, job_id)
    if job["status"] not in UNFINISHED:
        raise PleoError(
            422,
            "EXPORT_JOB_STATUS_UNPROCESSABLE",
            "Export Job is finished and can no longer be processed.",
        )
    entries = [item["accountingEntryId"] for item in call.state.job_items[job["id"]]]
    return page([_export_item(job, entry) for entry in entries], call.query)


def _export_item(job: dict[str, Any], entry_id: str) -> dict[str, Any]:
    """A stable, made-up accounting entry for `entry_id`."""
    seed = int(hashlib.sha256(entry_id.encode()).hexdigest()[:8], 16)
    value = round(10 + seed % 99_000 / 100, 2)
    net = round(value / 1.25, 2)
    amount = {
        "inSupplierCurrency": {"currency": "DKK", "value": value},
        "inWalletCurrency": {"currency": "DKK", "value": value},
    }
    return {
        "accountingEntryId": entry_id,
        "companyId": job["companyId"],
        "type": "CARD_PURCHASE",
        "date": job["createdAt"],
        "amount": amount,
        "note": "Sandbox expense",
        "additionalInformation": {"reconciliationId": f"SBX-{seed % 1_000_000:06d}"},
        "accountingEntryLines": [
            {
                "accountingEntryLineId": str(uuid.uuid5(uuid.NAMESPACE_URL, entry_id)),
                "lineAmount": amount,
                "netAmount": {
                    "inSupplierCurrency": {"currency": "DKK", "value": net},
                    "inWalletCurrency": {"currency": "DKK", "value": net},
                },
            }
        ],
        "_links": {"api": {"exportItem": f"/v3/export-items?job_id={job['id']}"}},
    }


def _company_items(call: Call) -> list[dict[str, Any]]:
    return [
        item
        for job_id, items in call.state.job_items.items()
        if call.state.export_jobs[job_id]["companyId"] == call.key.company_id
        for item in items
    ]


def get_job_item(call: Call) -> Response:
    """`GET /v3/export-job-items?accounting_entry_id=`: the entry's latest export job item."""
    entry_id = call.query.get("accounting_entry_id")
    found = [
        item
        for item in _company_items(call)
        if entry_id is None or item["accountingEntryId"] == entry_id
    ]
    if not found:
        raise PleoError(404, "EXPORT_ENTRY_NOT_FOUND", "Export Job Item not found")
    return data(found[-1])


def search_job_items(call: Call) -> Response:
    """`POST /v3/export-job-items:search` by `accountingEntryIds` (and `status`)."""
    body = bodies.json_object({} if call.body is None else call.body)
    ids = bodies.text_list(body, "accountingEntryIds")
    status = bodies.choice(body, "status", ITEM_STATUSES, required=False)
    found = [
        item
        for item in _company_items(call)
        if (ids is None or item["accountingEntryId"] in ids)
        and (status is None or item["status"] == status)
    ]
    return page(found, call.query)
