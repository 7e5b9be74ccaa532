"""The tenant rules: what Pleo's answer about a key means, as pure functions (docs/contract.md).

Beside the I/O of `broker.tenants`, not inside it: each function takes plain values (Pleo's
`Introspection`, the tenant's current `TenantRecord` or None, the deployment's
`Requirements`, the other tenants' company bindings) and returns a value or raises the
`ActivationError` the admin API answers. No store, no Pleo, no clock.

- `validate_key`: may this key become the tenant's key? Returns the company to bind.
- `judge_check`: what does a re-introspection of the tenant's stored key say? `Works` (with
  the tenant's confirmed record) or `Broken` (with the reason); `None` for the answer means
  Pleo rejected the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from broker import errors
from broker.pleo import Introspection
from broker.records import BrokenReason, TenantRecord, TenantState

API_KEY_AUTH = "API_KEY"


@dataclass(frozen=True, slots=True)
class Requirements:
    """What this deployment asks of every key: the scopes it needs
    (`BROKER_REQUIRED_SCOPES`) and, when set, the integration's client id
    (`BROKER_PLEO_CLIENT_ID`)."""

    scopes: tuple[str, ...] = ()
    client_id: str | None = None

    def missing_scopes(self, granted: frozenset[str]) -> tuple[str, ...]:
        """The required scopes not in `granted`, in the order they are required."""
        return tuple(scope for scope in self.scopes if scope not in granted)


def validate_key(
    info: Introspection,
    requirements: Requirements,
    current: TenantRecord | None,
    others: Mapping[str, str | None],
    *,
    allow_company_change: bool = False,
) -> str:
    """The company to bind the key described by `info` to, or the ActivationError refusing it.

    `current` is the tenant's record (None for a new tenant); `others` maps every *other*
    tenant to its bound company (None when it has none), in the order to report them.
    """
    if info.auth_method != API_KEY_AUTH:
        raise errors.KeyNotApiKey(auth_method=info.auth_method)
    if requirements.client_id is not None and not _same_client(
        info.client_id, requirements.client_id
    ):
        raise wrong_integration(info)
    company_id = info.company_id
    if company_id is None:
        raise errors.KeyNotCompanyScoped()
    missing = requirements.missing_scopes(info.scopes)
    if missing:
        raise errors.ScopesMissing(
            "This key lacks permissions the integration needs: "
            + ", ".join(missing)
            + ". Reinstall the integration in Pleo granting them, then paste the new key.",
            missing_scopes=list(missing),
        )
    bound = current.company_id if current is not None else None
    if bound is not None and bound != company_id and not allow_company_change:
        raise errors.CompanyChanged(company_id=bound, key_company_id=company_id)
    for other, other_company in others.items():
        if other_company == company_id:
            raise errors.CompanyInUse(company_id=company_id, other_tenant=other)
    return company_id


def wrong_integration(info: Introspection) -> errors.KeyWrongIntegration:
    """The refusal of a key made for another integration, naming it when Pleo did."""
    if not info.application_name:
        return errors.KeyWrongIntegration()
    return errors.KeyWrongIntegration(
        f"This key was made for another integration ({info.application_name[:80]!r})."
        " In Pleo, open Settings → Integrations, choose this integration, copy its API key"
        " and paste that key here.",
        key_application_name=info.application_name[:80],
    )


def _same_client(client_id: str | None, expected: str) -> bool:
    return client_id is not None and client_id.strip().lower() == expected.strip().lower()


@dataclass(frozen=True, slots=True)
class Works:
    """A check found the tenant's key working: `record` is the tenant as it now stands;
    `recovered` says it was broken, `scopes_changed` that Pleo now grants other scopes."""

    record: TenantRecord
    recovered: bool = False
    scopes_changed: bool = False


@dataclass(frozen=True, slots=True)
class Broken:
    """A check found the tenant's key not working, for `reason`. For a lost permission
    `scopes` and `missing` are what Pleo grants and what is lacking; for a changed
    company `key_company_id` is the company the key names now (None: none)."""

    reason: BrokenReason
    scopes: frozenset[str] | None = None
    missing: tuple[str, ...] = ()
    key_company_id: str | None = None


def judge_check(
    record: TenantRecord,
    info: Introspection | None,
    requirements: Requirements,
    now: datetime,
) -> Works | Broken:
    """Judge a check at `now` of `record`'s key: `info` is Pleo's answer, None when Pleo
    rejected the key."""
    if info is None:
        return Broken(BrokenReason.KEY_REJECTED)
    if info.auth_method != API_KEY_AUTH or info.company_id != record.company_id:
        return Broken(BrokenReason.COMPANY_CHANGED, key_company_id=info.company_id)
    missing = requirements.missing_scopes(info.scopes)
    if missing:
        return Broken(BrokenReason.PERMISSION_LOST, scopes=info.scopes, missing=missing)
    recovered = record.state is TenantState.BROKEN
    scopes_changed = info.scopes != record.scopes
    confirmed = record.evolve(
        state=TenantState.ACTIVE,
        scopes=info.scopes,
        client_id=info.client_id or record.client_id,
        application_name=info.application_name or record.application_name,
        missing_scopes=(),
        reason=None,
        message=None,
        updated_at=now if recovered or scopes_changed else record.updated_at,
        last_checked_at=now,
    )
    return Works(confirmed, recovered=recovered, scopes_changed=scopes_changed)
