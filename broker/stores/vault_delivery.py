"""The Vault store's webhook delivery state: one secret, `<mount>/data/<prefix>/delivery`.

The event log is ordered, so the state is small: `cursor`, how far into the log the deliverer
has read; `queue`, the events read but not yet delivered or given up (each with its failed
attempts and the time of its retry), in log order; and the lease, `holder` and `lease_until`.
A replica claims by a check-and-set write naming itself the holder (only when no other
holder's lease runs), and renews the lease with every write; its settlements are check-and-set
writes too, made only while it is still the holder. So one replica delivers at a time, and when
it dies its lease runs out and another replica goes on from the same queue and cursor: an
event sent but not settled is sent again (at least once). A tenant's events wait behind its
first queued one.

The state stays bounded, whatever a receiver does: at most `TENANT_QUEUE` events of one tenant
are queued; the log is read on past a tenant with a full queue, remembering in `resume` where
that tenant's unqueued events start in the log (and how many there are), and the tenant's queue
is refilled from there once it is empty. So a tenant whose receiver keeps failing holds up only
its own events. The whole state is kept under `STATE_BYTES` (Raft refuses an entry over 1 MiB):
past that, new events wait in the log until the queue shrinks.

The whole state is one JSON string in the secret (OpenBao limits the strings in a request).
It holds events (tenant views), never a key.
"""

from __future__ import annotations

import builtins
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial

import hvac.exceptions
from hvac.api.secrets_engines.kv_v2 import KvV2

from broker.delivery import Delivery, Settlement
from broker.errors import StoreUnavailable
from broker.outbox import Event, stamp
from broker.stores.runner import Run
from broker.stores.vault_events import EventLog

