"""`broker events [--follow] [--tenant T] [--json]`: the event feed on the command line.

Reads `GET /v1/events` page by page with its cursor and prints one line an event; with
`--follow` it then polls for new ones every `--interval` seconds until Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx

PAGE = 500


class Caller(Protocol):
    """What `broker events` needs of the CLI's admin client."""

    def call(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None
    ) -> httpx.Response: ...


def run_events(
    client: Caller,
    *,
    tenant: str | None,
    follow: bool,
    as_json: bool,
    interval: float,
    fail: Callable[[httpx.Response], int],
) -> int:
    """Print the feed (and, following, what comes next); the exit status (`fail`'s when the
    admin API refuses)."""
    show = _json_line if as_json else format_event
    cursor: str | None = None
    try:
        while True:
            cursor, refused, more = _page(client, cursor, tenant, show)
            if refused is not None:
                return fail(refused)
            if more:
                continue
            if not follow:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0  # Ctrl-C ends following: not an error


def _page(
    client: Caller, cursor: str | None, tenant: str | None, show: Callable[[Any], str]
) -> tuple[str | None, httpx.Response | None, bool]:
    """Print one page; the next cursor, the answer if it was a refusal, whether it was full."""
    params = {"limit": str(PAGE)}
    if cursor is not None:
        params["after"] = cursor
    if tenant is not None:
        params["tenant"] = tenant
    response = client.call("GET", "/v1/events", params=params)
    if response.status_code != 200:
        return cursor, response, False
    page = response.json()
    for event in page["events"]:
        print(show(event), flush=True)
    return page["next"] or cursor, None, len(page["events"]) == PAGE


def format_event(event: Mapping[str, Any]) -> str:
    """One event as a line: when, what, which tenant, who, and the state it left."""
    data = event["data"]
    state = data.get("state") or "-"
    if data.get("reason"):
        state += f" ({data['reason']})"
    actor = event["actor"]
    if event.get("caller"):
        actor += f" (caller {event['caller']})"
    return (
        f"{event['timestamp']}  {event['type']:<26} {data['tenant']:<20} {state:<28} by {actor}"
    ).rstrip()


def _json_line(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True)
