"""Periodic health checks (docs/contract.md, "Health checks").

The schedule is the same on every replica, so the replicas share it instead of each running
its own. Time is cut into rounds aligned to the Unix epoch; in a round, the `active` and
`broken` tenants, sorted by id, get evenly spaced slots: `spacing = max(interval / n, 1 / rate)`
seconds apart, so a round lasts the interval (or `n / rate` seconds when there are more tenants
than `rate × interval`). At a tenant's slot each replica tries to claim it by a compare-and-set
write of its `last_checked_at`, and only when the stored time is more than half a round old;
the replica whose write wins checks the tenant (through `TenantService.check`, sharing the
single flight of on-demand checks), the others skip it. The call to Pleo waits for its moment,
`CLAIM_BUDGET` seconds after the slot (a quarter round at most), so the store's latency for the
claim never bunches calls together; a check that would go out more than half a slot after its
moment (a slow store, a stalled process) is skipped until the next round rather than sent
late. Pleo therefore sees one check per slot from all replicas together, a slot apart: never
more than `rate` a second, with no count of replicas needed, as long as the replicas agree on
the tenant list (within `BROKER_CACHE_TTL`) and on the time (NTP). A check that fails (Pleo
or the store unavailable) counts as `error` and waits for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker import errors
from broker.events import emit
from broker.metrics import Metrics
from broker.records import TenantState
from broker.tenant_table import CHECKED_STATES
from broker.tenants import TenantService

LATE = 0.001  # seconds
CLAIM_BUDGET = 0.5  # seconds from a slot to its call to Pleo: the store's time to claim and read
IDLE_SECONDS = 1.0  # how often an empty schedule looks for tenants again


@dataclass(frozen=True)
class Timer:
    """The wall clock the schedule reads and the sleep it waits with (a test's may be virtual)."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def plan(count: int, interval: float, rate: float) -> tuple[float, float]:
    """The slot spacing and round length for `count` tenants (pure, shared by all replicas)."""
    spacing = max(interval / count, 1.0 / rate)
    return spacing, spacing * count


def next_slot(now: float, count: int, interval: float, rate: float) -> tuple[float, int]:
    """The time of the first slot at or after `now` and the index of its tenant."""
    spacing, length = plan(count, interval, rate)
    start = math.floor(now / length) * length
    index = math.ceil((now - start) / spacing - 1e-9)
    if index >= count:
        return start + length, 0
    return start + index * spacing, index


@dataclass(frozen=True)
class Slot:
    """A tenant's turn: its place in the schedule of `count` tenants, starting at `at`."""

    tenant: str
    index: int
    count: int
    at: float


class HealthChecks:
    """The background task that checks every active and broken tenant once per round."""

    def __init__(
        self,
        tenants: TenantService,
        metrics: Metrics,
        *,
        interval: float,
        rate: float,
        timer: Timer | None = None,
    ) -> None:
        self.tenants = tenants
        self.metrics = metrics
        self.interval = interval
        self.rate = rate
        self.timer = timer if timer is not None else Timer()
        self._runner: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start walking the schedule (a no-op when the interval is 0)."""
        if self.interval > 0 and self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="health-checks")

    async def stop(self) -> None:
        """Stop the schedule and any check still running."""
        tasks = [*self._checks, *([self._runner] if self._runner is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._runner = None

    def _due(self) -> tuple[str, ...]:
        if self.tenants.store.read_only is not None:
            return ()  # claims are writes: a read-only store takes none
        # Kept by the registry as tenants come, go or change state: O(1) per slot.
        return self.tenants.registry.checked()

    async def _run(self) -> None:
        taken = -math.inf  # the time of the last slot this replica walked past
        while True:
            tenants = self._due()
            if not tenants:
                await self.timer.sleep(IDLE_SECONDS)
                continue
            spacing = plan(len(tenants), self.interval, self.rate)[0]
            earliest = max(self.timer.now(), taken + spacing / 2)  # never the same slot twice
            at, index = next_slot(earliest, len(tenants), self.interval, self.rate)
            await self.timer.sleep(max(0.0, at - self.timer.now()))
            taken = at
            # A slow check must not hold up the next slot: each runs on its own.
            slot = Slot(tenants[index], index, len(tenants), at)
            task = asyncio.create_task(self._check_one(slot))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check_one(self, slot: Slot) -> None:
        spacing, length = plan(slot.count, self.interval, self.rate)
        # A millisecond late rather than early: a slot's call then falls in its second.
        moment = slot.at + min(CLAIM_BUDGET, length / 4) + LATE
        tenant = slot.tenant
        try:
            before = await self._claim(tenant, datetime.fromtimestamp(moment, UTC), length / 2)
            if before is None or not await self._wait_for(slot, moment, spacing):
                return
            # The one call of the tenant service's check: its events name the health check.
            after = await self.tenants.check(tenant, actor="health_check")
        except errors.TenantUnknown:
            return  # disconnected meanwhile
        except errors.BrokerError as exc:
            self.metrics.health_checks.labels(result="error").inc()
            emit("health_check.failed", level=logging.WARNING, tenant=tenant, error=exc.message)
            return
        except Exception as exc:  # a check running on its own: nothing else would report it
            self.metrics.health_checks.labels(result="error").inc()
            emit(
                "health_check.failed", level=logging.ERROR, tenant=tenant, error=type(exc).__name__
            )
            return
        self.metrics.health_checks.labels(result=outcome(before, after.state)).inc()

    async def _wait_for(self, slot: Slot, moment: float, spacing: float) -> bool:
        """Wait for the check's moment; False if it must not be sent now (it is due again
        next round): too late to keep the calls a slot apart, or the schedule moved on."""
        await self.timer.sleep(max(0.0, moment - self.timer.now()))
        late = self.timer.now() - moment
        if late > spacing / 2:  # a slow claim, or this process was stalled
            raise errors.StoreUnavailable(
                f"The check could not be sent in its slot ({late:.2f} s late); it is checked"
                " next round."
            )
        tenants = self._due()
        if len(tenants) != slot.count or tenants[slot.index] != slot.tenant:
            # Tenants came or went since the claim: this slot now belongs to another tenant
            # (or to nobody), and a call now could fall on top of the new schedule's.
            emit("health_check.deferred", tenant=slot.tenant, reason="the tenant list changed")
            return False
        return True

    async def _claim(self, tenant: str, at: datetime, fresh_for: float) -> TenantState | None:
        """Write `last_checked_at` = `at` (the check's moment on the shared schedule) by
        compare-and-set; the state before, or None: not ours. Comparing moments, not the
        clock at the claim, keeps a slow claim from making a tenant look due again."""
        book = self.tenants.book
        async with book.lock(tenant):
            record = await self.tenants.store.get(tenant)
            if record is None or record.state not in CHECKED_STATES:
                return None
            if book.registry.enforced(tenant, record) is not record:
                return None  # a break not saved yet, or a disconnect: leave the record be
            last = record.last_checked_at
            if last is not None and at - last < timedelta(seconds=fresh_for):
                return None  # checked this round already (by a replica, or on demand)
            try:
                await book.write(record.evolve(last_checked_at=at))
            except errors.StoreConflict:
                return None  # another replica claimed it first
            return record.state


def outcome(before: TenantState, after: TenantState) -> str:
    """The `result` label of a check that went from `before` to `after`."""
    if after is TenantState.BROKEN:
        return "broken"
    if before is TenantState.BROKEN and after is TenantState.ACTIVE:
        return "recovered"
    return "ok"
