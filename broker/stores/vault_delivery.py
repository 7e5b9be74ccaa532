"""The Vault store's webhook delivery state: one secret, `<mount>/data/<prefix>/delivery`.

The event log is ordered, so the state is small: `cursor`, how far into the log the deliverer
has read; `queue`, the events read but not yet delivered or given up (each with its failed
attempts and the time of its retry), in log order; and the lease, `holder` and `lease_until`.
A replica claims by a check-and-set write naming itself the holder (only when no other
holder's lease runs), and renews the lease with every write; its settlements are check-and-set
writes too, made only while it is still the holder. So one replica delivers at a time, and when
it dies its lease runs out and another replica goes on from the same queue and cursor: an
event sent but not settled is sent again (at least once). A tenant's events wait behind its
first queued one; at most `QUEUE_SIZE` events are queued, the rest wait in the log.

The whole state is one JSON string in the secret (OpenBao limits the strings in a request).
It holds events (tenant views), never a key.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.delivery import Delivery, Settlement
from broker.errors import StoreUnavailable
from broker.outbox import Event, stamp
from broker.stores.runner import Run
from broker.stores.vault_events import EventLog

QUEUE_SIZE = 200  # events read from the log and not settled yet, at most
SETTLE_ATTEMPTS = 5
VERSIONS_KEPT = 2
COUNT_LIMIT = 100_000  # pending events counted at most


@dataclass(frozen=True, slots=True)
class Queued:
    """An event read from the log, waiting for delivery."""

    event: Event
    attempts: int = 0
    due: str | None = None  # the retry time (stamp); None: now


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """The delivery secret's contents."""

    cursor: str | None = None
    holder: str | None = None
    lease_until: str | None = None
    queue: tuple[Queued, ...] = ()

    def held_by_another(self, holder: str, now: datetime) -> bool:
        """Whether another holder's lease still runs at `now`."""
        return (
            self.holder not in (None, holder)
            and self.lease_until is not None
            and self.lease_until > stamp(now)
        )

    def due(self, now: datetime, limit: int) -> list[Delivery]:
        """Each tenant's first queued event whose time has come, oldest first."""
        found: list[Delivery] = []
        seen: set[str] = set()
        for item in self.queue:
            if item.event.tenant in seen:
                continue
            seen.add(item.event.tenant)
            if item.due is None or item.due <= stamp(now):
                found.append(Delivery(item.event, item.attempts))
                if len(found) == limit:
                    break
        return found

    def settle(self, settled: Sequence[Settlement]) -> DeliveryState:
        """The state with `settled` applied to its queue."""
        outcomes = {item.event_id: item for item in settled}
        queue: list[Queued] = []
        for item in self.queue:
            outcome = outcomes.get(item.event.id)
            if outcome is None:
                queue.append(item)
            elif outcome.result == "retried" and outcome.retry_at is not None:
                queue.append(replace(item, attempts=item.attempts + 1, due=stamp(outcome.retry_at)))
        return replace(self, queue=tuple(queue))

    def encode(self) -> dict[str, object]:
        """The secret's data."""
        state = {
            "cursor": self.cursor,
            "holder": self.holder,
            "lease_until": self.lease_until,
            "queue": [
                {"event": item.event.body(), "attempts": item.attempts, "due": item.due}
                for item in self.queue
            ],
        }
        return {"state": json.dumps(state, sort_keys=True)}

    @classmethod
    def decode(cls, data: object) -> DeliveryState:
        """The state `data` holds (StoreUnavailable if it is not one)."""
        try:
            assert isinstance(data, dict)
            state = json.loads(data["state"])
            queue = tuple(
                Queued(Event.loads(json.dumps(item["event"])), int(item["attempts"]), item["due"])
                for item in state["queue"]
            )
            return cls(state["cursor"], state["holder"], state["lease_until"], queue)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise StoreUnavailable(
                "The webhook delivery state in Vault cannot be read; delete the secret"
                " <prefix>/delivery to start delivering again from the oldest event kept."
            ) from exc


class VaultDelivery:
    """Claims, settles and counts webhook deliveries in the delivery secret."""

    def __init__(self, kv: KvV2, call: Run, log: EventLog, *, mount: str, path: str) -> None:
        self._kv = kv
        self._call = call
        self._log = log
        self._mount = mount
        self.path = path

    async def claim(
        self, holder: str, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        """Take or renew the lease, read new events into the queue, and return the due ones."""
        state, version = await self._call(self._read)
        if state.held_by_another(holder, now):
            return []
        changed = state.holder != holder or version == 0
        if len(state.queue) < QUEUE_SIZE:
            events, cursor = await self._log.read(state.cursor, QUEUE_SIZE - len(state.queue), None)
            if events or cursor != state.cursor:
                queue = state.queue + tuple(Queued(event) for event in events)
                state, changed = replace(state, cursor=cursor, queue=queue), True
        # Renew when half the lease is gone: a holder with work writes every round anyway.
        if changed or state.lease_until is None or state.lease_until < stamp(now + lease / 2):
            state = replace(state, holder=holder, lease_until=stamp(now + lease))
            if not await self._call(partial(self._write, state, version)):
                return []  # another replica wrote first
        return state.due(now, limit)

    async def settle(self, holder: str, settled: Sequence[Settlement], now: datetime) -> None:
        """Record how `holder`'s attempts ended, while it still holds the lease."""
        for _ in range(SETTLE_ATTEMPTS):
            state, version = await self._call(self._read)
            if state.holder != holder or state.held_by_another(holder, now):
                return  # the lease ran out and another replica took over
            state = state.settle(settled)  # the lease is renewed by the next claim
            if await self._call(partial(self._write, state, version)):
                return
        raise StoreUnavailable("The webhook delivery state kept changing under the broker.")

    async def pending(self) -> int:
        """The events queued or still in the log after the cursor."""
        state, _ = await self._call(self._read)
        count, cursor = len(state.queue), state.cursor
        while count < COUNT_LIMIT:
            events, after = await self._log.read(cursor, 500, None)
            if not events:
                break
            count, cursor = count + len(events), after
        return count

    # Blocking calls, run on the store's pool.

    def _read(self) -> tuple[DeliveryState, int]:
        try:
            response = self._kv.read_secret_version(
                path=self.path, mount_point=self._mount, raise_on_deleted_version=False
            )
        except hvac.exceptions.InvalidPath:
            return DeliveryState(), 0
        data = response["data"]
        version = int(data["metadata"]["version"])
        if not data["data"]:
            return DeliveryState(), version  # soft-deleted: start over
        return DeliveryState.decode(data["data"]), version

    def _write(self, state: DeliveryState, cas: int) -> bool:
        try:
            self._kv.create_or_update_secret(
                path=self.path, secret=state.encode(), cas=cas, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                return False
            raise
        if cas == 0:
            # Old versions hold only events (never a key); keeping few saves space.
            self._kv.update_metadata(
                path=self.path, max_versions=VERSIONS_KEPT, mount_point=self._mount
            )
        return True
