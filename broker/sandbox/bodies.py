"""Reading JSON request bodies the way Pleo does: wrong shapes get a 400 naming the field."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any

from broker.sandbox.envelopes import bad_request

_MISSING = object()


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def text(obj: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = obj.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise bad_request(f"'{name}' is required.")
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.")
    return value


def required_text(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise bad_request(f"'{name}' is required and must be a string.")
    return value


def choice(
    obj: dict[str, Any], name: str, allowed: Collection[str], *, required: bool = True
) -> str | None:
    value = text(obj, name, required=required)
    if value is not None and value not in allowed:
        raise bad_request(f"'{name}' must be one of {sorted(allowed)}.")
    return value


def boolean(obj: dict[str, Any], name: str, *, required: bool = True) -> bool | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required.")
        return None
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false.")
    return value


def number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' is required and must be a number.")
    return value


def uuid_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a UUID.")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise bad_request(f"'{name}' must be a UUID.") from None


def text_list(obj: dict[str, Any], name: str) -> list[str] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request(f"'{name}' must be a list of strings.")
    return value
