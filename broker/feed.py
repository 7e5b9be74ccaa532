"""The event feed of the admin API (docs/contract.md, "Events"): `GET /v1/events`.

`?after=<cursor>&limit=<n>&tenant=<t>` answers `{"events": [...], "next": <cursor>}`: the
events after `after` (from the oldest kept without it), oldest first, at most `limit`
(`DEFAULT_LIMIT`, at most `MAX_LIMIT`), only `tenant`'s if given. `next` is the cursor to
pass as `after` to go on (opaque; the same as `after` when there is nothing new). Events are
kept `BROKER_EVENT_RETENTION_DAYS`; `prune_forever` drops older ones in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker import errors
from broker.events import emit
from broker.records import valid_tenant_id
from broker.stores import SecretStore

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
PRUNE_EVERY = 3600.0  # seconds between two prunings of the event log


async def list_events(request: Request) -> Response:
    """`GET /v1/events`: the events after a cursor, oldest first."""
    params = request.query_params
    limit = _limit(params.get("limit"))
    tenant = params.get("tenant")
    if tenant is not None and not valid_tenant_id(tenant):
        raise errors.RequestInvalid("tenant is not a valid tenant id.")
    after = params.get("after") or None
    store: SecretStore = request.app.state.broker.tenants.store
    try:
        events, cursor = await store.events_after(after, limit, tenant)
    except ValueError:
        raise errors.RequestInvalid(
            "after is not a cursor this feed gave out; leave it out to start from the oldest"
            " event kept."
        ) from None
    return JSONResponse({"events": [event.body() for event in events], "next": cursor})


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
        raise errors.RequestInvalid(f"limit must be a whole number from 1 to {MAX_LIMIT}.")
    return int(raw)


async def prune_once(store: SecretStore, retention_days: int) -> int:
    """Drop the events older than the retention; how many (0, logged, if the store failed)."""
    try:
        pruned = await store.prune_events(datetime.now(UTC) - timedelta(days=retention_days))
    except errors.StoreError as exc:
        emit("events.prune_failed", level=logging.WARNING, error=exc.message)
        return 0
    except Exception as exc:  # the background task must outlive one bad pruning
        emit("events.prune_failed", level=logging.ERROR, error=type(exc).__name__)
        return 0
    if pruned:
        emit("events.pruned", events=pruned)
    return pruned


async def prune_forever(
    store: SecretStore, retention_days: int, every: float = PRUNE_EVERY
) -> None:
    """Prune now and then every `every` seconds, until cancelled."""
    while True:
        if store.read_only is None:
            await prune_once(store, retention_days)
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def pruning(store: SecretStore, retention_days: int) -> AsyncIterator[None]:
    """Prune in the background while the block runs."""
    task = asyncio.create_task(prune_forever(store, retention_days), name="event-pruning")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
