"""Webhook delivery state every store keeps (`claim_deliveries`, `settle_deliveries`,
`pending_deliveries`): each tenant's oldest pending event, leased to one holder at a time,
retried no earlier than asked, given up for good; replicas share it. Time is passed in, so
leases run out without waiting."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.store_replicas import OpenStore, vault_store
from test_event_log import active, event

from broker.delivery import Delivery, Settlement
from broker.outbox import Event
from broker.stores import SecretStore
from broker.stores.vault import VaultStore

NOW = datetime.now(UTC)
LEASE = timedelta(seconds=3)


@pytest.fixture
async def one(store_replicas: OpenStore) -> SecretStore:
    return await store_replicas()


async def write_events(store: SecretStore) -> dict[str, list[Event]]:
    """acme: activated, rotated; beta: activated, disconnected (interleaved)."""
    acme, beta = active("acme"), active("beta")
    made = {
        "acme": [event(acme), event(acme, "tenant.key_rotated")],
        "beta": [event(beta), event(beta, "tenant.disconnected")],
    }
    stored_acme = await store.put(acme, events=made["acme"][:1])
    await store.put(beta, events=made["beta"][:1])
    await store.put(stored_acme, events=made["acme"][1:])
    await store.delete("beta", events=made["beta"][1:])
    return made


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.event.id for d in deliveries]


async def test_each_tenants_oldest_event_is_claimed_and_the_next_waits(
    one: SecretStore,
) -> None:
    made = await write_events(one)
    assert await one.pending_deliveries() == 4
    first = await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    assert ids(first) == [made["acme"][0].id, made["beta"][0].id]
    assert [d.attempts for d in first] == [0, 0]
    await one.settle_deliveries("a", [Settlement(made["acme"][0].id, "delivered")], now=NOW)
    assert await one.pending_deliveries() == 3
    second = await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    # beta's first is still out (claimed, not settled): its next waits behind it.
    assert made["acme"][1].id in ids(second)
    assert made["beta"][1].id not in ids(second)


async def test_a_retry_waits_for_its_time_and_counts_the_attempt(one: SecretStore) -> None:
    made = await write_events(one)
    await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    later = NOW + timedelta(seconds=60)
    retry = Settlement(made["acme"][0].id, "retried", later)
    beta = Settlement(made["beta"][0].id, "delivered")
    await one.settle_deliveries("a", [retry, beta], now=NOW)
    soon = await one.claim_deliveries("a", now=NOW + timedelta(seconds=10), lease=LEASE, limit=10)
    assert ids(soon) == [made["beta"][1].id]  # acme waits for its retry, beta goes on
    due = await one.claim_deliveries("a", now=later, lease=LEASE, limit=10)
    acme = [d for d in due if d.event.tenant == "acme"]
    assert ids(acme) == [made["acme"][0].id]
    assert acme[0].attempts == 1


async def test_a_given_up_event_is_done_and_the_tenants_next_goes_on(one: SecretStore) -> None:
    made = await write_events(one)
    await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    await one.settle_deliveries("a", [Settlement(made["acme"][0].id, "given_up")], now=NOW)
    assert await one.pending_deliveries() == 3
    claimed = await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    assert made["acme"][1].id in ids(claimed)
    assert made["acme"][0].id not in ids(claimed)


async def test_one_holder_at_a_time_and_a_lapsed_lease_passes_on(
    store_replicas: OpenStore,
) -> None:
    one, other = await store_replicas(), await store_replicas()
    made = await write_events(one)
    assert ids(await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10))
    assert await other.claim_deliveries("b", now=NOW + LEASE / 2, lease=LEASE, limit=10) == []
    # "a" died: once its lease ran out, "b" gets the same events (at least once).
    taken = await other.claim_deliveries("b", now=NOW + 2 * LEASE, lease=LEASE, limit=10)
    assert ids(taken) == [made["acme"][0].id, made["beta"][0].id]
    # "a" coming back cannot settle what it no longer holds.
    lapsed = [Settlement(made["acme"][0].id, "delivered")]
    assert await one.settle_deliveries("a", lapsed, now=NOW + 2 * LEASE) == []
    assert await other.pending_deliveries() == 4
    settled = [Settlement(d.event.id, "delivered") for d in taken]
    applied = await other.settle_deliveries("b", settled, now=NOW + 2 * LEASE)
    assert sorted(applied) == sorted(ids(taken))
    assert await one.pending_deliveries() == 2


@pytest.mark.real
async def test_the_vault_policy_lets_the_broker_deliver(request: pytest.FixtureRequest) -> None:
    from support.openbao_server import vault_settings

    from broker.stores.factory import open_vault_store

    store = open_vault_store(vault_settings(request.getfixturevalue("openbao"), "approle"))
    try:
        record = active("policy-delivery")
        written = event(record)
        await store.put(record, events=[written])
        later = datetime.now(UTC) + timedelta(days=1)  # past any lease another test left
        claimed: list[Delivery] = []
        while written.id not in ids(claimed):
            batch = await store.claim_deliveries("policy", now=later, lease=LEASE, limit=50)
            assert batch, "the event never came up"
            settled = [Settlement(d.event.id, "delivered") for d in batch]
            await store.settle_deliveries("policy", settled, now=later)
            claimed += batch
        assert await store.pending_deliveries() >= 0
    finally:
        await store.close()


async def test_one_tenants_backlog_does_not_hold_up_another_tenants_events(
    one: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Vault store queues a few events per tenant (made smaller here); the rest wait in the log.
    from broker.stores import vault_delivery

    monkeypatch.setattr(vault_delivery, "TENANT_QUEUE", 3, raising=False)
    monkeypatch.setattr(vault_delivery, "QUEUE_SIZE", 4)
    acme = active("acme")
    backlog = []
    for kind in ["tenant.activated"] + ["tenant.key_rotated"] * 7:
        backlog.append(event(acme, kind))
        acme = await one.put(acme, events=backlog[-1:])
    first = await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    assert ids(first) == [backlog[0].id]
    # acme's receiver keeps failing: its first event waits for a retry far off.
    retry = Settlement(backlog[0].id, "retried", NOW + timedelta(hours=1))
    await one.settle_deliveries("a", [retry], now=NOW)
    beta = active("beta")
    news = event(beta)
    await one.put(beta, events=[news])
    assert ids(await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)) == [news.id]
    await one.settle_deliveries("a", [Settlement(news.id, "delivered")], now=NOW)
    assert await one.pending_deliveries() == len(backlog)
    # Once acme's receiver takes them, its events all come, in order, each once.
    later, delivered = NOW + timedelta(hours=2), []
    while batch := await one.claim_deliveries("a", now=later, lease=LEASE, limit=10):
        assert len(batch) == 1
        delivered += ids(batch)
        settled = [Settlement(d.event.id, "delivered") for d in batch]
        await one.settle_deliveries("a", settled, now=later)
    assert delivered == [e.id for e in backlog]
    assert await one.pending_deliveries() == 0


async def test_the_vault_delivery_state_stays_under_its_size_cap(
    one: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.stores import vault_delivery

    made = [event(active(f"t{n:02d}")) for n in range(12)]
    cap = 4 * len(json.dumps(made[0].body()))
    monkeypatch.setattr(vault_delivery, "STATE_BYTES", cap, raising=False)
    for item in made:
        await one.put(active(item.tenant), events=[item])
    delivered: list[str] = []
    while batch := await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=50):
        assert len(batch) < len(made) or not isinstance(one, VaultStore)
        if isinstance(one, VaultStore):
            state, _ = await one._delivery._call(one._delivery._read)
            assert state.size() <= cap
        delivered += ids(batch)
        await one.settle_deliveries("a", [Settlement(i, "delivered") for i in ids(batch)], now=NOW)
    assert sorted(delivered) == sorted(e.id for e in made)
    assert await one.pending_deliveries() == 0


@pytest.mark.real
async def test_the_vault_store_counts_pending_events_without_reading_the_log(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = vault_store(request, tmp_path / "store")
    assert isinstance(store, VaultStore)
    try:
        record = active("acme")
        made = [event(record, "tenant.key_rotated") for _ in range(130)]  # 4 chunks
        await store.put(record, events=made)
        kv = store._kv
        calls: list[str] = []
        for name in ("read_secret_version", "list_secrets"):
            real = getattr(kv, name)

            def counted(
                *args: object, _real: object = real, _name: str = name, **kw: object
            ) -> object:
                calls.append(_name)
                return _real(*args, **kw)  # type: ignore[operator]

            monkeypatch.setattr(kv, name, counted)
        assert await store.pending_deliveries() == len(made)  # none read yet
        assert len(calls) <= 3, calls
        await store.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
        calls.clear()
        assert await store.pending_deliveries() == len(made)  # queued, behind, in the log
        assert len(calls) <= 3, calls
    finally:
        await store.close()


async def test_a_claim_with_events_to_send_runs_for_a_full_lease(store_replicas: OpenStore) -> None:
    one, other = await store_replicas(), await store_replicas()
    made = await write_events(one)
    await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    await one.settle_deliveries("a", [Settlement(made["acme"][0].id, "delivered")], now=NOW)
    second = await one.claim_deliveries("a", now=NOW + LEASE * 0.4, lease=LEASE, limit=10)
    assert made["acme"][1].id in ids(second)
    # "a" is sending it now: its lease runs a full LEASE from that claim.
    taken = await other.claim_deliveries("b", now=NOW + LEASE * 1.2, lease=LEASE, limit=10)
    assert made["acme"][1].id not in ids(taken)


def test_the_local_claim_reads_the_pending_index_not_the_whole_table() -> None:
    import sqlite3

    from broker.stores import sqlite_events

    conn = sqlite3.connect(":memory:")
    sqlite_events.create(conn)
    plan = [
        str(row[3])
        for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_events._DUE, (NOW.isoformat(), 20))
    ]
    scans = [step for step in plan if step.startswith("SCAN")]
    # Only the partial index of undelivered events is scanned; each tenant's first event is
    # then looked up by its key.
    assert scans
    assert all("USING INDEX events_pending" in step or step == "SCAN heads" for step in scans)
    assert any("USING INTEGER PRIMARY KEY" in step for step in plan), plan


async def test_a_released_lease_passes_on_at_once(store_replicas: OpenStore) -> None:
    one, other = await store_replicas(), await store_replicas()
    made = await write_events(one)
    claimed = await one.claim_deliveries("a", now=NOW, lease=LEASE, limit=10)
    await one.settle_deliveries("a", [Settlement(made["acme"][0].id, "delivered")], now=NOW)
    await one.release_deliveries("a", now=NOW)  # "a" stops: "b" need not wait for the lease
    taken = await other.claim_deliveries("b", now=NOW + LEASE / 10, lease=LEASE, limit=10)
    assert ids(taken) == [made["beta"][0].id, made["acme"][1].id]
    assert made["beta"][0].id in ids(claimed)
    # Releasing what another holder holds changes nothing.
    await one.release_deliveries("a", now=NOW + LEASE / 10)
    assert await one.claim_deliveries("a", now=NOW + LEASE / 5, lease=LEASE, limit=10) == []
