"""Tenant records: the values the store keeps and the proxy serves from memory."""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def valid_tenant_id(tenant: str) -> bool:
    """True if `tenant` is a well-formed tenant id."""
    return TENANT_ID.fullmatch(tenant) is not None


def utcnow() -> datetime:
    """Now, in UTC, to the second (what records and views carry)."""
    return datetime.now(UTC).replace(microsecond=0)


class TenantState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    BROKEN = "broken"


class BrokenReason(enum.StrEnum):
    KEY_REJECTED = "key_rejected"
    PERMISSION_LOST = "permission_lost"
    COMPANY_CHANGED = "company_changed"


class ApiKey:
    """A Pleo API key. Its repr and str never show it; `reveal()` does, on purpose."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def basic_auth(self) -> str:
        """The Authorization header value Pleo expects: the key as user name, empty password."""
        return "Basic " + base64.b64encode(self._value.encode() + b":").decode("ascii")

    @property
    def hint(self) -> str:
        """At most the last 4 characters, and none of a short key."""
        if len(self._value) < 12:
            return "…"
        return "…" + self._value[-4:]

    def __repr__(self) -> str:
        return "ApiKey('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """Everything the broker knows about one tenant.

    `version` is the store's revision of the record: writes carry the version they
    read, and the store refuses a write whose version is stale (compare-and-set).
    `client_id` and `application_name` are the integration Pleo says the key was made for
    (introspection's `clientId` and `applicationName`); identifiers, not secrets.
    """

    tenant: str
    state: TenantState
    api_key: ApiKey | None
    company_id: str | None = None
    scopes: frozenset[str] = frozenset()
    missing_scopes: tuple[str, ...] = ()
    reason: BrokenReason | None = None
    message: str | None = None
    activated_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)
    last_checked_at: datetime | None = None
    version: int = 0
    client_id: str | None = None
    application_name: str | None = None
    # The customer's installation in Pleo (broker.installation): the status the broker keeps
    # it in, when Pleo last confirmed it, and why the last attempt failed (None: it did not).
    installation_status: str | None = None
    installation_synced_at: datetime | None = None
    installation_error: str | None = None

    def evolve(self, **changes: Any) -> TenantRecord:
        """A copy with `changes` applied (the version is the store's to set)."""
        return replace(self, **changes)

    def view(self) -> dict[str, Any]:
        """The tenant view of the admin API: never the key, at most its last 4 characters."""
        return {
            "tenant": self.tenant,
            "state": self.state.value,
            "company_id": self.company_id,
            "key_hint": self.api_key.hint if self.api_key is not None else None,
            "scopes": sorted(self.scopes),
            "missing_scopes": list(self.missing_scopes),
            "reason": self.reason.value if self.reason is not None else None,
            "message": self.message,
            "activated_at": _iso(self.activated_at),
            "updated_at": _iso(self.updated_at),
            "last_checked_at": _iso(self.last_checked_at),
            "client_id": self.client_id,
            "application_name": self.application_name,
            "installation": {
                "status": self.installation_status,
                "synced_at": _iso(self.installation_synced_at),
                "error": self.installation_error,
            },
        }


@dataclass(frozen=True, slots=True)
class ActiveTenant:
    """An active tenant as the proxy serves it: built once per record, not per request.

    `authorization` is the header value the key makes (kept out of the repr); `record` is the
    record it was built from, which the proxy hands back when Pleo rejects the key.
    """

    tenant: str
    key: ApiKey
    company_id: str
    scopes: frozenset[str]
    authorization: str = field(repr=False)
    record: TenantRecord = field(repr=False, compare=False)

    @classmethod
    def of(cls, record: TenantRecord) -> ActiveTenant | None:
        """The active tenant `record` describes, or None if it is not an active one."""
        key, company_id = record.api_key, record.company_id
        if record.state is not TenantState.ACTIVE or key is None or company_id is None:
            return None
        return cls(record.tenant, key, company_id, record.scopes, key.basic_auth(), record)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
