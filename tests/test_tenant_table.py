"""TenantTable (broker/tenant_table.py): per-state counts and the sorted checked tenants, kept
up to date by every change, must always equal what a walk over every record finds."""

from __future__ import annotations

import random

from broker.records import ActiveTenant, ApiKey, TenantRecord, TenantState
from broker.tenant_table import CHECKED_STATES, TenantTable


def record(tenant: str, state: TenantState, company: str | None = None) -> TenantRecord:
    key = ApiKey("pik_" + "k" * 40) if state is TenantState.ACTIVE and company else None
    return TenantRecord(tenant=tenant, state=state, api_key=key, company_id=company)


def serve(table: TenantTable, tenant: str) -> None:
    """What `TenantRegistry.active` keeps of a tenant it served: built from its record."""
    current = table.records.get(tenant)
    active = ActiveTenant.of(current) if current is not None else None
    if active is not None:
        table.served[tenant] = active


def agrees(table: TenantTable, told: dict[TenantState, int]) -> None:
    walked = {s: sum(r.state is s for r in table.records.values()) for s in TenantState}
    assert table.counts == walked
    assert told == walked  # what the gauge was told last
    for company in ({r.company_id for r in table.records.values()} | {"c9"}) - {None}:
        assert company is not None
        expected = {t for t, r in table.records.items() if r.company_id == company}
        assert table.bound_to(company) == expected
    assert table.checked() == tuple(
        sorted(t for t, r in table.records.items() if r.state in CHECKED_STATES)
    )
    # A tenant served is served from its record as it is now, never an older one.
    assert all(table.records.get(t) is a.record for t, a in table.served.items())


def test_random_changes_keep_counts_and_checked_tenants_exact() -> None:
    told: dict[TenantState, int] = {}
    table = TenantTable(told.__setitem__)
    table.replace({})  # the first load
    rng = random.Random(14)
    names = [f"t{n:03d}" for n in range(60)]
    for _ in range(3000):
        tenant, roll = rng.choice(names), rng.random()
        if roll < 0.6:
            company = rng.choice([None, "c1", "c2", "c3"])
            table.put(tenant, record(tenant, rng.choice(list(TenantState)), company))
        elif roll < 0.95:
            table.pop(tenant)
        else:
            picked = rng.sample(names, rng.randrange(len(names)))
            fresh = {t: record(t, rng.choice(list(TenantState)), "c1") for t in picked}
            kept = rng.sample(sorted(table.records), len(table.records) // 2)
            fresh.update((t, table.records[t]) for t in kept)  # records a reload finds as-is
            table.replace(fresh)
        serve(table, rng.choice(names))
        agrees(table, told)
    assert table.served  # the walk did serve tenants, and kept some across reloads


def test_the_checked_tenants_are_the_same_tuple_until_the_set_changes() -> None:
    table = TenantTable()
    table.replace({t: record(t, TenantState.ACTIVE) for t in ("b", "a", "c")})
    first = table.checked()
    assert first == ("a", "b", "c")
    table.put("b", record("b", TenantState.BROKEN))  # still checked
    table.put("d", record("d", TenantState.PENDING))  # never checked
    table.pop("d")
    table.replace(dict(table.records))  # a full reload that finds the same set
    assert table.checked() is first
    table.put("b", record("b", TenantState.PENDING))
    assert table.checked() == ("a", "c")


def test_every_state_is_told_once_even_at_zero() -> None:
    told: dict[TenantState, int] = {}
    table = TenantTable(told.__setitem__)
    table.replace({})
    assert told == dict.fromkeys(TenantState, 0)
