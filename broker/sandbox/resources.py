"""Handlers for the key, company, employee, vendor, tax-code and tag-group endpoints."""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.responses import Response

from broker.sandbox import bodies
from broker.sandbox.api import Call, forbidden
from broker.sandbox.envelopes import PleoError, PleoJSONResponse, bad_request, data, page
from broker.sandbox.state import APPLICATION_ID, now_iso

VENDOR_STATES = frozenset({"DRAFT", "ACTIVE", "ARCHIVED"})
TAX_CODE_TYPES = frozenset({"inclusive", "exclusive", "reverse"})
_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_VENDOR_TEXT_FIELDS = ("code", "externalId", "registrationNumber", "taxRegistrationNumber")


def owned(call: Call, resource: dict[str, Any] | None, not_found: str, what: str) -> dict[str, Any]:
    """The resource if it belongs to the key's company: 404 if absent, 403 if foreign."""
    if resource is None:
        raise PleoError(404, not_found, f"{what} not found.")
    if resource["companyId"] != call.key.company_id:
        raise forbidden(f"This key has no access to this {what.lower()}.")
    return resource


def introspect(call: Call) -> Response:
    key = call.key
    answer = {
        "authMethod": key.auth_method,
        "clientId": key.client_id,
        "scope": " ".join(key.scopes),
        "applicationName": "Pleo Sandbox",
        "subjectURN": key.subject_urn,
    }
    if not key.subject_in_introspection:
        del answer["subjectURN"]  # optional in Pleo's spec
    return data(answer)


def installation(call: Call) -> Response:
    key = call.key
    changed = key.installation
    answer = {
        "id": key.installation_id,
        "applicationId": APPLICATION_ID,
        "resource": key.installation_resource or key.subject_urn,
        "status": changed.get("status", "ACTIVATED"),
        "metadata": changed.get("metadata", {}),
        "createdAt": key.created_at,
        "updatedAt": changed.get("updatedAt", key.created_at),
    }
    if changed.get("errorCode") is not None:
        answer["errorCode"] = changed["errorCode"]
    return PleoJSONResponse(answer)


def company(call: Call) -> Response:
    return data(call.state.company(call.key.company_id).to_json())


def employees(call: Call) -> Response:
    found = call.state.company(call.key.company_id).employees
    for name in ("email", "code"):
        wanted = call.query.get(name)
        if wanted is not None:
            found = [employee for employee in found if employee[name] == wanted]
    return page(found, call.query)


def employee(call: Call) -> Response:
    wanted = call.params["employeeId"]
    match = next(
        (
            employee
            for company in call.state.companies.values()
            for employee in company.employees
            if employee["id"] == wanted
        ),
        None,
    )
    return data(owned(call, match, "EMPLOYEE_NOT_FOUND", "Employee"))


# vendors


def _vendor_fields(body: dict[str, Any], vendor: dict[str, Any]) -> None:
    name = bodies.required_text(body, "name")
    currency = bodies.required_text(body, "defaultCurrency")
    if not _CURRENCY.fullmatch(currency):
        raise bad_request("'defaultCurrency' must be a 3-letter ISO 4217 code.")
    country = bodies.text(body, "country", required=False)
    if country is not None and not _COUNTRY.fullmatch(country):
        raise bad_request("'country' must be a 2-letter ISO 3166 code.")
    vendor.update(name=name, defaultCurrency=currency)
    if country is not None:
        vendor["country"] = country
    for field in _VENDOR_TEXT_FIELDS:
        value = bodies.text(body, field, required=False)
        if value is not None:
            vendor[field] = value


def _check_external_id(call: Call, vendor: dict[str, Any]) -> None:
    external_id = vendor.get("externalId")
    for other in call.state.vendors.values():
        if (
            external_id is not None
            and other["id"] != vendor["id"]
            and other["companyId"] == vendor["companyId"]
            and other.get("externalId") == external_id
        ):
            raise PleoError(409, "VENDOR_ALREADY_EXISTS", "A vendor with this externalId exists.")


def create_vendor(call: Call) -> Response:
    body = bodies.json_object(call.body)
    bodies.required_text(body, "companyId")
    now = now_iso()
    vendor: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "companyId": call.key.company_id,
        "state": "ACTIVE",
        "createdAt": now,
        "updatedAt": now,
    }
    _vendor_fields(body, vendor)
    _check_external_id(call, vendor)
    call.state.vendors[vendor["id"]] = vendor
    return data(vendor, 201)


def get_vendor(call: Call) -> Response:
    return data(
        owned(call, call.state.vendors.get(call.params["id"]), "VENDOR_NOT_FOUND", "Vendor")
    )


