"""Pleo's response shapes: `{"data": ...}`, cursor pagination and `{"type", "message"}` errors."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse, Response

MEDIA_TYPE = "application/json;charset=UTF-8"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
PAGE_ORDERS = frozenset(
    {"ASC", "ASC_NULLS_FIRST", "ASC_NULLS_LAST", "DESC", "DESC_NULLS_FIRST", "DESC_NULLS_LAST"}
)
_CURSOR = re.compile(r"[A-Z2-7=~]+")
_PAGING_PARAMS = frozenset({"before", "after", "offset", "limit", "sorting_keys", "sorting_order"})


class PleoJSONResponse(JSONResponse):
    media_type = MEDIA_TYPE


class PleoError(Exception):
    """An error answer in Pleo's shape."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return PleoJSONResponse(
            {"type": self.type, "message": self.message}, self.status, headers=self.headers
        )


def bad_request(message: str) -> PleoError:
    return PleoError(400, "INVALID_REQUEST", message)


def data(payload: Any, status: int = 200) -> Response:
    """The `{"data": ...}` envelope."""
    return PleoJSONResponse({"data": payload}, status)


def cursor(position: int) -> str:
    """An opaque cursor for a position in a list (base32, as Pleo's cursors look)."""
    return base64.b32encode(str(position).encode()).decode()


def _position(value: str, name: str) -> int:
    if not _CURSOR.fullmatch(value):
        raise bad_request(f"'{name}' is not a valid cursor.")
    try:
        return int(base64.b32decode(value.replace("~", "")).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad_request(f"'{name}' is not a valid cursor.") from None


def _non_negative(query: QueryParams, name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request(f"'{name}' must be a non-negative integer.")
    return int(raw)


def _sorted(items: list[dict[str, Any]], query: QueryParams) -> list[dict[str, Any]]:
    keys = query.getlist("sorting_keys")
    orders = query.getlist("sorting_order")
    if orders and len(orders) != len(keys):
        raise bad_request("'sorting_order' must give one order per sorting key.")
    if any(order not in PAGE_ORDERS for order in orders):
        raise bad_request(f"'sorting_order' values must be among {sorted(PAGE_ORDERS)}.")
    result = list(items)
    for index in reversed(range(len(keys))):
        key = keys[index]
        descending = bool(orders) and orders[index].startswith("DESC")
        result.sort(key=lambda item: str(item.get(key, "")), reverse=descending)
    return result


def page(items: Sequence[dict[str, Any]], query: QueryParams) -> Response:
    """One page of `items` in Pleo's cursor-paginated envelope."""
    return PleoJSONResponse(page_body(items, query))


def page_body(items: Sequence[dict[str, Any]], query: QueryParams) -> dict[str, Any]:
    """The body of `page`: `{"data": [...], "pagination": {...}}`."""
    before, after = query.get("before"), query.get("after")
    offset = _non_negative(query, "offset")
    if before is not None and (after is not None or offset is not None):
        raise bad_request("'before' cannot be used together with 'after' or 'offset'.")
    if after is not None and offset is not None:
        raise bad_request("'after' cannot be used together with 'offset'.")
    limit = _non_negative(query, "limit")
    size = min(DEFAULT_LIMIT if limit is None else limit, MAX_LIMIT)
    ordered = _sorted(list(items), query)

    if before is not None:
        end = min(_position(before, "before"), len(ordered))
        start = max(end - size, 0)
    else:
        start = _position(after, "after") + 1 if after is not None else offset or 0
        start = min(start, len(ordered))
        end = min(start + size, len(ordered))

    current: dict[str, Any] = {
        "parameters": {name: query.getlist(name) for name in query if name not in _PAGING_PARAMS},
        "sortingKeys": query.getlist("sorting_keys"),
        "sortingOrder": query.getlist("sorting_order"),
    }
    if limit is not None:
        current["limit"] = limit
    if offset is not None:
        current["offset"] = offset
    if before is not None:
        current["before"] = before
    if after is not None:
        current["after"] = after
    pagination: dict[str, Any] = {
        "currentRequestPagination": current,
        "hasNextPage": end < len(ordered),
        "hasPreviousPage": start > 0,
        "total": len(ordered),
    }
    if end > start:
        pagination["startCursor"] = cursor(start)
        pagination["endCursor"] = cursor(end - 1)
    return {"data": ordered[start:end], "pagination": pagination}
