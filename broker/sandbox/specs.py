"""Pleo's published OpenAPI specs as data: every operation, its answer's status and schema.

The specs are copies of `tests/openapi/` (a test keeps them identical). `operations()` lists
each (method, path) once; `shape(schema, value)` makes a candidate answer conform to a
response schema: fields the schema knows are kept, required fields the value lacks are
filled with a plain default (the first enum value, a fresh UUID, now, zero, empty).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

SPEC_DIR = Path(__file__).parent / "openapi"
_METHODS = ("get", "post", "put", "delete", "patch")


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of a spec: what a successful answer looks like."""

    method: str
    template: str
    spec: str
    status: int
    schema: dict[str, Any] | None  # of the success answer (resolved), None: no body


def _resolve(node: Any, root: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            if ref in seen:  # a recursive schema: stop at an open object
                return {"type": "object"}
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            return _resolve(target, root, (*seen, ref))
        return {key: _resolve(value, root, seen) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, root, seen) for item in node]
    return node


def _success(responses: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    codes = sorted(code for code in responses if code.isdigit() and code.startswith("2"))
    code = codes[0] if codes else "default"
    status = int(code) if code != "default" else 200
    content = (responses.get(code) or {}).get("content") or {}
    media: dict[str, Any] = next(iter(content.values()), {})
    return status, media.get("schema")


@functools.cache
def operations() -> dict[tuple[str, str], Operation]:
    """Every operation of every spec, by (METHOD, path template); the first spec wins."""
    found: dict[tuple[str, str], Operation] = {}
    for path in sorted(SPEC_DIR.glob("pleo-*-openapi.yml")):
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        root = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader
        for template, item in root.get("paths", {}).items():
            for method in _METHODS:
                if method not in item or (method.upper(), template) in found:
                    continue
                status, schema = _success(item[method].get("responses", {}))
                found[(method.upper(), template)] = Operation(
                    method.upper(),
                    template,
                    path.name.removeprefix("pleo-").removesuffix("-openapi.yml"),
                    status,
                    None if schema is None else _resolve(schema, root),
                )
    return found


def _merged(schema: dict[str, Any]) -> dict[str, Any]:
    """`allOf` folded into one object schema; `oneOf`/`anyOf`: the first choice; a list
    `type` (OpenAPI 3.1, `["string", "null"]`) as one type and `nullable`."""
    if isinstance(schema.get("type"), list):
        kinds = [kind for kind in schema["type"] if kind != "null"]
        nullable = len(kinds) < len(schema["type"])
        schema = {**schema, "type": kinds[0] if kinds else "string", "nullable": nullable}
    for combiner in ("oneOf", "anyOf"):
        if schema.get(combiner):
            return _merged({**schema, combiner: None, **schema[combiner][0]})
    if not schema.get("allOf"):
        return schema
    merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    for part in [schema, *schema["allOf"]]:
        part = _merged({k: v for k, v in part.items() if k != "allOf"})
        merged["properties"].update(part.get("properties") or {})
        merged["required"] += part.get("required") or []
        for key in ("type", "additionalProperties"):
            if key in part:
                merged[key] = part[key]
    return merged


def default(schema: dict[str, Any]) -> Any:
    """A plain value that `schema` accepts."""
    schema = _merged(schema)
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if kind == "object":
        return shape(schema, {})
    if kind == "array":
        return [default(schema.get("items") or {}) for _ in range(schema.get("minItems", 0))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return _text(schema)


def _text(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    if fmt == "uuid":
        return str(uuid.uuid4())
    if fmt == "date-time":
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if fmt == "date":
        return datetime.now(UTC).strftime("%Y-%m-%d")
    if fmt in ("uri", "url"):
        return "https://example.com/"
    return "x" * max(int(schema.get("minLength", 1)), 1)


def _fits(schema: dict[str, Any], value: Any) -> bool:
    schema = _merged(schema)
    kind = schema.get("type")
    if value is None:
        return bool(schema.get("nullable"))
    if schema.get("enum") and value not in schema["enum"]:
        return False
    checks: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "array": list,
        "object": dict,
    }
    wanted = checks.get(kind or "")
    if wanted is None:
        return True
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if not isinstance(value, wanted):
        return False
    return not isinstance(value, str) or _formatted(schema, value)


def _formatted(schema: dict[str, Any], value: str) -> bool:
    """Whether `value` has the schema's `format` (of those the sandbox writes)."""
    try:
        if schema.get("format") == "uuid":
            uuid.UUID(value)
        elif schema.get("format") == "date-time":
            datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def shape(schema: dict[str, Any] | None, value: Any) -> Any:
    """`value` made to conform to `schema` (see the module docstring)."""
    if schema is None:
        return value
    schema = _merged(schema)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "array":
        items = schema.get("items") or {}
        return [shape(items, item) for item in value] if isinstance(value, list) else []
    if kind != "object":
        return value if _fits(schema, value) else default(schema)
    if not isinstance(value, dict):
        value = {}
    properties: dict[str, Any] = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    answer: dict[str, Any] = {}
    for name, sub in properties.items():
        if name in value and (value[name] is not None or _merged(sub).get("nullable")):
            answer[name] = shape(sub, value[name])
        elif name in (schema.get("required") or []):
            answer[name] = default(sub)
    if extra is True or (not properties and extra is None):
        answer.update({k: v for k, v in value.items() if k not in answer})
    elif isinstance(extra, dict):
        answer.update({k: shape(extra, v) for k, v in value.items() if k not in properties})
    return answer
