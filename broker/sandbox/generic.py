"""Spec-driven handlers for the operations without a hand-written one.

What an operation does is read from its path template (see `plan`):

    GET    /things            list (the key's company, paginated)
    POST   /things            create (the body, plus id, companyId, timestamps)
    POST   /things:search     list
    GET    /things/{id}       get (404 `<THING>_NOT_FOUND` when absent, 403 when foreign)
    PUT    /things/{id}       update (the body merged in)
    POST   /things/{id}       create or update with that id
    DELETE /things/{id}       delete (204)
    POST   /things/{id}:verb  an action on the thing (`archive`/`activate` set its state)
    PUT    /things/{id}/part  update the thing with the body
    GET    /things/{id}/part  list the part (a collection nested under the thing)
    POST   /things:verb       an action on the collection: answers the body
    DELETE /things            delete the things whose ids the body lists

Nested collections keep their parent's path parameters as fields and list only their own.
Every answer is shaped by the operation's response schema (`specs.shape`), with the
operation's documented success status.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from broker.sandbox.api import Call, Handler, forbidden
from broker.sandbox.envelopes import PleoError, PleoJSONResponse, bad_request, page_body
from broker.sandbox.specs import Operation, shape
from broker.sandbox.state import now_iso

_ITEM = re.compile(r"/\{(?P<param>\w+)\}(?::(?P<verb>[\w-]+))?$")
_PARAM = re.compile(r"\{(\w+)\}")
# Collections reached under two paths: tags are created in their group, read by id.
ALIASES = {"/v0/tag-groups/{groupId}/tags": "/v0/tags"}
# Literal paths that are actions, not collections.
ACTIONS = frozenset({("POST", "/v0/tags/archive")})
_VERB_STATES = {"archive": ("ARCHIVED", True), "activate": ("ACTIVE", False)}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a generic operation does: `kind` on `collection` (item id in `param`)."""

    kind: str
    collection: str
    param: str | None = None
    verb: str | None = None


def plan(method: str, template: str) -> Plan:
    """Read what an operation does from its method and path (the module docstring's table)."""
    if (method, template) in ACTIONS:
        return Plan("action", template)
    item = _ITEM.search(template)
    if item is not None:
        collection = template[: item.start()]
        if item["verb"]:
            return Plan("verb", collection, item["param"], item["verb"])
        kinds = {"GET": "get", "PUT": "update", "DELETE": "delete", "POST": "upsert"}
        return Plan(kinds[method], collection, item["param"])
    last = template.rsplit("/", 1)[-1]
    if ":" in last:
        collection, verb = template.rsplit(":", 1)
        return Plan("list" if verb == "search" else "action", collection, verb=verb)
    parent = re.search(r"/\{(\w+)\}/[\w-]+$", template)
    if parent is not None and method == "PUT":
        return Plan("update", template[: parent.start()], parent[1])
    kinds = {"GET": "list", "POST": "create", "PUT": "action", "DELETE": "delete_many"}
    return Plan(kinds[method], template)


def _name(collection: str) -> str:
    last = [part for part in collection.split("/") if part and "{" not in part][-1]
    return last.removesuffix("s").replace("-", "_").upper()


def _store(call: Call, collection: str) -> dict[str, dict[str, Any]]:
    return call.state.collection(ALIASES.get(collection, collection))


def _parents(call: Call, collection: str) -> dict[str, str]:
    return {name: call.params[name] for name in _PARAM.findall(collection)}


def _check_parents(call: Call, collection: str) -> None:
    """404 unless each thing the collection is nested under exists and is the company's."""
    for name in _PARAM.findall(collection):
        parent = collection[: collection.index("/{" + name + "}")]
        _owned(call, Plan("get", parent, name))


