"""The tenant rules (broker.rules) as tables: every outcome of validating a key and of
judging a check, with plain values and no I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from broker import errors
from broker.pleo import Introspection
from broker.records import ApiKey, BrokenReason, TenantRecord, TenantState
from broker.rules import Broken, Requirements, Works, judge_check, validate_key

ACME = "0b8f4c2e-5d6a-4e7b-9c1d-2f3a4b5c6d7e"
GLOBEX = "1c9e5d3f-6e7b-4f8c-8d2e-3a4b5c6d7e8f"
SCOPES = frozenset({"export-jobs:read", "accounts:read"})
REQUIRED = Requirements(scopes=("export-jobs:read", "accounts:read"), client_id="broker-app")
THEN = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 2, tzinfo=UTC)
KEY = ApiKey("k" * 40)


def answer(**changes: object) -> Introspection:
    """Pleo's answer about a good key of ACME made for this integration, with `changes`."""
    good = Introspection(
        auth_method="API_KEY",
        subject_urn=f"urn:pleo:company:{ACME}",
        scopes=SCOPES,
        client_id="broker-app",
        application_name="The Broker",
    )
    return replace(good, **changes)  # type: ignore[arg-type]


def tenant(state: TenantState = TenantState.ACTIVE, **changes: object) -> TenantRecord:
    record = TenantRecord(
        tenant="acme",
        state=state,
        api_key=KEY,
        company_id=ACME,
        scopes=SCOPES,
        updated_at=THEN,
        last_checked_at=THEN,
        version=3,
        client_id="broker-app",
        application_name="The Broker",
    )
    return record.evolve(**changes)


# -- validating a key for activation ------------------------------------------------------

ACCEPTED = [
    pytest.param(answer(), REQUIRED, None, {}, False, id="a-new-tenant"),
    pytest.param(answer(), REQUIRED, tenant(), {}, False, id="a-rotation-in-the-same-company"),
    pytest.param(
        answer(subject_urn=f"urn:pleo:company:{GLOBEX}"),
        REQUIRED,
        tenant(),
        {},
        True,
        id="a-company-change-confirmed",
    ),
    pytest.param(
        answer(client_id=" BROKER-APP "),
        REQUIRED,
        None,
        {},
        False,
        id="client-id-compared-without-case-or-spaces",
    ),
    pytest.param(
        answer(client_id=None), Requirements(), None, {}, False, id="no-client-id-required"
    ),
    pytest.param(
        answer(scopes=SCOPES | {"vendors:write"}), REQUIRED, None, {}, False, id="extra-scopes"
    ),
    pytest.param(
        answer(), REQUIRED, None, {"globex": GLOBEX, "hooli": None}, False, id="others-elsewhere"
    ),
    pytest.param(
        answer(subject_urn=f"urn:pleo:company:{ACME.upper()}"),
        REQUIRED,
        None,
        {},
        False,
        id="company-urn-in-upper-case",
    ),
]


@pytest.mark.parametrize(("info", "requirements", "current", "others", "allow"), ACCEPTED)
def test_an_acceptable_key_binds_its_company(
    info: Introspection,
    requirements: Requirements,
    current: TenantRecord | None,
    others: dict[str, str | None],
    allow: bool,
) -> None:
    company = validate_key(info, requirements, current, others, allow_company_change=allow)
    assert company == info.company_id


