"""The sandbox's memory: API keys, companies, Pleo resources, faults and the request log.

Keys are kept only as SHA-256 digests: the key text is handed to whoever created the key
and never stored, logged or shown again by the sandbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

ALL_SCOPES: tuple[str, ...] = (
    "export-jobs:read",
    "export-jobs:write",
    "export-items:read",
    "accounts:read",
    "accounts:write",
    "vendors:read",
    "vendors:write",
    "users:read",
    "companies:read",
    "tax-codes:read",
    "tax-codes:write",
    "tag-groups:read",
    "tag-groups:write",
    "tags:read",
    "tags:write",
    "subscriptions:read",
    "subscriptions:write",
    "accounting-entries:write",
)
AUTH_METHODS = frozenset({"API_KEY", "OAUTH2", "NONE"})
FAULT_STATUSES = frozenset({429, 500, 502, 503, 504})
FaultKind = Literal["latency", "status", "drop"]
APPLICATION_ID = "5a9d3c1e-0b7f-4c52-9e1a-7d2f6b8c4e10"
REQUEST_LOG_SIZE = 1000
WEBHOOK_RETRY_DELAYS = (1.0, 5.0, 30.0)

_FIRST_NAMES = ("Ada", "Grace", "Linus", "Margaret", "Edsger")
_LAST_NAMES = ("Lovelace", "Hopper", "Torvalds", "Hamilton", "Dijkstra")


class UnknownKey(LookupError):
    """No sandbox key has this id."""


def now_iso() -> str:
    """Now, as Pleo writes timestamps (UTC, to the second)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SandboxKey:
    """A key as created; `api_key` is the only copy of the key text the sandbox gives out."""

    key_id: str
    api_key: str = field(repr=False)
    company_id: str
    scopes: tuple[str, ...]


@dataclass(slots=True)
class KeyRecord:
    """What the sandbox remembers of a key (a digest, never the text)."""

    key_id: str
    digest: str
    company_id: str
    scopes: tuple[str, ...]
    auth_method: str
    subject_urn: str
    client_id: str
    installation_id: str
    created_at: str
    revoked: bool = False
    subject_in_introspection: bool = True
    """False: `/v1/introspect` leaves `subjectURN` out (Pleo's spec makes it optional)."""
    installation_resource: str | None = None
    """The `resource` of `/v1/installations/me` when not the subject's URN."""
    expires_at: float | None = None
    """Unix time after which the key answers 401 (None: never)."""
    installation: dict[str, Any] = field(default_factory=dict)
    """What `/v1/installations/me` changed: status, metadata, errorCode, updatedAt, deleted."""


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request that reached the Pleo API surface, without any credential text."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    authorization_count: int
    authorization_matched: bool
    key_id: str | None
    at: float = field(default_factory=time.time)  # Unix time it arrived (rates in tests)

    def header_values(self, name: str) -> list[str]:
        """Every value of the (non-Authorization) header `name`."""
        lowered = name.lower()
        return [value for key, value in self.headers if key == lowered]

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(pair) for pair in self.headers],
            "authorization_count": self.authorization_count,
            "authorization_matched": self.authorization_matched,
            "key_id": self.key_id,
            "at": self.at,
        }


@dataclass(slots=True)
class Fault:
    """An injected failure for requests whose path starts with `path_prefix`."""

    fault_id: str
    path_prefix: str
    kind: FaultKind
    latency_ms: int = 0
    status: int = 503
    retry_after: int | None = None
    times: int | None = None  # None: until cleared

    def to_json(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id,
            "path_prefix": self.path_prefix,
            "kind": self.kind,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "retry_after": self.retry_after,
            "times": self.times,
        }


