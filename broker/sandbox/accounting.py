"""Handlers where Pleo's behaviour matters beyond storing: the chart of accounts (unique
`externalId`, batches), tax amounts, tag and tag-group aggregations, the company list."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import Response

from broker.sandbox import bodies
from broker.sandbox.api import Call
from broker.sandbox.envelopes import PleoError, bad_request, data, page
from broker.sandbox.state import now_iso

ACCOUNTS = "/v1/chart-of-accounts"
TAGS = "/v0/tags"
GROUP_DIMENSIONS = "/v0/tag-groups/{groupId}/dimensions"
TAG_DIMENSIONS = "/v0/tags/{tagId}/dimensions"
MAX_BATCH = 1000
_ACCOUNT_TEXT = ("code", "taxCodeExternalId")


def companies(call: Call) -> Response:
    """`GET /v1/companies`: a company key sees its own company."""
    return page([call.state.company(call.key.company_id).to_json()], call.query)


# chart of accounts


def _account_problems(body: dict[str, Any]) -> list[str]:
    problems = []
    external_id = body.get("externalId")
    if not isinstance(external_id, str) or not external_id:
        problems.append("EXTERNAL_ID_EMPTY")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        problems.append("NAME_EMPTY")
    if not isinstance(body.get("archived"), bool):
        problems.append("ARCHIVED_MISSING")
    if any(body.get(f) is not None and not isinstance(body[f], str) for f in _ACCOUNT_TEXT):
        problems.append("INVALID_TEXT_FIELD")
    return problems


def _account(call: Call, body: dict[str, Any]) -> dict[str, Any]:
    account = {
        "id": str(uuid.uuid4()),
        "companyId": call.key.company_id,
        "externalId": body["externalId"],
        "name": body["name"],
        "archived": body["archived"],
        "code": body.get("code"),
        "taxCodeExternalId": body.get("taxCodeExternalId"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
        "createdAt": now_iso(),
    }
    return account


def _by_external_id(call: Call, external_id: str) -> dict[str, Any] | None:
    return next(
        (
            account
            for account in call.state.collection(ACCOUNTS).values()
            if account["companyId"] == call.key.company_id and account["externalId"] == external_id
        ),
        None,
    )


def create_account(call: Call) -> Response:
    """201 a new account; 200 when the same account exists; 409 when its externalId is taken."""
    body = bodies.json_object(call.body)
    problems = _account_problems(body)
    if problems:
        raise bad_request(f"Invalid account: {', '.join(problems)}.")
    existing = _by_external_id(call, body["externalId"])
    if existing is not None:
        if all(existing.get(k) == body.get(k) for k in ("name", "archived", *_ACCOUNT_TEXT)):
            return data(existing)
        raise PleoError(
            409, "EXTERNAL_ID_ALREADY_EXISTS", "An account with this externalId already exists."
        )
    account = _account(call, body)
    call.state.collection(ACCOUNTS)[account["id"]] = account
    return data(account, 201)


def batch_accounts(call: Call) -> Response:
    """`POST /v1/chart-of-accounts/batch`: each item created or failed with its reasons."""
    body = bodies.json_object(call.body)
    items = body.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise bad_request(f"'items' must be a list of 1 to {MAX_BATCH} accounts.")
    created, failed = [], []
    for item in items:
        item = bodies.json_object(item)
        reasons = _account_problems(item)
        if not reasons and _by_external_id(call, item["externalId"]) is not None:
            reasons = ["EXTERNAL_ID_ALREADY_EXISTS"]
        if reasons:
            failed.append({"reasons": reasons, "request": item})
            continue
        account = _account(call, item)
        call.state.collection(ACCOUNTS)[account["id"]] = account
        created.append(account)
    return data({"created": created, "failed": failed}, 201)


# tax codes


def _breakdown(tax_code: dict[str, Any], amount: dict[str, Any]) -> dict[str, Any]:
    minors, currency = amount.get("minors"), amount.get("currency")
    if isinstance(minors, bool) or not isinstance(minors, int) or not isinstance(currency, str):
        raise bad_request("Each amount needs integer 'minors' and a 'currency'.")
    rate = float(tax_code["rate"])
    rate = rate / 100 if rate > 1 else rate  # Pleo writes 25 or 0.25 for 25 %
    if tax_code["type"] == "inclusive":
        net = round(minors / (1 + rate))
        gross = minors
    elif tax_code["type"] == "exclusive":
        net, gross = minors, minors + round(minors * rate)
    else:  # reverse charge: the buyer accounts for the tax
        net = gross = minors
    return {
        "gross": {"currency": currency, "minors": gross},
        "net": {"currency": currency, "minors": net},
        "tax": {"currency": currency, "minors": gross - net},
    }


def calculate_taxes(call: Call) -> Response:
    """`POST /v0/tax-codes:calculate-tax-amounts`: gross, net and tax per amount."""
    body = bodies.json_object(call.body)
    requested = body.get("amountsByTaxCodeId")
    if not isinstance(requested, dict):
        raise bad_request("'amountsByTaxCodeId' is required: tax code ids to lists of amounts.")
    taxes: dict[str, list[dict[str, Any]]] = {}
    for tax_code_id, amounts in requested.items():
        tax_code = call.state.tax_codes.get(tax_code_id)
        if tax_code is None or tax_code["companyId"] != call.key.company_id:
            raise PleoError(404, "TAX_CODE_NOT_FOUND", f"No tax code {tax_code_id}.")
        if not isinstance(amounts, list):
            raise bad_request("Each tax code maps to a list of {id, amount}.")
        taxes[tax_code_id] = [
            {
                "id": str(bodies.json_object(entry).get("id")),
                "amountTaxBreakdown": _breakdown(tax_code, bodies.json_object(entry["amount"])),
            }
            for entry in amounts
            if isinstance(entry, dict) and isinstance(entry.get("amount"), dict)
        ]
    return data({"taxes": taxes})


# tags and tag groups


def _dimensions(call: Call, collection: str, name: str, owner_id: str) -> list[dict[str, Any]]:
    return [d for d in call.state.collection(collection).values() if d.get(name) == owner_id]


def tag_group_aggregations(call: Call) -> Response:
    """`GET /v0/aggregations/tag-groups`: the company's groups with their dimensions."""
    wanted = set(call.query.getlist("tag_group_ids"))
    groups = [
        {**group, "dimensions": _dimensions(call, GROUP_DIMENSIONS, "groupId", group["id"])}
        for group in call.state.tag_groups.values()
        if group["companyId"] == call.key.company_id and (not wanted or group["id"] in wanted)
    ]
    return data(groups)


def _tag_matches(tag: dict[str, Any], body: dict[str, Any]) -> bool:
    archived = body.get("archived")
    if archived is None and not body.get("includeArchived"):
        archived = False if tag.get("archived") else None
    text = body.get("textSearch")
    return (
        (archived is None or bool(tag.get("archived")) is archived)
        and (not body.get("tagIds") or tag["id"] in body["tagIds"])
        and (not body.get("tagGroupIds") or tag.get("groupId") in body["tagGroupIds"])
        and (not text or str(text).lower() in str(tag.get("name", "")).lower())
    )


def tag_aggregations(call: Call) -> Response:
    """`POST /v0/aggregations/tags`: the company's tags with their group and dimensions."""
    body = bodies.json_object({} if call.body is None else call.body)
    tags = [
        {
            **tag,
            "group": call.state.tag_groups.get(str(tag.get("groupId"))) or {},
            "dimensions": _dimensions(call, TAG_DIMENSIONS, "tagId", tag["id"]),
        }
        for tag in call.state.collection(TAGS).values()
        if tag["companyId"] == call.key.company_id and _tag_matches(tag, body)
    ]
    return page(tags, call.query)