QUEUE_SIZE = 200  # events read from the log at once
READ_ROUNDS = 5  # reads of the log in one round, at most (past a full tenant's backlog)
TENANT_QUEUE = 20  # events of one tenant queued, at most (the rest wait in the log)
REFILLS = 20  # tenants whose queue is refilled from the log in one round, at most
STATE_BYTES = 256 * 1024  # the state's JSON, at most (well under Raft's 1 MiB per entry)
QUEUED_BYTES = 64  # a queued event's bookkeeping, besides its body
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
    resume: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # tenant: (cursor, count)

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

    def size(self) -> int:
        """The length of the state's JSON."""
        return len(json.dumps(self._plain(), sort_keys=True))

    def encode(self) -> dict[str, object]:
        """The secret's data."""
        return {"state": json.dumps(self._plain(), sort_keys=True)}

    def _plain(self) -> dict[str, object]:
        """The state as plain JSON values."""
        return {
            "cursor": self.cursor,
            "holder": self.holder,
            "lease_until": self.lease_until,
            "queue": [
                {"event": item.event.body(), "attempts": item.attempts, "due": item.due}
                for item in self.queue
            ],
            "resume": {tenant: list(where) for tenant, where in self.resume.items()},
        }

    @classmethod
    def decode(cls, data: object) -> DeliveryState:
        """The state `data` holds (StoreUnavailable if it is not one)."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"the delivery secret holds {type(data).__name__}, not a map")
            state = json.loads(data["state"])
            queue = tuple(
                Queued(Event.loads(json.dumps(item["event"])), int(item["attempts"]), item["due"])
                for item in state["queue"]
            )
            resume = {
                str(tenant): (str(where[0]), int(where[1]))
                for tenant, where in state.get("resume", {}).items()
            }
            return cls(state["cursor"], state["holder"], state["lease_until"], queue, resume)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
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
        read = await self._read_new(await self._refill(state))
        changed = read != state or state.holder != holder or version == 0
        state = read
        due = state.due(now, limit)
        # A full lease for every batch sent (it must outlast the attempts); an idle holder
        # renews when half the lease is gone.
        if (
            changed
            or due
            or state.lease_until is None
            or state.lease_until < stamp(now + lease / 2)
        ):
            state = replace(state, holder=holder, lease_until=stamp(now + lease))
            if not await self._call(partial(self._write, state, version)):
                return []  # another replica wrote first
        return due

    async def settle(
        self, holder: str, settled: Sequence[Settlement], now: datetime
    ) -> builtins.list[str]:
        """Record how `holder`'s attempts ended, while it still holds the lease; the ids of
        the events recorded."""
        for _ in range(SETTLE_ATTEMPTS):
            state, version = await self._call(self._read)
            if state.holder != holder or state.held_by_another(holder, now):
                return []  # the lease ran out and another replica took over
            queued = {item.event.id for item in state.queue}
            state = state.settle(settled)  # the lease is renewed by the next claim
            if await self._call(partial(self._write, state, version)):
                return [item.event_id for item in settled if item.event_id in queued]
        raise StoreUnavailable("The webhook delivery state kept changing under the broker.")

    async def release(self, holder: str) -> None:
        """End `holder`'s lease, if it still holds it (check-and-set: a replica that took over
        meanwhile keeps its own)."""
        state, version = await self._call(self._read)
        if state.holder == holder and version:
            released = replace(state, holder=None, lease_until=None)
            await self._call(partial(self._write, released, version))

    async def pending(self) -> int:
        """The events queued, waiting in the log behind a full tenant queue, or still in the
        log after the cursor (counted from the chunks, without reading them all)."""
        state, _ = await self._call(self._read)
        waiting = sum(count for _, count in state.resume.values())
        return len(state.queue) + waiting + await self._log.count_after(state.cursor)

    async def _refill(self, state: DeliveryState) -> DeliveryState:
        """`state` with the emptied queues of tenants in `resume` refilled from the log."""
        queued = Counter(item.event.tenant for item in state.queue)
        empty = [tenant for tenant in state.resume if not queued[tenant]][:REFILLS]
        if not empty:
            return state
        queue, resume, size = list(state.queue), dict(state.resume), state.size()
        for tenant in empty:
            position, count = resume.pop(tenant)
            found, _ = await self._log.positioned(position, TENANT_QUEUE, tenant, state.cursor)
            for after, event in found:
                cost = _cost(event)
                if size + cost > STATE_BYTES:
                    resume[tenant] = (position, count)  # the rest waits for room
                    break
                queue.append(Queued(event))
                size, position, count = size + cost, after, count - 1
            else:
                if len(found) == TENANT_QUEUE:  # more of its events may follow
                    resume[tenant] = (position, max(count, 1))
        return replace(state, queue=tuple(queue), resume=resume)

    async def _read_new(self, state: DeliveryState) -> DeliveryState:
        """`state` with the events after its cursor read: queued, or remembered in `resume`
        behind a full tenant queue; reading stops where the state would grow too big."""
        filling, position = _Filling(state), state.cursor
        for _ in range(READ_ROUNDS):
            found, end = await self._log.positioned(position, QUEUE_SIZE, None)
            for after, event in found:
                if not filling.add(event, position or "0.0"):
                    return filling.state(position)
                position = after
            position = end
            if len(found) < QUEUE_SIZE:
                break
        return filling.state(position)

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


def _cost(event: Event) -> int:
    """About how many bytes queueing `event` adds to the state's JSON."""
    return QUEUED_BYTES + len(json.dumps(event.body()))


class _Filling:
    """The queue and `resume` of a state being filled from the log, and the state's size."""

    def __init__(self, state: DeliveryState) -> None:
        self.base = state
        self.queue = list(state.queue)
        self.resume = dict(state.resume)
        self.queued = Counter(item.event.tenant for item in state.queue)
        self.size = state.size()

    def add(self, event: Event, before: str) -> bool:
        """Queue `event` (found in the log after `before`), or count it as waiting behind its
        tenant's full queue; False if the state has no room left for it."""
        tenant = event.tenant
        if tenant in self.resume:
            where, count = self.resume[tenant]
            self.resume[tenant] = (where, count + 1)
            return True
        full = self.queued[tenant] >= TENANT_QUEUE
        cost = QUEUED_BYTES + len(tenant) if full else _cost(event)
        if self.size + cost > STATE_BYTES:
            return False
        self.size += cost
        if full:
            self.resume[tenant] = (before, 1)
        else:
            self.queue.append(Queued(event))
            self.queued[tenant] += 1
        return True

    def state(self, cursor: str | None) -> DeliveryState:
        """The state filled, read up to `cursor`."""
        return replace(self.base, cursor=cursor, queue=tuple(self.queue), resume=self.resume)