def update_vendor(call: Call) -> Response:
    vendor = owned(call, call.state.vendors.get(call.params["id"]), "VENDOR_NOT_FOUND", "Vendor")
    body = bodies.json_object(call.body)
    bodies.required_text(body, "companyId")
    bodies.required_text(body, "externalId")
    state = bodies.choice(body, "state", VENDOR_STATES)
    updated = dict(vendor, state=state, updatedAt=now_iso())
    _vendor_fields(body, updated)
    _check_external_id(call, updated)
    call.state.vendors[vendor["id"]] = updated
    return data(updated)


def archive_vendor(call: Call) -> Response:
    vendor = owned(call, call.state.vendors.get(call.params["id"]), "VENDOR_NOT_FOUND", "Vendor")
    vendor.update(state="ARCHIVED", updatedAt=now_iso())
    return Response(status_code=204)


_VENDOR_FILTERS = {
    "ids": "id",
    "externalIds": "externalId",
    "codes": "code",
    "states": "state",
    "countries": "country",
    "taxRegistrationNumbers": "taxRegistrationNumber",
    "accountingSystems": "accountingSystem",
}


def search_vendors(call: Call) -> Response:
    if not call.query.get("company_id"):
        raise bad_request("'company_id' is required.")
    body = bodies.json_object({} if call.body is None else call.body)
    found = [v for v in call.state.vendors.values() if v["companyId"] == call.key.company_id]
    for name, attribute in _VENDOR_FILTERS.items():
        wanted = bodies.text_list(body, name)
        if wanted is not None:
            found = [vendor for vendor in found if vendor.get(attribute) in wanted]
    fragment = bodies.text(body, "name", required=False)
    if fragment:
        found = [vendor for vendor in found if fragment.lower() in vendor["name"].lower()]
    return page(found, call.query)


# tax codes


def create_tax_code(call: Call) -> Response:
    body = bodies.json_object(call.body)
    bodies.required_text(body, "companyId")
    now = now_iso()
    tax_code: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "companyId": call.key.company_id,
        "name": bodies.required_text(body, "name"),
        "rate": bodies.number(body, "rate"),
        "type": bodies.choice(body, "type", TAX_CODE_TYPES),
        "archived": bodies.boolean(body, "archived"),
        "createdAt": now,
        "updatedAt": now,
    }
    for field in ("code", "ingoingTaxAccount", "outgoingTaxAccount"):
        tax_code[field] = bodies.text(body, field, required=False)
    call.state.tax_codes[tax_code["id"]] = tax_code
    return data(tax_code, 201)


def get_tax_code(call: Call) -> Response:
    found = call.state.tax_codes.get(call.params["taxCodeId"])
    return data(owned(call, found, "TAX_CODE_NOT_FOUND", "Tax code"))


def search_tax_codes(call: Call) -> Response:
    body = bodies.json_object({} if call.body is None else call.body)
    found = [t for t in call.state.tax_codes.values() if t["companyId"] == call.key.company_id]
    archived = bodies.boolean(body, "archived", required=False)
    if archived is not None:
        found = [tax_code for tax_code in found if tax_code["archived"] is archived]
    code = bodies.text(body, "code", required=False)
    if code is not None:
        found = [tax_code for tax_code in found if tax_code["code"] == code]
    type_ = bodies.choice(body, "type", TAX_CODE_TYPES, required=False)
    if type_ is not None:
        found = [tax_code for tax_code in found if tax_code["type"] == type_]
    ids = bodies.text_list(body, "taxCodeIds")
    if ids is not None:
        found = [tax_code for tax_code in found if tax_code["id"] in ids]
    return page(found, call.query)


# tag groups


def list_tag_groups(call: Call) -> Response:
    include_archived = call.query.get("include_archived", "false").lower() == "true"
    return data(
        [
            group
            for group in call.state.tag_groups.values()
            if group["companyId"] == call.key.company_id
            and (include_archived or not group["archived"])
        ]
    )


def create_tag_group(call: Call) -> Response:
    body = bodies.json_object(call.body)
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad_request("'metadata' must be an object of strings.")
    now = now_iso()
    group: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "companyId": call.key.company_id,
        "name": bodies.required_text(body, "name"),
        "code": bodies.required_text(body, "code"),
        "archived": bodies.boolean(body, "archived"),
        "metadata": metadata,
        "createdAt": now,
        "updatedAt": now,
    }
    call.state.tag_groups[group["id"]] = group
    return data(group, 201)


def get_tag_group(call: Call) -> Response:
    found = call.state.tag_groups.get(call.params["groupId"])
    return data(owned(call, found, "TAG_GROUP_NOT_FOUND", "Tag group"))
