"""TenantService (broker/tenants.py) in process: the in-memory store and Pleo on MockTransport.

Activation and every refusal it can give, rotation, checks and what they conclude, a key Pleo
rejects mid-flight, disconnects, and one introspection per tenant at a time. The same paths
over real sockets and the real sandbox: test_admin.py; the pure rules: test_rules.py.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from support.inprocess import FakePleo, MemoryStore
from support.servers import REQUIRED_SCOPES

from broker import errors
from broker.metrics import Metrics
from broker.pleo import PleoClient
from broker.records import ApiKey, BrokenReason, TenantState
from broker.registry import TenantRegistry
from broker.rules import Requirements
from broker.tenants import TenantService

COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"


def _activations(tenants: TenantService, result: str) -> float:
    value = tenants.metrics.registry.get_sample_value(
        "broker_activations_total", {"result": result}
    )
    return value or 0.0


def _transitions(tenants: TenantService, to_state: str, reason: str) -> float:
    value = tenants.metrics.registry.get_sample_value(
        "broker_tenant_transitions_total", {"to_state": to_state, "reason": reason}
    )
    return value or 0.0


# -- activation ----------------------------------------------------------------------------


async def test_activation_stores_the_key_and_binds_the_company(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    key = fake_pleo.add_key(COMPANY)

    record = await tenant_service.activate("acme", key)

    assert (record.state, record.company_id, record.api_key) == (TenantState.ACTIVE, COMPANY, key)
    assert record.scopes == frozenset(REQUIRED_SCOPES)
    assert (record.client_id, record.application_name) == ("integration-client", "Test integration")
    assert record.version == 2  # the key, then the installation's sync (broker.installation)
    assert await memory_store.get("acme") == record
    assert tenant_service.registry.active("acme").company_id == COMPANY
    assert _activations(tenant_service, "ok") == 1
    assert _transitions(tenant_service, "active", "activated") == 1


async def test_the_company_may_come_from_the_installation(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(COMPANY, subject_in_introspection=False)
    record = await tenant_service.activate("acme", key)
    assert record.company_id == COMPANY
    # Once for the company, then twice by the installation's sync (read it, name the tenant).
    assert fake_pleo.calls["/v1/installations/me"] == 3


REFUSALS: list[tuple[str, dict[str, object], type[errors.ActivationError]]] = [
    ("oauth token", {"auth_method": "OAUTH"}, errors.KeyNotApiKey),
    ("no company", {"company_id": None}, errors.KeyNotCompanyScoped),
    ("user subject", {"company_id": "not-a-uuid"}, errors.KeyNotCompanyScoped),
    ("scope lacking", {"scopes": ("export-jobs:read",)}, errors.ScopesMissing),
    ("other integration", {"client_id": "someone-else"}, errors.KeyWrongIntegration),
]


@pytest.mark.parametrize(("what", "details", "refusal"), REFUSALS, ids=[row[0] for row in REFUSALS])
async def test_a_key_pleo_describes_wrongly_is_refused_and_the_tenant_kept_pending(
    memory_store: MemoryStore,
    fake_pleo: FakePleo,
    pleo_client: PleoClient,
    what: str,
    details: dict[str, object],
    refusal: type[errors.ActivationError],
) -> None:
    requirements = Requirements(REQUIRED_SCOPES, client_id="integration-client")
    tenant_service = TenantService(memory_store, pleo_client, Metrics(), requirements=requirements)
    key = fake_pleo.add_key(COMPANY)
    fake_pleo.change(key, **details)

    with pytest.raises(refusal) as caught:
        await tenant_service.activate("acme", key)

    pending = await memory_store.get("acme")
    assert pending is not None
    assert (pending.state, pending.api_key, pending.message) == (
        TenantState.PENDING,
        None,
        caught.value.message,
    )
    if refusal is errors.ScopesMissing:
        assert pending.missing_scopes == ("export-jobs:write",)
    assert _activations(tenant_service, refusal.code) == 1
    assert _transitions(tenant_service, "pending", refusal.code) == 1


async def test_a_key_pleo_rejects_is_key_invalid(
    tenant_service: TenantService, memory_store: MemoryStore
) -> None:
    with pytest.raises(errors.KeyInvalid):
        await tenant_service.activate("acme", ApiKey("pik_" + "x" * 40))
    pending = await memory_store.get("acme")
    assert pending is not None and pending.state is TenantState.PENDING


@pytest.mark.parametrize("failure", [503, 429, 407, httpx.ConnectError, httpx.ReadTimeout], ids=str)
async def test_pleo_out_of_reach_is_pleo_unavailable(
    tenant_service: TenantService,
    fake_pleo: FakePleo,
    failure: int | type[httpx.TransportError],
) -> None:
    key = fake_pleo.add_key(COMPANY)
    fake_pleo.failure = failure
    with pytest.raises(errors.PleoUnavailable) as caught:
        await tenant_service.activate("acme", key)
    assert caught.value.message == errors.PleoUnavailable.default_message


async def test_an_answer_pleo_should_not_give_is_pleo_unavailable_saying_so(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(COMPANY)
    fake_pleo.failure = 418
    with pytest.raises(errors.PleoUnavailable, match="did not understand"):
        await tenant_service.activate("acme", key)


@pytest.mark.parametrize("tenant", ["Acme", "", "a/b", "x" * 64])
async def test_a_malformed_tenant_id_is_tenant_invalid(
    tenant_service: TenantService, fake_pleo: FakePleo, tenant: str
) -> None:
    key = fake_pleo.add_key(COMPANY)
    for call in (
        tenant_service.activate(tenant, key),
        tenant_service.check(tenant),
        tenant_service.disconnect(tenant),
        tenant_service.fetch(tenant),
    ):
        with pytest.raises(errors.TenantInvalid):
            await call
    assert fake_pleo.calls.total() == 0


async def test_a_company_already_connected_is_company_in_use(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    with pytest.raises(errors.CompanyInUse) as caught:
        await tenant_service.activate("globex", fake_pleo.add_key(COMPANY))
    assert caught.value.details["other_tenant"] == "acme"


async def test_an_activation_looks_up_its_company_without_walking_every_tenant(
    tenant_service: TenantService, fake_pleo: FakePleo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 50,000 tenants, a walk of every record under the activations' lock is a cost each
    # activation pays; the company_in_use check asks the registry's index by company.
    for n in range(3):
        await tenant_service.activate(f"other-{n}", fake_pleo.add_key())
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))

    def walked(*args: object) -> None:
        raise AssertionError("an activation walked every record")

    monkeypatch.setattr(TenantRegistry, "companies", walked)
    monkeypatch.setattr(TenantRegistry, "all", walked)
    with pytest.raises(errors.CompanyInUse) as caught:
        await tenant_service.activate("globex", fake_pleo.add_key(COMPANY))
    assert caught.value.details["other_tenant"] == "acme"
    rotated = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    assert rotated.company_id == COMPANY


async def test_two_activations_with_one_company_at_once_cannot_both_win(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    results = await asyncio.gather(
        tenant_service.activate("acme", fake_pleo.add_key(COMPANY)),
        tenant_service.activate("globex", fake_pleo.add_key(COMPANY)),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["CompanyInUse", "TenantRecord"]


# -- rotation ------------------------------------------------------------------------------


async def test_rotation_replaces_the_key_and_keeps_the_company(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    first = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    new_key = fake_pleo.add_key(COMPANY)

    rotated = await tenant_service.activate("acme", new_key)

    # The key, then the installation's sync (the new key's installation names the tenant).
    assert (rotated.api_key, rotated.version) == (new_key, first.version + 2)
    assert tenant_service.registry.active("acme").key == new_key
    assert _transitions(tenant_service, "active", "rotated") == 1


async def test_a_key_of_another_company_is_company_changed_unless_allowed(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    first = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    elsewhere = fake_pleo.add_key()
    with pytest.raises(errors.CompanyChanged):
        await tenant_service.activate("acme", elsewhere)
    assert tenant_service.registry.get("acme") == first  # the working key stays

    moved = await tenant_service.activate("acme", elsewhere, allow_company_change=True)
    assert moved.company_id != COMPANY


async def test_a_failed_rotation_never_replaces_a_working_key(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    first = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    with pytest.raises(errors.KeyInvalid):
        await tenant_service.activate("acme", ApiKey("pik_" + "x" * 40))
    assert await memory_store.get("acme") == first
    assert tenant_service.registry.active("acme").key == first.api_key


# -- checks --------------------------------------------------------------------------------


async def test_a_check_of_a_working_key_confirms_it(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(COMPANY)
    await tenant_service.activate("acme", key)
    fake_pleo.change(key, scopes=(*REQUIRED_SCOPES, "users:read"))

    checked = await tenant_service.check("acme")

    assert checked.state is TenantState.ACTIVE
    assert "users:read" in checked.scopes


CHECKS: list[tuple[str, dict[str, object], BrokenReason]] = [
    ("revoked", {}, BrokenReason.KEY_REJECTED),
    ("scope taken away", {"scopes": ("export-jobs:read",)}, BrokenReason.PERMISSION_LOST),
    ("other company", {"company_id": str(uuid.uuid4())}, BrokenReason.COMPANY_CHANGED),
]


@pytest.mark.parametrize(("what", "change", "reason"), CHECKS, ids=[row[0] for row in CHECKS])
async def test_a_check_breaks_a_tenant_whose_key_no_longer_works(
    tenant_service: TenantService,
    fake_pleo: FakePleo,
    memory_store: MemoryStore,
    what: str,
    change: dict[str, object],
    reason: BrokenReason,
) -> None:
    key = fake_pleo.add_key(COMPANY)
    await tenant_service.activate("acme", key)
    if change:
        fake_pleo.change(key, **change)
    else:
        fake_pleo.revoke(key)

    broken = await tenant_service.check("acme")

    assert (broken.state, broken.reason) == (TenantState.BROKEN, reason)
    assert await memory_store.get("acme") == broken
    with pytest.raises(errors.TenantNotActive):
        tenant_service.registry.active("acme")
    assert _transitions(tenant_service, "broken", reason.value) == 1
    if reason is BrokenReason.PERMISSION_LOST:
        assert broken.missing_scopes == ("export-jobs:write",)


async def test_a_check_that_finds_the_key_working_again_recovers_the_tenant(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    key = fake_pleo.add_key(COMPANY)
    await tenant_service.activate("acme", key)
    fake_pleo.change(key, scopes=("export-jobs:read",))
    assert (await tenant_service.check("acme")).state is TenantState.BROKEN
    fake_pleo.change(key, scopes=REQUIRED_SCOPES)

    recovered = await tenant_service.check("acme")

    assert (recovered.state, recovered.reason, recovered.missing_scopes) == (
        TenantState.ACTIVE,
        None,
        (),
    )
    assert _transitions(tenant_service, "active", "recovered") == 1


async def test_a_check_pleo_cannot_answer_changes_nothing(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    active = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    fake_pleo.failure = 502
    with pytest.raises(errors.PleoUnavailable) as caught:
        await tenant_service.check("acme")
    assert caught.value.tenant == "acme"
    assert tenant_service.registry.get("acme") == active


async def test_checking_an_unknown_tenant_is_tenant_unknown(
    tenant_service: TenantService,
) -> None:
    await tenant_service.registry.refresh()
    with pytest.raises(errors.TenantUnknown):
        await tenant_service.check("acme")


async def test_checking_a_pending_tenant_asks_pleo_nothing(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    with pytest.raises(errors.KeyInvalid):
        await tenant_service.activate("acme", ApiKey("pik_" + "x" * 40))
    before = fake_pleo.calls.total()
    assert (await tenant_service.check("acme")).state is TenantState.PENDING
    assert fake_pleo.calls.total() == before


async def test_concurrent_checks_share_one_introspection(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    before = fake_pleo.calls["/v1/introspect"]
    fake_pleo.gate = asyncio.Event()
    checks = [asyncio.create_task(tenant_service.check("acme")) for _ in range(20)]
    forbidden = asyncio.create_task(tenant_service.recheck_after_forbidden("acme"))
    await fake_pleo.held.wait()  # the others joined it when they first ran, before this
    fake_pleo.gate.set()

    records = await asyncio.gather(*checks, forbidden)

    assert fake_pleo.calls["/v1/introspect"] == before + 1
    assert len({id(record) for record in records}) == 1


async def test_a_403_recheck_that_found_the_key_fine_stands_for_a_while(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    before = fake_pleo.calls["/v1/introspect"]
    for _ in range(5):
        assert (await tenant_service.recheck_after_forbidden("acme")).state is TenantState.ACTIVE
    assert fake_pleo.calls["/v1/introspect"] == before + 1
    await tenant_service.check("acme")  # an explicit check always asks
    assert fake_pleo.calls["/v1/introspect"] == before + 2


# -- a key Pleo rejects on a proxied call ----------------------------------------------------


async def test_key_rejected_breaks_the_tenant_at_once(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    record = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    before = fake_pleo.calls.total()

    broken = await tenant_service.key_rejected(record)

    assert (broken.state, broken.reason) == (TenantState.BROKEN, BrokenReason.KEY_REJECTED)
    assert await memory_store.get("acme") == broken
    assert fake_pleo.calls.total() == before  # Pleo's 401 is the answer: no introspection
    assert await tenant_service.key_rejected(record) == broken  # once is enough


async def test_key_rejected_for_a_key_already_replaced_changes_nothing(
    tenant_service: TenantService, fake_pleo: FakePleo
) -> None:
    old = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    rotated = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))

    assert await tenant_service.key_rejected(old) == rotated
    assert tenant_service.registry.active("acme").key == rotated.api_key


async def test_key_rejected_after_another_replica_rotated_keeps_the_new_key(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    old = await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    rotated = await memory_store.replica().put(old.evolve(api_key=fake_pleo.add_key(COMPANY)))

    assert await tenant_service.key_rejected(old) == rotated  # the write conflicted: re-read
    assert await memory_store.get("acme") == rotated


# -- disconnect ----------------------------------------------------------------------------


async def test_disconnect_destroys_the_record_and_stops_serving_it(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))

    await tenant_service.disconnect("acme")

    assert await memory_store.get("acme") is None
    with pytest.raises(errors.TenantUnknown):
        tenant_service.registry.active("acme")
    with pytest.raises(errors.TenantUnknown):
        await tenant_service.disconnect("acme")
    # The company is free again.
    await tenant_service.activate("globex", fake_pleo.add_key(COMPANY))


async def test_a_disconnect_the_store_refuses_says_what_to_retry(
    tenant_service: TenantService, fake_pleo: FakePleo, memory_store: MemoryStore
) -> None:
    await tenant_service.activate("acme", fake_pleo.add_key(COMPANY))
    memory_store.down = True
    with pytest.raises(errors.StoreUnavailable, match="Retry DELETE /v1/tenants/acme"):
        await tenant_service.disconnect("acme")
    with pytest.raises(errors.TenantUnknown):
        tenant_service.registry.active("acme")  # not served while the retry is owed


async def test_a_read_only_store_is_the_write_problem(
    tenant_service: TenantService, memory_store: MemoryStore
) -> None:
    assert tenant_service.write_problem is None
    memory_store.read_only_reason = "the store was opened read-only"
    assert tenant_service.write_problem == "the store was opened read-only"