@dataclass(slots=True)
class RateLimit:
    """Per-key token buckets: `per_second` requests a second, bursts of up to `burst`."""

    per_second: float
    burst: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, at

    def take(self, key_id: str, now: float) -> float | None:
        """None when the key may go on; else the seconds until it may (for Retry-After)."""
        tokens, at = self.buckets.get(key_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        if tokens >= 1:
            self.buckets[key_id] = (tokens - 1, now)
            return None
        self.buckets[key_id] = (tokens, now)
        return (1 - tokens) / self.per_second

    def to_json(self) -> dict[str, Any]:
        return {"requests_per_second": self.per_second, "burst": self.burst}


@dataclass(slots=True)
class Company:
    id: str
    name: str
    organization_id: str
    employees: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "organizationId": self.organization_id,
            "registrationNumber": "DK" + self.id[:8].upper(),
            "address": {
                "addressLine1": "Ravnsborg Tværgade 5C",
                "locality": "Copenhagen",
                "postalCode": "2200",
                "country": "DK",
            },
        }


class SandboxState:
    """Everything one sandbox knows; tests drive it directly, the control API over HTTP."""

    def __init__(self, *, request_log_size: int = REQUEST_LOG_SIZE) -> None:
        self.requests: deque[SeenRequest] = deque(maxlen=request_log_size)
        self.faults: list[Fault] = []
        self.keys: dict[str, KeyRecord] = {}
        self.companies: dict[str, Company] = {}
        self.export_jobs: dict[str, dict[str, Any]] = {}
        self.job_items: dict[str, list[dict[str, Any]]] = {}
        self.vendors: dict[str, dict[str, Any]] = {}
        self.tax_codes: dict[str, dict[str, Any]] = {}
        self.tag_groups: dict[str, dict[str, Any]] = {}
        # every collection of Pleo records by its path (`generic`); the named ones included
        self.records: dict[str, dict[str, dict[str, Any]]] = {
            "/v1/vendors": self.vendors,
            "/v0/tax-codes": self.tax_codes,
            "/v0/tag-groups": self.tag_groups,
            "/v3/export-jobs": self.export_jobs,
        }
        self._by_digest: dict[str, str] = {}
        # webhooks (`subscriptions`): every delivery and its attempts; retry pauses in seconds
        self.webhook_deliveries: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.webhook_retry_delays: tuple[float, ...] = WEBHOOK_RETRY_DELAYS
        self.webhook_tasks: set[asyncio.Task[bool]] = set()
        self.rate_limit: RateLimit | None = None  # off unless switched on
        # tests drive the state from their own thread while a server thread serves it
        self._lock = threading.Lock()

    # keys

    def create_key(  # noqa: PLR0913 - one argument per field of the control API's key body
        self,
        company_id: str | None = None,
        scopes: Iterable[str] = ALL_SCOPES,
        auth_method: str = "API_KEY",
        subject_urn: str | None = None,
        *,
        client_id: str | None = None,
        subject_in_introspection: bool = True,
        installation_resource: str | None = None,
        expires_in: float | None = None,
    ) -> SandboxKey:
        """A new key for `company_id` (a new company when None) with `scopes`.

        `client_id` is the integration the key was made for (a new one when None);
        `subject_in_introspection=False` leaves `subjectURN` out of `/v1/introspect`, and
        `installation_resource` replaces the subject as `/v1/installations/me`'s `resource`;
        `expires_in` (seconds) makes the key answer 401 from then on.
        """
        if expires_in is not None and expires_in < 0:
            raise ValueError("expires_in must be >= 0 seconds")
        company = self.company(company_id or str(uuid.uuid4()))
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {sorted(AUTH_METHODS)}")
        api_key = "pik_" + secrets.token_hex(24)
        record = KeyRecord(
            key_id="key_" + secrets.token_hex(8),
            digest=digest(api_key),
            company_id=company.id,
            scopes=tuple(dict.fromkeys(scopes)),
            auth_method=auth_method,
            subject_urn=subject_urn or f"urn:pleo:company:{company.id}",
            client_id=client_id or str(uuid.uuid4()),
            installation_id=str(uuid.uuid4()),
            created_at=now_iso(),
            subject_in_introspection=subject_in_introspection,
            installation_resource=installation_resource,
            expires_at=None if expires_in is None else time.time() + expires_in,
        )
        with self._lock:
            self.keys[record.key_id] = record
            self._by_digest[record.digest] = record.key_id
        return SandboxKey(record.key_id, api_key, record.company_id, record.scopes)

    def adopt_key(self, record: KeyRecord) -> None:
        """Know a key made elsewhere (a state file): by id and by digest."""
        with self._lock:
            self.keys[record.key_id] = record
            self._by_digest[record.digest] = record.key_id

    def revoke(self, key_id: str) -> None:
        """From now on the key gets 401."""
        self._key(key_id).revoked = True

    def set_scopes(self, key_id: str, scopes: Iterable[str]) -> None:
        """Replace the key's scopes (as when a customer edits the integration's permissions)."""
        self._key(key_id).scopes = tuple(dict.fromkeys(scopes))

    def key_by_text(self, api_key: str) -> KeyRecord | None:
        """The record of a key given its text, revoked or not."""
        key_id = self._by_digest.get(digest(api_key))
        return None if key_id is None else self.keys[key_id]

    def _key(self, key_id: str) -> KeyRecord:
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKey(key_id) from None

    def collection(self, path: str) -> dict[str, dict[str, Any]]:
        """The records of the collection at `path` (a path template), by id."""
        with self._lock:
            return self.records.setdefault(path, {})

    # companies

    def company(self, company_id: str) -> Company:
        """The company with this id, created (with seeded employees) on first use."""
        company_id = str(uuid.UUID(company_id))
        found = self.companies.get(company_id)
        if found is None:
            found = Company(company_id, f"Sandbox Company {company_id[:8]}", str(uuid.uuid4()))
            found.employees = [
                {
                    "id": str(uuid.uuid4()),
                    "companyId": company_id,
                    "firstName": first,
                    "lastName": last,
                    "email": f"{first.lower()}.{last.lower()}@example.com",
                    "code": f"EMP-{n + 1:03d}",
                    "jobTitle": "Engineer",
                }
                for n, (first, last) in enumerate(zip(_FIRST_NAMES, _LAST_NAMES, strict=True))
            ]
            found = self.companies.setdefault(company_id, found)  # another thread may have won
        return found

    # faults

    def add_fault(
        self,
        path_prefix: str = "/",
        kind: FaultKind = "status",
        *,
        latency_ms: int = 0,
        status: int = 503,
        retry_after: int | None = None,
        times: int | None = None,
    ) -> Fault:
        """Inject a fault for the next `times` matching requests (all of them when None)."""
        if kind not in ("latency", "status", "drop"):
            raise ValueError("kind must be 'latency', 'status' or 'drop'")
        if not path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with '/'")
        if kind == "status" and status not in FAULT_STATUSES:
            raise ValueError(f"status must be one of {sorted(FAULT_STATUSES)}")
        if latency_ms < 0 or (times is not None and times < 1):
            raise ValueError("latency_ms must be >= 0 and times >= 1")
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if kind == "status" and status == 429 and retry_after is None:
            retry_after = 1
        fault = Fault(
            "flt_" + secrets.token_hex(6),
            path_prefix,
            kind,
            latency_ms,
            status,
            retry_after,
            times,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self.faults.clear()

    def take_faults(self, path: str) -> list[Fault]:
        """The faults that apply to a request for `path`, using up one of each one's times."""
        with self._lock:
            taken: list[Fault] = []
            answered = False  # at most one fault answers (status or drop); latencies add up
            for fault in self.faults:
                if not path.startswith(fault.path_prefix):
                    continue
                if answered and fault.kind != "latency":
                    continue
                answered = answered or fault.kind != "latency"
                taken.append(fault)
            for fault in taken:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
            return taken

    def limit_rate(self, per_second: float | None, burst: int | None = None) -> None:
        """Switch per-key rate limiting on (`per_second` > 0) or off (None)."""
        if per_second is None:
            self.rate_limit = None
            return
        if per_second <= 0 or (burst is not None and burst < 1):
            raise ValueError("requests_per_second must be > 0 and burst >= 1")
        self.rate_limit = RateLimit(per_second, burst or max(1, math.ceil(per_second)))

    def throttled(self, key_id: str) -> float | None:
        """Seconds until the key may call again when over its rate, else None (uses a token)."""
        with self._lock:
            limit = self.rate_limit
            return None if limit is None else limit.take(key_id, time.monotonic())

    def clear_requests(self) -> None:
        """Forget every seen request."""
        self.requests.clear()
