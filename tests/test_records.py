"""broker.records: the key type and the active tenant the proxy serves."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from broker.records import ActiveTenant, ApiKey, BrokenReason, TenantRecord, TenantState

KEY = "pik_" + "k" * 40
COMPANY = "0b7e3c1a-5d2f-4e8b-9a61-3f0c2d4e5a6b"


def test_basic_auth_is_the_key_as_user_with_an_empty_password() -> None:
    assert ApiKey("abc").basic_auth() == "Basic " + base64.b64encode(b"abc:").decode()


def _record(**changes: object) -> TenantRecord:
    record = TenantRecord(
        tenant="acme",
        state=TenantState.ACTIVE,
        api_key=ApiKey(KEY),
        company_id=COMPANY,
        scopes=frozenset({"a:read"}),
    )
    return record.evolve(**changes)


def test_an_active_record_makes_an_active_tenant() -> None:
    record = _record()
    active = ActiveTenant.of(record)
    assert active is not None
    assert (active.tenant, active.key, active.company_id, active.scopes) == (
        "acme",
        ApiKey(KEY),
        COMPANY,
        frozenset({"a:read"}),
    )
    assert active.authorization == ApiKey(KEY).basic_auth()
    assert active.record is record
    with pytest.raises(dataclasses.FrozenInstanceError):
        active.tenant = "other"  # type: ignore[misc]


def test_an_active_tenant_never_shows_its_key() -> None:
    active = ActiveTenant.of(_record())
    secret_forms = (KEY, base64.b64encode(KEY.encode() + b":").decode())
    assert not any(form in repr(active) or form in str(active) for form in secret_forms)


@pytest.mark.parametrize(
    "changes",
    [
        {"state": TenantState.PENDING, "api_key": None},
        {"state": TenantState.BROKEN, "reason": BrokenReason.KEY_REJECTED},
        {"api_key": None},
        {"company_id": None},
    ],
)
def test_only_an_active_record_with_key_and_company_makes_one(changes: dict[str, object]) -> None:
    assert ActiveTenant.of(_record(**changes)) is None
