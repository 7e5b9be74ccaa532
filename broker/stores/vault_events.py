"""The Vault store's event log: append-only chunks `<mount>/data/<prefix>/events/<n>`.

KV v2 has no transaction over two secrets, so an event is first written into the tenant's
own secret, in its `outbox` field, by the same check-and-set write as the change (or the
tombstone) it describes; then it is copied to the log (`EventLog.append`). The copy is
retried when the tenant's secret is next read or written (`pending`), so an event whose copy
a crash interrupted still reaches the log. A write that replaces the secret (a put, a
tombstone, a reconnect over a tombstone) copies the outbox it replaces first, and carries the
events it could not copy into its own outbox, so no write ever drops an unlogged event; events
older than the retention are not copied again (the log has pruned them).

The log is a sequence of chunks, each a secret holding up to `CHUNK_SIZE` entries (one JSON
string each: `{"at": <appended>, "event": …}`), appended to with check-and-set so replicas
racing each other never overwrite an entry. An entry keeps its position for good: a reader's
cursor is `<chunk>.<entries read>`. Before appending, the chunks written since shortly before
the event was made are searched for its id, so an event copied twice is logged once.
Retention drops whole chunks, never the newest.

The webhook deliverer reads the log in order from a cursor it keeps, with its lease and its
retry queue, in one secret of its own (`broker.stores.vault_delivery`).
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.errors import StoreUnavailable
from broker.outbox import Event, stamp
from broker.stores.runner import Run

CHUNK_SIZE = 40  # entries a chunk holds (OpenBao refuses a body of 1,000 strings or more)
APPEND_ATTEMPTS = 10
CLOCK_SKEW = timedelta(minutes=5)  # how far replicas' clocks may disagree
Entry = tuple[str, Event]  # (appended at, event)


def outbox(events: Sequence[Event]) -> dict[str, object]:
    """The field a tenant's secret carries its change's events in (nothing if none)."""
    return {"outbox": [event.dumps() for event in events]} if events else {}


def pending(data: Mapping[str, object]) -> list[Event]:
    """The events a tenant's secret carries (maybe logged already)."""
    found = data.get("outbox")
    if not isinstance(found, list):
        return []
    return [Event.loads(text) for text in found if isinstance(text, str)]