REFUSED = [
    pytest.param(
        answer(auth_method="OAUTH"),
        None,
        {},
        errors.KeyNotApiKey,
        {"auth_method": "OAUTH"},
        id="not-an-api-key",
    ),
    pytest.param(
        answer(client_id="another-app", application_name="Other App"),
        None,
        {},
        errors.KeyWrongIntegration,
        {"key_application_name": "Other App"},
        id="another-integration-named",
    ),
    pytest.param(
        answer(client_id="another-app", application_name=None),
        None,
        {},
        errors.KeyWrongIntegration,
        {},
        id="another-integration-unnamed",
    ),
    pytest.param(
        answer(client_id=None, application_name=None),
        None,
        {},
        errors.KeyWrongIntegration,
        {},
        id="no-client-id-nor-name",
    ),
    pytest.param(
        answer(subject_urn="urn:pleo:organization:x"),
        None,
        {},
        errors.KeyNotCompanyScoped,
        {},
        id="an-organisation-key",
    ),
    pytest.param(answer(subject_urn=""), None, {}, errors.KeyNotCompanyScoped, {}, id="no-subject"),
    pytest.param(
        answer(scopes=frozenset({"export-jobs:read"})),
        None,
        {},
        errors.ScopesMissing,
        {"missing_scopes": ["accounts:read"]},
        id="a-scope-missing",
    ),
    pytest.param(
        answer(scopes=frozenset()),
        None,
        {},
        errors.ScopesMissing,
        {"missing_scopes": ["export-jobs:read", "accounts:read"]},
        id="every-scope-missing-in-required-order",
    ),
    pytest.param(
        answer(subject_urn=f"urn:pleo:company:{GLOBEX}"),
        tenant(),
        {},
        errors.CompanyChanged,
        {"company_id": ACME, "key_company_id": GLOBEX},
        id="another-company-unconfirmed",
    ),
    pytest.param(
        answer(),
        None,
        {"globex": None, "initech": ACME, "zeta": ACME},
        errors.CompanyInUse,
        {"company_id": ACME, "other_tenant": "initech"},
        id="company-bound-to-another-tenant-first-named",
    ),
    pytest.param(
        answer(),
        tenant(TenantState.BROKEN),
        {"initech": ACME},
        errors.CompanyInUse,
        {"company_id": ACME, "other_tenant": "initech"},
        id="company-in-use-also-on-rotation",
    ),
]


@pytest.mark.parametrize(("info", "current", "others", "refusal", "details"), REFUSED)
def test_an_unacceptable_key_is_refused_with_its_reason(
    info: Introspection,
    current: TenantRecord | None,
    others: dict[str, str | None],
    refusal: type[errors.ActivationError],
    details: dict[str, object],
) -> None:
    with pytest.raises(refusal) as refused:
        validate_key(info, REQUIRED, current, others)
    assert type(refused.value) is refusal
    assert refused.value.details == details


def test_the_first_failing_rule_wins() -> None:
    """Auth method, then integration, then company scoping, then scopes, then binding."""
    worst = answer(auth_method="OAUTH", client_id="x", subject_urn="", scopes=frozenset())
    order = [
        (worst, errors.KeyNotApiKey),
        (replace(worst, auth_method="API_KEY"), errors.KeyWrongIntegration),
        (replace(worst, auth_method="API_KEY", client_id="broker-app"), errors.KeyNotCompanyScoped),
        (answer(scopes=frozenset()), errors.ScopesMissing),
    ]
    for info, refusal in order:
        with pytest.raises(refusal):
            validate_key(info, REQUIRED, tenant(), {"initech": ACME})


def test_refusal_messages_name_what_to_do() -> None:
    with pytest.raises(errors.ScopesMissing) as missing:
        validate_key(answer(scopes=frozenset()), REQUIRED, None, {})
    assert missing.value.message == (
        "This key lacks permissions the integration needs: export-jobs:read, accounts:read."
        " Reinstall the integration in Pleo granting them, then paste the new key."
    )
    long_name = "A" * 200
    with pytest.raises(errors.KeyWrongIntegration) as wrong:
        validate_key(answer(client_id="x", application_name=long_name), REQUIRED, None, {})
    assert f"({'A' * 80!r})" in wrong.value.message
    assert wrong.value.details == {"key_application_name": "A" * 80}


def test_missing_scopes_keep_the_required_order() -> None:
    requirements = Requirements(scopes=("b:read", "a:read", "c:read"))
    assert requirements.missing_scopes(frozenset({"a:read"})) == ("b:read", "c:read")
    assert requirements.missing_scopes(frozenset({"a:read", "b:read", "c:read"})) == ()
    assert Requirements().missing_scopes(frozenset()) == ()


# -- judging a check of the stored key ----------------------------------------------------

