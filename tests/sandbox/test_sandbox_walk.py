"""Every operation of every spec in `tests/openapi/` answers in the sandbox.

Generated from the specs, not from a hand list: the walk creates first (POST to a
collection), then lists, then the rest, deleting last, so path parameters name things that
exist (ids are kept by the path segment before the parameter: `/v0/tags/{tagId}` takes the
id of a thing created under a `tags` segment). Request bodies are the spec's example or the
required fields of its schema. No declared method may answer 404, 405 or 501.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.sandbox_helpers import OPENAPI_DIR, basic

from broker.sandbox import SandboxKey, SandboxState, create_app, inventory
from broker.sandbox.specs import SPEC_DIR

_PARAM = re.compile(r"\{(\w+)\}")
_QUERY_IDS = {"job_id": "export-jobs", "jobId": "export-jobs"}


def _resolve(node: Any, root: dict[str, Any], depth: int = 0) -> Any:
    if isinstance(node, dict):
        if "$ref" in node and depth < 8:
            target: Any = root
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            return _resolve(target, root, depth + 1)
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(item, root, depth) for item in node]
    return node


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(OPENAPI_DIR.glob("pleo-*.yml")):
        root = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        for template, item in root["paths"].items():
            for method in ("get", "post", "put", "delete", "patch"):
                if method in item:
                    found.setdefault((method.upper(), template), _resolve(item[method], root))

    def order(key: tuple[str, str]) -> tuple[int, int, str]:
        method, template = key
        if method == "POST" and not template.endswith("}") and ":" not in template:
            return (0, 0, template)
        if method == "DELETE":  # the deepest first: a tag's dimensions before the tag
            return (3, -template.count("/"), template)
        return ({"GET": 2}.get(method, 1), 0, template)

    return [(m, t, found[(m, t)]) for m, t in sorted(found, key=order)]


OPERATIONS = _operations()


def _value(schema: dict[str, Any], name: str, company_id: str) -> Any:
    if "example" in schema:
        return schema["example"]
    for combiner in ("oneOf", "anyOf", "allOf"):
        if schema.get(combiner):
            return _value(schema[combiner][0], name, company_id)
    if "company" in name.lower():
        return company_id
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if kind == "object":
        props = schema.get("properties") or {}
        return {
            k: _value(props[k], k, company_id) for k in schema.get("required", []) if k in props
        }
    if kind == "array":
        return [_value(schema.get("items") or {}, name, company_id)]
    simple = {"integer": 1, "number": 1, "boolean": False}
    if kind in simple:
        return simple[kind]
    return str(uuid.uuid4()) if schema.get("format") == "uuid" else "walk"


def _ours(value: Any, company_id: str, ids: dict[str, str]) -> Any:
    """`value` with every company id the key's, every `jobId` one the walk created."""
    if isinstance(value, list):
        return [_ours(item, company_id, ids) for item in value]
    if not isinstance(value, dict):
        return value
    answer = {}
    for name, item in value.items():
        if "company" in name.lower() and isinstance(item, str):
            answer[name] = company_id
        elif name in _QUERY_IDS and _QUERY_IDS[name] in ids:
            answer[name] = ids[_QUERY_IDS[name]]
        else:
            answer[name] = _ours(item, company_id, ids)
    return answer


def _body(operation: dict[str, Any], company_id: str, ids: dict[str, str]) -> Any:
    content = (operation.get("requestBody") or {}).get("content") or {}
    media = content.get("application/json") or next(iter(content.values()), None)
    if media is None:
        return None
    if "example" in media:
        return _ours(media["example"], company_id, ids)
    return _ours(_value(media.get("schema") or {}, "", company_id), company_id, ids)


class Walk:
    def __init__(self, client: httpx.AsyncClient, key: SandboxKey) -> None:
        self.client, self.key = client, key
        self.ids: dict[str, str] = {"companies": key.company_id}

    def _id(self, template: str, name: str) -> str:
        if "company" in name.lower():
            return self.key.company_id
        before = template.split("{" + name + "}")[0].rstrip("/").rsplit("/", 1)[-1]
        return self.ids.get(before, str(uuid.uuid4()))

    def _remember(self, template: str, answer: httpx.Response) -> None:
        segment = [s for s in template.split("/") if s and "{" not in s and ":" not in s][-1]
        try:
            data = answer.json().get("data")
        except (ValueError, AttributeError):
            return
        first = data[0] if isinstance(data, list) and data else data
        if isinstance(first, dict) and isinstance(first.get("id"), str):
            self.ids.setdefault(segment, first["id"])

    async def call(self, method: str, template: str, operation: dict[str, Any]) -> httpx.Response:
        path = _PARAM.sub(lambda m: self._id(template, m[1]), template)
        query: dict[str, str] = {}
        for parameter in operation.get("parameters") or []:
            name = parameter["name"]
            if parameter.get("in") != "query" or not parameter.get("required"):
                continue
            if name in _QUERY_IDS:
                query[name] = self.ids.get(_QUERY_IDS[name], str(uuid.uuid4()))
            else:
                query[name] = str(_value(parameter.get("schema") or {}, name, self.key.company_id))
        body = _body(operation, self.key.company_id, self.ids)
        answer = await self.client.request(
            method,
            path,
            params=query,
            json=body,
            headers=basic(self.key.api_key),
        )
        self._remember(template, answer)
        return answer


@pytest.fixture
async def walk() -> AsyncIterator[Walk]:
    state = SandboxState()
    transport = httpx.ASGITransport(create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        yield Walk(client, state.create_key())


def test_the_walk_covers_every_spec() -> None:
    assert len(OPERATIONS) >= 92  # Pleo's 16 specs, operations in two specs counted once
    assert {spec.name for spec in OPENAPI_DIR.glob("pleo-*.yml")} and len(
        list(OPENAPI_DIR.glob("pleo-*.yml"))
    ) == 16


def _missing(answer: httpx.Response) -> bool:
    return answer.status_code in (404, 405, 501) or answer.status_code >= 500


async def test_every_declared_operation_answers(walk: Walk) -> None:
    first = [op for op in OPERATIONS if _missing(await walk.call(*op))]
    # a second pass for those whose inputs the first pass made later (an event before its job)
    missing = []
    for method, template, operation in first:
        answer = await walk.call(method, template, operation)
        if _missing(answer):
            missing.append(f"{method} {template} → {answer.status_code} {answer.text[:120]}")
    assert missing == [], "\n".join(missing)


def test_the_sandbox_serves_the_same_specs_as_the_tests_check() -> None:
    packaged = sorted(SPEC_DIR.glob("pleo-*.yml"))
    assert [path.name for path in packaged] == sorted(
        path.name for path in OPENAPI_DIR.glob("pleo-*.yml")
    )
    for path in packaged:
        assert path.read_bytes() == (OPENAPI_DIR / path.name).read_bytes(), path.name


def test_the_readme_lists_what_the_sandbox_implements() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert inventory.current(readme) == inventory.markdown(), (
        "README's sandbox list is stale: run `python -m broker.sandbox.inventory`"
    )
    for method, template, _ in OPERATIONS:
        assert f"`{method} {template}`" in readme