class EventLog:
    """Appends events to the log and reads them back in order."""

    def __init__(self, kv: KvV2, call: Run, *, mount: str, base: str) -> None:
        self._kv = kv
        self._call = call
        self._mount = mount
        self.base = base
        self._lock = asyncio.Lock()
        self._logged: set[str] = set()  # ids this process saw in the log (bounded below)

    async def append(self, events: Sequence[Event]) -> None:
        """Add the events not in the log yet, in order (StoreUnavailable: try again later)."""
        async with self._lock:
            for _ in range(APPEND_ATTEMPTS):
                new = [event for event in events if event.id not in self._logged]
                if not new:
                    return
                chunks = await self._call(self._chunks)
                last = chunks[-1] if chunks else 0
                entries, version = await self._call(partial(self._read, last))
                new = await self._unlogged(new, chunks, entries)
                if not new:
                    return
                if len(entries) >= CHUNK_SIZE:
                    last, entries, version = last + 1, [], 0
                now = stamp(datetime.now(UTC))
                batch = new[: CHUNK_SIZE - len(entries)]
                entries += [(now, event) for event in batch]
                if await self._call(partial(self._write, last, entries, version)):
                    self._remember(event.id for event in batch)
            raise StoreUnavailable(
                f"The event log kept changing under the broker ({APPEND_ATTEMPTS} attempts)."
            )

    async def read(
        self, cursor: str | None, limit: int, tenant: str | None
    ) -> tuple[builtins.list[Event], str | None]:
        """Up to `limit` events after `cursor`, oldest first, and the cursor after them."""
        found, position = await self.positioned(cursor, limit, tenant)
        return [event for _, event in found], position

    async def positioned(
        self, cursor: str | None, limit: int, tenant: str | None, until: str | None = None
    ) -> tuple[builtins.list[tuple[str, Event]], str | None]:
        """Up to `limit` events after `cursor` and not after `until`, oldest first, each with
        the cursor after it; and the cursor after the last entry looked at."""
        chunk, index = parse_cursor(cursor)
        stop = parse_cursor(until) if until is not None else None
        found: builtins.list[tuple[str, Event]] = []
        position = cursor
        for number in [n for n in await self._call(self._chunks) if n >= chunk]:
            if stop is not None and number > stop[0]:
                break
            entries, _ = await self._call(partial(self._read, number))
            start = index if number == chunk else 0
            for offset, (_, event) in enumerate(entries[start:], start=start + 1):
                if len(found) == limit or (stop is not None and (number, offset) > stop):
                    return found, position
                position = f"{number}.{offset}"
                if tenant is None or event.tenant == tenant:
                    found.append((position, event))
        return found, position

    async def count_after(self, cursor: str | None) -> int:
        """How many entries the log holds after `cursor` (the newest chunk is read; the
        others are full)."""
        chunk, index = parse_cursor(cursor)
        chunks = [n for n in await self._call(self._chunks) if n >= chunk]
        if not chunks:
            return 0
        newest, _ = await self._call(partial(self._read, chunks[-1]))
        count = len(newest) + CHUNK_SIZE * (len(chunks) - 1)
        return max(0, count - (index if chunks[0] == chunk else 0))

    async def prune(self, before: datetime) -> int:
        """Drop the chunks whose every entry is older than `before` (never the newest)."""
        cut, pruned = stamp(before), 0
        chunks = await self._call(self._chunks)
        for number in chunks[:-1]:
            entries, _ = await self._call(partial(self._read, number))
            if entries and entries[-1][0] >= cut:
                break
            await self._call(partial(self._forget, number))
            pruned += len(entries)
        return pruned

    async def _unlogged(
        self, events: list[Event], chunks: list[int], newest: list[Entry]
    ) -> list[Event]:
        """`events` without those the log holds (searching back to shortly before them)."""
        since = stamp(min(_moment(event.timestamp) for event in events) - CLOCK_SKEW)
        seen = {event.id for _, event in newest}
        entries = newest
        for number in reversed(chunks[:-1]):
            if entries and entries[0][0] < since:
                break
            entries, _ = await self._call(partial(self._read, number))
            seen.update(event.id for _, event in entries)
        self._remember(seen)
        return [event for event in events if event.id not in seen]

    def _remember(self, ids: Iterable[str]) -> None:
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.update(ids)

    # Blocking calls, run on the store's pool.

    def _path(self, number: int) -> str:
        return f"{self.base}/{number:012d}"

    def _chunks(self) -> list[int]:
        try:
            response = self._kv.list_secrets(path=self.base, mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return []
        keys: Iterable[str] = response["data"]["keys"]
        return sorted(int(key) for key in keys if key.isdigit())

    def _read(self, number: int) -> tuple[list[Entry], int]:
        try:
            response = self._kv.read_secret_version(
                path=self._path(number), mount_point=self._mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return [], 0
        data = response["data"]
        texts = data["data"].get("entries") or []
        entries = [json.loads(text) for text in texts]
        return [
            (str(entry["at"]), Event.loads(json.dumps(entry["event"]))) for entry in entries
        ], int(data["metadata"]["version"])

    def _write(self, number: int, entries: list[Entry], cas: int) -> bool:
        texts = [json.dumps({"at": at, "event": event.body()}) for at, event in entries]
        try:
            self._kv.create_or_update_secret(
                path=self._path(number),
                secret={"entries": texts},
                cas=cas,
                mount_point=self._mount,
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                return False
            raise
        return True

    def _forget(self, number: int) -> None:
        self._kv.delete_metadata_and_all_versions(path=self._path(number), mount_point=self._mount)


def parse_cursor(cursor: str | None) -> tuple[int, int]:
    """The chunk and entry a cursor names (ValueError: not one of ours)."""
    if cursor is None:
        return 0, 0
    chunk, dot, index = cursor.partition(".")
    if not (dot and cursor.isascii() and chunk.isdigit() and index.isdigit() and len(cursor) < 40):
        raise ValueError("not a cursor of this store")
    return int(chunk), int(index)


def _moment(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
