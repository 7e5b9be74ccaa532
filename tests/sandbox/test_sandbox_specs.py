"""`broker.sandbox.specs`: Pleo's specs as data, and answers shaped to a response schema."""

from __future__ import annotations

import uuid

from broker.sandbox import specs


def test_every_operation_has_its_success_status_and_schema() -> None:
    operations = specs.operations()
    assert len(operations) == 92
    created = operations[("POST", "/v1/chart-of-accounts")]
    assert (created.spec, created.status) == ("accounts-api", 200)
    assert operations[("DELETE", "/v0/tag-groups/{groupId}")].status == 204
    assert operations[("POST", "/v3/export-jobs")].status == 201
    assert "$ref" not in str(operations[("GET", "/v3/export-jobs")].schema)


def test_shape_keeps_known_fields_and_fills_required_ones() -> None:
    schema = {
        "type": "object",
        "required": ["id", "status", "tags", "when"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["ACTIVE", "INACTIVE"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "when": {"type": "string", "format": "date-time"},
            "note": {"type": ["string", "null"]},
            "count": {"type": "integer"},
        },
    }
    shaped = specs.shape(schema, {"id": "not-a-uuid", "note": None, "count": True, "x": 1})
    assert set(shaped) == {"id", "status", "tags", "when", "note", "count"}
    uuid.UUID(shaped["id"])  # a wrong format is replaced, not echoed
    assert (shaped["status"], shaped["tags"], shaped["note"]) == ("ACTIVE", [], None)
    assert shaped["count"] == 0  # a boolean is no integer


def test_shape_follows_all_of_one_of_and_free_objects() -> None:
    schema = {
        "allOf": [
            {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}},
            {"properties": {"b": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}},
        ]
    }
    assert specs.shape(schema, {"b": "x", "c": 1}) == {"a": 0, "b": "x"}
    free = {"type": "object", "additionalProperties": {"type": "string"}}
    assert specs.shape(free, {"k": "v", "n": 5}) == {"k": "v", "n": "x"}
    assert specs.shape({"type": "object"}, {"any": [1]}) == {"any": [1]}
