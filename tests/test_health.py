"""Periodic health checks against the real sandbox, on one broker and on two replicas."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import heapq
import itertools
import math
import random
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.inprocess import PLEO_URL, FakePleo, MemoryStore
from support.openbao_server import OpenBao
from support.servers import (
    REQUIRED_SCOPES,
    RunningBroker,
    RunningSandbox,
    broker_settings,
    start_broker,
)

from broker.health import HealthChecks, Slot, Timer, next_slot, outcome, plan
from broker.metrics import Metrics
from broker.pleo import PleoClient
from broker.records import TenantRecord, TenantState
from broker.rules import Requirements
from broker.tenants import TenantService

INTROSPECT = "/v1/introspect"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def admin_client(broker: RunningBroker) -> httpx.Client:
    return httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False)


def state_of(admin: httpx.Client, tenant: str) -> str:
    return str(admin.get(f"/v1/tenants/{tenant}").json()["state"])


def health_checks(broker: RunningBroker, result: str) -> float:
    text = httpx.get(f"{broker.admin_url}/metrics", trust_env=False).text
    line = f'broker_health_checks_total{{result="{result}"}} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def introspections(sandbox: RunningSandbox) -> list[tuple[str | None, float]]:
    """(key id, Unix time) of every introspection Pleo saw; no key id for a revoked key."""
    seen = httpx.get(f"{sandbox.url}/_sandbox/requests", trust_env=False).json()["requests"]
    return [(r["key_id"], r["at"]) for r in seen if r["path"] == INTROSPECT]


@pytest.mark.parametrize(
    ("before", "after", "result"),
    [
        (TenantState.ACTIVE, TenantState.ACTIVE, "ok"),
        (TenantState.ACTIVE, TenantState.BROKEN, "broken"),
        (TenantState.BROKEN, TenantState.BROKEN, "broken"),
        (TenantState.BROKEN, TenantState.ACTIVE, "recovered"),
    ],
)
def test_outcome(before: TenantState, after: TenantState, result: str) -> None:
    assert outcome(before, after) == result


def test_schedule_spreads_over_the_interval_and_keeps_the_rate() -> None:
    assert plan(1000, 60, 20) == (0.06, 60.0)  # spread: one check every 60 ms
    spacing, length = plan(1000, 30, 20)  # more tenants than rate × interval: a longer round
    assert spacing == 0.05 and length == 50.0
    assert next_slot(120.0, 1000, 60, 20) == (120.0, 0)
    assert next_slot(120.01, 1000, 60, 20) == pytest.approx((120.06, 1))
    assert next_slot(179.99, 1000, 60, 20) == (180.0, 0)


def test_revoked_key_breaks_and_restored_scope_recovers(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(health_check_interval=0.5, health_check_rate=50)
    revoked = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    narrowed = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        for tenant, key in (("acme", revoked), ("beta", narrowed)):
            assert admin.put(f"/v1/tenants/{tenant}/key", json={"api_key": key.api_key}).is_success
        sandbox.state.revoke(revoked.key_id)
        sandbox.state.set_scopes(narrowed.key_id, REQUIRED_SCOPES[:1])
        wait_for(lambda: state_of(admin, "acme") == "broken", 3, "the revoked key to break")
        wait_for(lambda: state_of(admin, "beta") == "broken", 3, "the lost scope to break")
        assert admin.get("/v1/tenants/acme").json()["reason"] == "key_rejected"
        assert health_checks(broker, "broken") >= 2
        sandbox.state.set_scopes(narrowed.key_id, REQUIRED_SCOPES)
        wait_for(lambda: state_of(admin, "beta") == "active", 3, "the restored scope to recover")
    assert health_checks(broker, "recovered") == 1
    assert health_checks(broker, "ok") + health_checks(broker, "broken") >= 2


def test_interval_zero_turns_health_checks_off(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> None:
    broker = make_broker(health_check_interval=0, health_check_rate=100)
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        sandbox.state.clear_requests()
        sandbox.state.revoke(key.key_id)
        # Proving an absence takes a while: a few would-be intervals of 0.1 s.
        time_before = time.monotonic()
        wait_for(lambda: time.monotonic() - time_before > 0.3, 1, "a few would-be intervals")
        assert state_of(admin, "acme") == "active"
        assert introspections(sandbox) == []
        # The on-demand check still works.
        assert admin.post("/v1/tenants/acme/check").json()["state"] == "broken"
    assert health_checks(broker, "broken") == 0


COUNT, INTERVAL, RATE = 16, 1.0, 10.0  # the rate binds: a round takes 16 / 10 = 1.6 s


def test_two_replicas_check_each_tenant_once_per_round_within_the_rate(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, tmp_path: Path
) -> None:
    master_key = base64.b64encode(secrets.token_bytes(32)).decode()
    brokers = [
        make_broker(
            store_path=tmp_path / "shared",  # one SQLite database: replicas, to the store
            master_key=master_key,
            health_check_interval=INTERVAL,
            health_check_rate=RATE,
        )
        for _ in range(2)
    ]
    check_replicas_share_the_rounds(brokers, sandbox)


@pytest.mark.real
def test_two_replicas_on_openbao_share_the_rounds(
    sandbox: RunningSandbox, openbao: OpenBao, tmp_path: Path
) -> None:
    prefix = f"health-{secrets.token_hex(4)}"
    brokers = [
        start_broker(
            broker_settings(
                sandbox.url,
                tmp_path / name,
                store="vault",
                vault_addr=openbao.addr,
                vault_token=openbao.root_token,
                vault_prefix=prefix,
                required_scopes=REQUIRED_SCOPES,
                health_check_interval=INTERVAL,
                health_check_rate=RATE,
            )
        )
        for name in ("a", "b")
    ]
    try:
        check_replicas_share_the_rounds(brokers, sandbox)
    finally:
        for broker in brokers:
            broker.thread.stop()


def check_replicas_share_the_rounds(brokers: list[RunningBroker], sandbox: RunningSandbox) -> None:
    """Pleo sees each tenant once a round from both replicas together, within the rate."""
    count, rate = COUNT, RATE
    spacing, length = plan(COUNT, INTERVAL, RATE)
    keys: set[str] = set()
    with admin_client(brokers[0]) as first, admin_client(brokers[1]) as second:
        for n in range(count):
            made = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
            keys.add(made.key_id)
            assert first.put(f"/v1/tenants/t{n:02d}/key", json={"api_key": made.api_key}).is_success
        wait_for(
            lambda: len(second.get("/v1/tenants").json()["tenants"]) == count,
            5,
            "the second replica to see every tenant",
        )
    started = time.time()
    sandbox.state.clear_requests()

    def each_seen_twice() -> bool:
        seen = collections.Counter(key for key, at in introspections(sandbox) if at > started)
        return len(seen) == count and min(seen.values()) >= 2

    wait_for(each_seen_twice, 3 * length + 2, "every tenant to be checked in two rounds")
    calls = [(key, at) for key, at in introspections(sandbox) if at > started]
    assert {key_id for key_id, _ in calls} == keys
    per_tenant: dict[str | None, list[float]] = collections.defaultdict(list)
    for key_id, at in calls:
        per_tenant[key_id].append(at)
    for times in per_tenant.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Claims are half a round apart at least; arrival times jitter by the store's latency,
        # and two uncoordinated replicas would call within milliseconds of each other.
        assert all(gap > length / 4 for gap in gaps), "a tenant was checked twice in a round"
    per_second = collections.Counter(math.floor(at) for _, at in calls)
    assert max(per_second.values()) <= rate, sorted(calls, key=lambda c: c[1])
    # Both replicas took part: the rounds were shared, not run by one of them alone.
    for broker in brokers:
        assert health_checks(broker, "ok") > 0
    assert spacing == pytest.approx(1 / rate)


class VirtualTime:
    """A wall clock that jumps to the next sleeper's wake-up once every task is idle."""

    def __init__(self, start: float) -> None:
        self.now = start
        self._sleepers: list[tuple[float, float, asyncio.Future[None]]] = []
        self._order = random.Random(11)  # who of two sleepers due at once wakes first

    def time(self) -> float:
        return self.now

    def utcnow(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    async def sleep(self, delay: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        due = self.now + max(delay, 0.0)
        heapq.heappush(self._sleepers, (due, self._order.random(), wake))
        await wake

    async def run_until(self, end: float) -> None:
        while True:
            for _ in range(30):  # let every check in flight run to its next sleep
                await asyncio.sleep(0)
            if not self._sleepers or self._sleepers[0][0] > end:
                self.now = end
                return
            when, _, wake = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            wake.set_result(None)


def timed_pleo(
    fake_pleo: FakePleo, virtual: VirtualTime, seen: list[tuple[str, float]]
) -> httpx.MockTransport:
    """Pleo that notes (a digest of the key, the virtual time) of every call in `seen`."""

    async def timed(request: httpx.Request) -> httpx.Response:
        # A digest, not the header: a failing assertion must not print a key.
        digest = hashlib.sha256(request.headers["authorization"].encode()).hexdigest()[:12]
        seen.append((digest, virtual.now))
        return await fake_pleo.handle(request)

    return httpx.MockTransport(timed)


async def test_a_thousand_tenants_on_two_replicas_in_virtual_time(
    fake_pleo: FakePleo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: 1,000 tenants, a 60 s interval, 20 checks a second, two replicas."""
    count, interval, rate = 1000, 60.0, 20.0
    start = 1_800_000_000.0  # on a round's boundary: 60 s rounds from the epoch
    virtual = VirtualTime(start - 120)
    monkeypatch.setattr("broker.checks.utcnow", virtual.utcnow)
    seen: list[tuple[str, float]] = []
    pleo = PleoClient(PLEO_URL, transport=timed_pleo(fake_pleo, virtual, seen))
    shared = MemoryStore()
    for n in range(count):
        company = str(uuid.uuid4())
        key = fake_pleo.add_key(company, scopes=REQUIRED_SCOPES)
        record = TenantRecord(f"t{n:04d}", TenantState.ACTIVE, key, company_id=company)
        await shared.put(record)
    replicas: list[HealthChecks] = []
    timer = Timer(now=virtual.time, sleep=virtual.sleep)
    for store in (shared, shared.replica()):
        service = TenantService(store, pleo, Metrics(), requirements=Requirements(REQUIRED_SCOPES))
        assert await service.registry.refresh()
        replicas.append(HealthChecks(service, service.metrics, interval=60, rate=20, timer=timer))
    for checks in replicas:
        checks.start()
    try:
        await virtual.run_until(start + 2 * interval)
    finally:
        for checks in replicas:
            await checks.stop()
        await pleo.aclose()
    calls = [at for _, at in seen if at >= start]
    per_key = collections.Counter(key for key, at in seen if at >= start)
    assert len(per_key) == count and set(per_key.values()) == {2}  # once a minute, in total
    per_second = collections.Counter(math.floor(at) for at in calls)
    assert max(per_second.values()) <= rate
    assert len(per_second) == 2 * interval  # spread over every second, not in bursts
    done = [checks.metrics.health_checks.labels(result="ok")._value.get() for checks in replicas]
    assert sum(done) == len(seen) and min(done) > 0.2 * len(seen)  # both replicas took part


async def test_a_break_not_saved_yet_is_not_overwritten_by_a_claim(
    tenant_service: TenantService, memory_store: MemoryStore, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(scopes=REQUIRED_SCOPES)
    stored = await memory_store.put(TenantRecord("acme", TenantState.ACTIVE, key))
    await tenant_service.registry.refresh()
    broken = stored.evolve(state=TenantState.BROKEN)
    tenant_service.registry.hold(broken)  # Pleo said 401 while the store was down
    checks = HealthChecks(tenant_service, tenant_service.metrics, interval=60, rate=2)
    assert await checks._claim("acme", datetime.now(UTC), 30) is None
    assert await memory_store.get("acme") == stored  # its version still below the held break
    assert fake_pleo.calls["/v1/introspect"] == 0


async def test_an_unexpected_failure_of_a_check_is_logged_and_counted(
    tenant_service: TenantService,
    fake_pleo: FakePleo,
    memory_store: MemoryStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    active = await tenant_service.activate("acme", fake_pleo.add_key())
    await memory_store.put(active.evolve(last_checked_at=datetime(2026, 1, 1, tzinfo=UTC)))
    metrics = Metrics()
    checks = HealthChecks(tenant_service, metrics, interval=60, rate=1)

    async def broken_check(tenant: str, **kwargs: object) -> TenantRecord:
        raise KeyError("a bug nobody foresaw")

    tenant_service.check = broken_check  # type: ignore[method-assign]
    await checks._check_one(Slot("acme", 0, 1, time.time()))
    assert metrics.health_checks.labels(result="error")._value.get() == 1
    assert "health_check.failed" in caplog.text


async def test_a_slow_store_does_not_bunch_the_calls_to_pleo(
    fake_pleo: FakePleo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas whose store writes (a claim's CAS, say) take up to 0.2 s, on rounds of
    1 s: Pleo still sees the calls a slot apart, and each tenant once a round."""
    count, interval, rate = 10, 1.0, 10.0
    spacing, length = plan(count, interval, rate)
    start = 1_800_000_000.0
    virtual = VirtualTime(start - 5)
    monkeypatch.setattr("broker.checks.utcnow", virtual.utcnow)
    seen: list[tuple[str, float]] = []
    pleo = PleoClient(PLEO_URL, transport=timed_pleo(fake_pleo, virtual, seen))
    latency = random.Random(7)

    async def slow(tenant: str) -> None:
        await virtual.sleep(latency.uniform(0.0, 0.2))

    shared = MemoryStore()
    for n in range(count):
        company = str(uuid.uuid4())
        key = fake_pleo.add_key(company, scopes=REQUIRED_SCOPES)
        await shared.put(TenantRecord(f"t{n:02d}", TenantState.ACTIVE, key, company_id=company))
    timer = Timer(now=virtual.time, sleep=virtual.sleep)
    replicas: list[HealthChecks] = []
    for store in (shared, shared.replica()):
        store.before_put = slow
        service = TenantService(store, pleo, Metrics(), requirements=Requirements(REQUIRED_SCOPES))
        assert await service.registry.refresh()
        replicas.append(HealthChecks(service, service.metrics, interval=1, rate=10, timer=timer))
        replicas[-1].start()
    try:
        await virtual.run_until(start + 5 * length)
    finally:
        for checks in replicas:
            await checks.stop()
        await pleo.aclose()
    calls = sorted(at for _, at in seen if at >= start)
    assert len(calls) == 5 * count
    assert min(b - a for a, b in itertools.pairwise(calls)) == pytest.approx(spacing)
    per_tenant: dict[str, list[float]] = collections.defaultdict(list)
    for digest, at in seen:
        per_tenant[digest].append(at)
    for times in per_tenant.values():  # a slow claim never makes a tenant look due again
        assert min(b - a for a, b in itertools.pairwise(times)) == pytest.approx(length)


async def test_a_claim_slower_than_its_budget_skips_the_check(
    tenant_service: TenantService,
    fake_pleo: FakePleo,
    memory_store: MemoryStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    active = await tenant_service.activate("acme", fake_pleo.add_key())
    await memory_store.put(active.evolve(last_checked_at=datetime(2026, 1, 1, tzinfo=UTC)))
    before = fake_pleo.calls[INTROSPECT]
    metrics = Metrics()
    checks = HealthChecks(tenant_service, metrics, interval=60, rate=1)
    await checks._check_one(Slot("acme", 0, 1, time.time() - 100))  # its moment has passed
    assert fake_pleo.calls[INTROSPECT] == before
    assert metrics.health_checks.labels(result="error")._value.get() == 1
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "health_check.failed"]
    assert "next round" in failed.fields["error"]  # type: ignore[attr-defined]