BROKEN = [
    pytest.param(tenant(), None, Broken(BrokenReason.KEY_REJECTED), id="pleo-rejects-the-key"),
    pytest.param(
        tenant(TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED),
        None,
        Broken(BrokenReason.KEY_REJECTED),
        id="still-rejected",
    ),
    pytest.param(
        tenant(),
        answer(subject_urn=f"urn:pleo:company:{GLOBEX}"),
        Broken(BrokenReason.COMPANY_CHANGED, key_company_id=GLOBEX),
        id="the-key-names-another-company",
    ),
    pytest.param(
        tenant(),
        answer(subject_urn=""),
        Broken(BrokenReason.COMPANY_CHANGED, key_company_id=None),
        id="the-key-names-no-company",
    ),
    pytest.param(
        tenant(),
        answer(auth_method="OAUTH"),
        Broken(BrokenReason.COMPANY_CHANGED, key_company_id=ACME),
        id="no-longer-an-api-key",
    ),
    pytest.param(
        tenant(),
        answer(scopes=frozenset({"accounts:read", "vendors:read"})),
        Broken(
            BrokenReason.PERMISSION_LOST,
            scopes=frozenset({"accounts:read", "vendors:read"}),
            missing=("export-jobs:read",),
        ),
        id="a-permission-lost",
    ),
]


@pytest.mark.parametrize(("record", "info", "verdict"), BROKEN)
def test_a_check_that_finds_the_key_not_working_says_why(
    record: TenantRecord, info: Introspection | None, verdict: Broken
) -> None:
    assert judge_check(record, info, REQUIRED, NOW) == verdict


WORKS = [
    pytest.param(tenant(), answer(), False, False, id="ok-unchanged"),
    pytest.param(
        tenant(TenantState.BROKEN, reason=BrokenReason.KEY_REJECTED, message="gone"),
        answer(),
        True,
        False,
        id="recovered",
    ),
    pytest.param(
        tenant(),
        answer(scopes=SCOPES | {"vendors:read"}),
        False,
        True,
        id="ok-with-scopes-changed",
    ),
    pytest.param(
        tenant(TenantState.BROKEN, reason=BrokenReason.PERMISSION_LOST, missing_scopes=("x",)),
        answer(scopes=SCOPES | {"x:read"}),
        True,
        True,
        id="recovered-with-scopes-changed",
    ),
]


@pytest.mark.parametrize(("record", "info", "recovered", "scopes_changed"), WORKS)
def test_a_check_that_finds_the_key_working_confirms_the_tenant(
    record: TenantRecord, info: Introspection, recovered: bool, scopes_changed: bool
) -> None:
    verdict = judge_check(record, info, REQUIRED, NOW)
    assert isinstance(verdict, Works)
    assert (verdict.recovered, verdict.scopes_changed) == (recovered, scopes_changed)
    confirmed = verdict.record
    assert confirmed.state is TenantState.ACTIVE
    assert (confirmed.reason, confirmed.message, confirmed.missing_scopes) == (None, None, ())
    assert confirmed.scopes == info.scopes
    assert confirmed.last_checked_at == NOW
    # updated_at moves only when something a reader sees changed
    assert confirmed.updated_at == (NOW if recovered or scopes_changed else THEN)
    assert (confirmed.tenant, confirmed.api_key, confirmed.company_id) == ("acme", KEY, ACME)
    assert confirmed.version == record.version


@pytest.mark.parametrize(
    ("client_id", "application_name", "expected"),
    [
        ("new-id", "New Name", ("new-id", "New Name")),
        (None, None, ("broker-app", "The Broker")),  # Pleo left them out: keep what we knew
        ("", "", ("broker-app", "The Broker")),
    ],
)
def test_a_confirmed_tenant_keeps_the_integration_pleo_names(
    client_id: str | None, application_name: str | None, expected: tuple[str, str]
) -> None:
    info = answer(client_id=client_id, application_name=application_name)
    verdict = judge_check(tenant(), info, Requirements(scopes=REQUIRED.scopes), NOW)
    assert isinstance(verdict, Works)
    assert (verdict.record.client_id, verdict.record.application_name) == expected


def test_a_check_ignores_the_client_id_requirement() -> None:
    """A check judges company and scopes only; the integration was checked at activation."""
    verdict = judge_check(tenant(), answer(client_id="another-app"), REQUIRED, NOW)
    assert isinstance(verdict, Works)
