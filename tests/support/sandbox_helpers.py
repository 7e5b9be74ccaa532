"""Helpers for the sandbox tests: Basic auth headers and OpenAPI response validation."""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from werkzeug.datastructures import MultiDict

OPENAPI_DIR = Path(__file__).parents[1] / "openapi"
PLEO_HOST = "https://external.pleo.io"


def basic(api_key: str) -> dict[str, str]:
    """The Authorization header Pleo wants: Basic, the key as user name, empty password."""
    return {"Authorization": "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()}


def strip_date_patterns(node: Any) -> Any:
    # Pleo's specs put a date *format* in `pattern` ("YYYY-MM-DDTHH:mi:ssZ"), which as a
    # regular expression matches no real timestamp; `format: date-time` still checks them.
    if isinstance(node, dict):
        return {
            key: strip_date_patterns(value)
            for key, value in node.items()
            if not (key == "pattern" and isinstance(value, str) and "yyyy" in value.lower())
        }
    if isinstance(node, list):
        return [strip_date_patterns(item) for item in node]
    return node


@functools.cache
def spec(name: str) -> Any:
    """The OpenAPI object for `tests/openapi/pleo-<name>-openapi.yml`."""
    raw = yaml.safe_load((OPENAPI_DIR / f"pleo-{name}-openapi.yml").read_text())
    return OpenAPI.from_dict(strip_date_patterns(raw))


def assert_matches_spec(name: str, response: httpx.Response) -> None:
    """Raise unless `response` (and its request) is what the spec `name` documents."""
    request = response.request
    openapi_request = MockRequest(
        PLEO_HOST,
        request.method,
        request.url.path,
        args=MultiDict(request.url.params.multi_items()),  # repeated parameters kept
        data=request.content,
        content_type=request.headers.get("content-type", "application/json"),
    )
    openapi_response = MockResponse(
        response.content,
        status_code=response.status_code,
        headers=dict(response.headers),
        content_type=response.headers.get("content-type", "application/json"),
    )
    spec(name).validate_response(openapi_request, openapi_response)