def _owned(call: Call, found: Plan) -> dict[str, Any]:
    assert found.param is not None
    _check_parents(call, found.collection)
    record = _store(call, found.collection).get(call.params[found.param])
    parents = _parents(call, found.collection)
    name = _name(found.collection)
    if record is None or any(record.get(k) != value for k, value in parents.items()):
        raise PleoError(404, f"{name}_NOT_FOUND", f"No {name.lower()} {call.params[found.param]}.")
    if record.get("companyId", call.key.company_id) != call.key.company_id:
        raise forbidden(f"This key has no access to this {name.lower().replace('_', ' ')}.")
    return record


def _body_object(call: Call) -> dict[str, Any]:
    if call.body is None:
        return {}
    if not isinstance(call.body, dict):
        raise bad_request("The request body must be a JSON object.")
    return call.body


def _listed(call: Call, found: Plan) -> dict[str, Any]:
    _check_parents(call, found.collection)
    parents = _parents(call, found.collection)
    records = [
        record
        for record in _store(call, found.collection).values()
        if record.get("companyId") == call.key.company_id
        and all(record.get(name) == value for name, value in parents.items())
    ]
    return page_body(records, call.query)


def _create(call: Call, found: Plan, record_id: str | None = None) -> dict[str, Any]:
    _check_parents(call, found.collection)
    now = now_iso()
    record: dict[str, Any] = {"createdAt": now, **_body_object(call)}
    record.update(
        id=record_id or str(uuid.uuid4()),
        companyId=call.key.company_id,
        updatedAt=now,
        **_parents(call, found.collection),
    )
    _store(call, found.collection)[record["id"]] = record
    return record


def _update(call: Call, found: Plan) -> dict[str, Any]:
    record = _owned(call, found)
    protected = {"id", "companyId", *_parents(call, found.collection)}
    record.update({k: v for k, v in _body_object(call).items() if k not in protected})
    record["updatedAt"] = now_iso()
    return record


def _verb(call: Call, found: Plan) -> dict[str, Any]:
    record = _update(call, found)
    if found.verb in _VERB_STATES:
        state, archived = _VERB_STATES[found.verb]
        record.update(state=state, archived=archived)
    return record


def _delete(call: Call, found: Plan) -> None:
    record = _owned(call, found)
    del _store(call, found.collection)[record["id"]]


def _delete_many(call: Call, found: Plan) -> None:
    body = _body_object(call)
    ids: Any = next((v for k, v in body.items() if k.lower().endswith("ids")), [])
    store = _store(call, found.collection)
    for record_id in ids if isinstance(ids, list) else []:
        record = store.get(str(record_id))
        if record is not None and record.get("companyId") == call.key.company_id:
            del store[record["id"]]


def _answer(call: Call, found: Plan) -> Any:
    """The candidate answer body (None: no body)."""
    if found.kind == "list":
        return _listed(call, found)
    if found.kind == "create":
        return {"data": _create(call, found)}
    if found.kind == "get":
        return {"data": _owned(call, found)}
    if found.kind in ("update", "verb"):
        return {"data": (_verb if found.kind == "verb" else _update)(call, found)}
    if found.kind == "upsert":
        assert found.param is not None
        existing = _store(call, found.collection).get(call.params[found.param])
        if existing is not None:
            return {"data": _update(call, found)}
        return {"data": _create(call, found, call.params[found.param])}
    if found.kind == "delete":
        _delete(call, found)
        return None
    if found.kind == "delete_many":
        _delete_many(call, found)
        return None
    return {"data": _body_object(call), **_body_object(call)}


def handler(operation: Operation) -> Handler:
    """A handler for `operation` (see the module docstring)."""
    found = plan(operation.method, operation.template)

    def handle(call: Call) -> Response:
        answer = _answer(call, found)
        if answer is None and operation.schema is None:  # a delete: 204 unless documented
            return Response(status_code=operation.status if operation.status != 200 else 204)
        if operation.schema is None or operation.status == 204:
            return Response(status_code=operation.status)
        return PleoJSONResponse(shape(operation.schema, answer), operation.status)

    return handle
