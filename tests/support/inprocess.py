"""The in-process layer, as starlette's TestClient and httpx's transports are: no socket, no thread.

- `MemoryStore`: the whole `SecretStore` protocol in memory (compare-and-set, a bounded change
  journal, `read_only`; connect sessions too), with switches for what real stores do badly:
  `down` (unreachable), `full` (reads work, writes fail), `corrupt(tenant)` (a record that
  no longer decrypts).
  Two `MemoryStore`s on one `MemoryBackend` are two replicas sharing a database.
- `FakePleo`: Pleo's `/v1/introspect` and `/v1/installations/me` as an `httpx.MockTransport`
  handler, for the real `PleoClient`.
- Fixtures: `memory_store`, `fake_pleo`, `pleo_client`, `tenant_service`, and the opened
  broker's admin and proxy apps on `httpx.ASGITransport` (`inprocess_admin`, `inprocess_proxy`).

Real sockets stay for what only the wire shows (tests/support/servers.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import json
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.admin import create_admin_app
from broker.connect_sessions import ConnectSession
from broker.delivery import Delivery, Settlement
from broker.errors import StoreConflict, StoreIntegrityError, StoreUnavailable
from broker.metrics import Metrics
from broker.outbox import Event, stamp
from broker.pleo import PleoClient
from broker.proxy import create_proxy_app
from broker.records import ApiKey, TenantRecord
from broker.rules import Requirements
from broker.runtime import Broker, open_broker
from broker.stores import report_unreadable
from broker.stores.journal import Cursor, readable_from, tenants_of
from broker.tenants import TenantService
from support.servers import REQUIRED_SCOPES, broker_settings

PLEO_URL = "https://external.pleo.io"
FULL_DISK = "database or disk is full"


@dataclass
class DeliveryState:
    """One event's delivery state, as the local store's delivery columns hold it."""

    attempts: int = 0
    holder: str | None = None
    until: datetime | None = None  # the lease, or (no holder) the retry time
    outcome: str | None = None  # delivered or given_up: no longer pending


@dataclass
class MemoryBackend:
    """What replicas share: the records, the journal (newest `journal_size` entries)."""

    journal_size: int = 1000
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    records: dict[str, TenantRecord] = field(default_factory=dict)
    journal: list[tuple[int, str]] = field(default_factory=list)
    revision: int = 0
    unreadable: set[str] = field(default_factory=set)
    sessions: dict[str, ConnectSession] = field(default_factory=dict)  # by token hash
    events: list[tuple[int, Event]] = field(default_factory=list)  # the event log, in order
    event_seq: int = 0
    # Webhook delivery state by event id: attempts, holder, lease or retry time, outcome.
    delivery: dict[str, DeliveryState] = field(default_factory=dict)

    def log(self, events: Sequence[Event]) -> None:
        known = {event.id for _, event in self.events}
        for event in events:
            if event.id not in known:
                self.event_seq += 1
                self.events.append((self.event_seq, event))

    def note(self, tenant: str) -> None:
        self.revision += 1
        self.journal.append((self.revision, tenant))
        del self.journal[: -self.journal_size]


class MemoryStore:
    """A `SecretStore` in memory; counts its calls (`calls`, and `read`: the tenants got)."""

    backend = "memory"

    def __init__(self, shared: MemoryBackend | None = None) -> None:
        self.shared = shared if shared is not None else MemoryBackend()
        self.calls: Counter[str] = Counter()
        self.read: builtins.list[str] = []
        self.after_get: Callable[[str], Awaitable[None]] | None = None
        self.before_put: Callable[[str], Awaitable[None]] | None = None  # a slow write
        self.down = False  # every call fails: the store is unreachable
        self.full = False  # reads work, writes fail (a full disk)
        self.read_only_reason: str | None = None  # opened read-only: writes refused
        self.closed = False

    def replica(self) -> MemoryStore:
        """Another store object on the same data (another replica)."""
        return MemoryStore(self.shared)

    def corrupt(self, tenant: str) -> None:
        """Make `tenant`'s record unreadable behind the store's back (no journal entry)."""
        self.shared.unreadable.add(tenant)

    @property
    def read_only(self) -> str | None:
        return self.read_only_reason

    def _call(self, op: str) -> None:
        self.calls[op] += 1
        if self.closed:
            raise StoreUnavailable("the store is closed")
        if self.down:
            raise StoreUnavailable("the store is down")

    def _write(self, op: str) -> None:
        self._call(op)
        if self.read_only_reason is not None:
            raise StoreUnavailable(self.read_only_reason)
        if self.full:
            raise StoreUnavailable(FULL_DISK)

    async def get(self, tenant: str) -> TenantRecord | None:
        self._call("get")
        self.read.append(tenant)
        if tenant in self.shared.unreadable:
            raise StoreIntegrityError(tenant=tenant)
        record = self.shared.records.get(tenant)
        if self.after_get is not None:
            await self.after_get(tenant)
        return record

    async def list(self) -> builtins.list[TenantRecord]:
        self._call("list")
        listed = []
        for tenant, record in sorted(self.shared.records.items()):
            if tenant in self.shared.unreadable:
                report_unreadable(self.backend, tenant, StoreIntegrityError(tenant=tenant))
            else:
                listed.append(record)
        return listed

    async def put(self, record: TenantRecord, *, events: Sequence[Event] = ()) -> TenantRecord:
        self._write("put")
        if self.before_put is not None:
            await self.before_put(record.tenant)
        current = self.shared.records.get(record.tenant)
        if (current.version if current is not None else 0) != record.version:
            raise StoreConflict(tenant=record.tenant)
        stored = record.evolve(version=record.version + 1)
        self.shared.records[record.tenant] = stored
        self.shared.unreadable.discard(record.tenant)
        self.shared.note(record.tenant)
        self.shared.log(events)
        return stored

    async def delete(self, tenant: str, *, events: Sequence[Event] = ()) -> bool:
        self._write("delete")
        existed = self.shared.records.pop(tenant, None) is not None
        self.shared.unreadable.discard(tenant)
        if existed:
            self.shared.note(tenant)
            self.shared.log(events)
        return existed

    async def events_after(
        self, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[builtins.list[Event], str | None]:
        self._call("events")
        if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
            raise ValueError("not a cursor of this store")
        start = int(cursor or 0)
        found = [
            (seq, event)
            for seq, event in self.shared.events
            if seq > start and (tenant is None or event.tenant == tenant)
        ][:limit]
        if not found:
            return [], cursor
        return [event for _, event in found], str(found[-1][0])

    async def prune_events(self, before: datetime) -> int:
        self._write("prune_events")
        cut = stamp(before)
        kept = [(seq, event) for seq, event in self.shared.events if event.timestamp >= cut]
        pruned = len(self.shared.events) - len(kept)
        self.shared.events = kept
        return pruned

    async def claim_deliveries(
        self, holder: str, *, now: datetime, lease: timedelta, limit: int
    ) -> builtins.list[Delivery]:
        self._write("claim_deliveries")
        claimed: builtins.list[Delivery] = []
        seen: set[str] = set()
        for _, event in self.shared.events:
            state = self.shared.delivery.setdefault(event.id, DeliveryState())
            if state.outcome is not None or event.tenant in seen:
                continue
            seen.add(event.tenant)
            if len(claimed) < limit and (state.until is None or state.until <= now):
                state.holder, state.until = holder, now + lease
                claimed.append(Delivery(event, state.attempts))
        return claimed

    async def settle_deliveries(
        self, holder: str, settled: Sequence[Settlement], *, now: datetime
    ) -> builtins.list[str]:
        self._write("settle_deliveries")
        applied: builtins.list[str] = []
        for item in settled:
            state = self.shared.delivery.get(item.event_id)
            if state is None or state.holder != holder or state.outcome is not None:
                continue
            applied.append(item.event_id)
            state.attempts += 1
            state.holder = None
            state.until = item.retry_at
            if item.result != "retried":
                state.outcome = item.result
        return applied

    async def release_deliveries(self, holder: str, *, now: datetime) -> None:
        self._write("release_deliveries")
        for state in self.shared.delivery.values():
            if state.holder == holder and state.outcome is None:
                state.holder, state.until = None, None

    async def pending_deliveries(self) -> int:
        self._call("pending_deliveries")
        states = self.shared.delivery
        return sum(
            1
            for _, event in self.shared.events
            if event.id not in states or states[event.id].outcome is None
        )

    async def changes_since(self, cursor: str | None) -> tuple[str, builtins.list[str] | None]:
        self._call("changes")
        shared = self.shared
        current = Cursor(self.backend, shared.instance, shared.revision)
        oldest = shared.journal[0][0] if shared.journal else shared.revision + 1
        after = readable_from(cursor, current, oldest)
        if after is None:
            return str(current), None
        return str(current), tenants_of(shared.journal, after)

    async def put_session(self, session: ConnectSession) -> ConnectSession:
        self._write("put_session")
        current = self.shared.sessions.get(session.token_hash)
        if (current.version if current is not None else 0) != session.version:
            raise StoreConflict(tenant=session.tenant)
        stored = replace(session, version=session.version + 1)
        self.shared.sessions[session.token_hash] = stored
        return stored

    async def get_session(self, token_hash: str) -> ConnectSession | None:
        self._call("get_session")
        return self.shared.sessions.get(token_hash)

    async def list_sessions(self) -> builtins.list[ConnectSession]:
        self._call("list_sessions")
        return list(self.shared.sessions.values())

    async def delete_session(self, token_hash: str) -> bool:
        self._write("delete_session")
        return self.shared.sessions.pop(token_hash, None) is not None

    async def close(self) -> None:
        self.closed = True


@dataclass
class PleoKey:
    """What the fake Pleo knows about one key."""

    company_id: str | None
    scopes: tuple[str, ...] = REQUIRED_SCOPES
    auth_method: str = "API_KEY"
    client_id: str | None = "integration-client"
    application_name: str | None = "Test integration"
    subject_in_introspection: bool = True  # False: only the installation names the company
    # The key's installation (status, metadata), as Pleo's `/v1/installations/me` keeps it;
    # None: there is none (404) until one is created.
    installation: dict[str, Any] | None = field(
        default_factory=lambda: {"status": "ACTIVATED", "metadata": {}}
    )


class FakePleo:
    """Pleo's control plane for `PleoClient` on `httpx.MockTransport`.

    `failure` makes every call fail: an HTTP status, or an httpx exception class to raise.
    `gate`, when set, holds every introspection until the event is set (single flight).
    """

    def __init__(self) -> None:
        self.keys: dict[str, PleoKey] = {}
        self.calls: Counter[str] = Counter()
        self.failure: int | type[httpx.TransportError] | None = None
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()  # set when an introspection waits at the gate

    def add_key(self, company_id: str | None = None, **details: object) -> ApiKey:
        """A new key Pleo accepts (for a new company unless `company_id` is given)."""
        value = "pik_" + secrets.token_hex(20)
        company = company_id if company_id is not None else str(uuid.uuid4())
        self.keys[value] = PleoKey(company, **details)  # type: ignore[arg-type]
        return ApiKey(value)

    def change(self, key: ApiKey, **details: object) -> None:
        """Change what Pleo says about `key` (its scopes, company, ...)."""
        known = self.keys[key.reveal()]
        for name, value in details.items():
            setattr(known, name, value)

    def revoke(self, key: ApiKey) -> None:
        self.keys.pop(key.reveal(), None)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls[request.url.path] += 1
        if self.gate is not None and request.url.path == "/v1/introspect":
            self.held.set()
            await self.gate.wait()
        if isinstance(self.failure, int):
            return httpx.Response(self.failure, json={"type": "ERROR"})
        if self.failure is not None:
            raise self.failure("the fake Pleo fails", request=request)
        auth = request.headers.get("authorization", "")
        value = _key_of(auth)
        known = self.keys.get(value) if value is not None else None
        if known is None:
            return httpx.Response(401, json={"type": "UNAUTHORIZED", "message": "bad key"})
        urn = f"urn:pleo:company:{known.company_id}" if known.company_id is not None else None
        if request.url.path == "/v1/introspect":
            return httpx.Response(200, json={"data": _introspection(known, urn)})
        if request.url.path == "/v1/installations/me":
            return _installation(known, urn, request)
        return httpx.Response(404, json={"type": "NOT_FOUND"})


def _installation(known: PleoKey, urn: str | None, request: httpx.Request) -> httpx.Response:
    """`/v1/installations/me`: read, create, update or delete the key's installation."""
    if urn is None:
        return httpx.Response(404, json={"type": "NOT_FOUND"})
    if request.method == "POST":
        body = json.loads(request.content or b"{}")
        known.installation = {
            "status": body.get("status", "PENDING_INTEGRATION"),
            "metadata": body.get("metadata") or {},
        }
    if known.installation is None:
        return httpx.Response(404, json={"type": "NOT_FOUND"})
    if request.method == "DELETE":
        known.installation = None
        return httpx.Response(204)
    if request.method == "PUT":
        body = json.loads(request.content)
        known.installation = {
            "status": body["status"],
            "metadata": body.get("metadata", known.installation["metadata"]),
        }
    return httpx.Response(200, content=json.dumps({"resource": urn, **known.installation}).encode())


def _introspection(known: PleoKey, urn: str | None) -> dict[str, object]:
    """What Pleo's `/v1/introspect` says of a known key (optional fields only when set)."""
    data: dict[str, object] = {"authMethod": known.auth_method, "scope": " ".join(known.scopes)}
    if known.client_id is not None:
        data["clientId"] = known.client_id
    if known.application_name is not None:
        data["applicationName"] = known.application_name
    if known.subject_in_introspection and urn is not None:
        data["subjectURN"] = urn
    return data


def _key_of(authorization: str) -> str | None:
    scheme, _, encoded = authorization.partition(" ")
    if scheme != "Basic":
        return None
    try:
        return base64.b64decode(encoded).decode().removesuffix(":")
    except (binascii.Error, UnicodeDecodeError):
        return None


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def memory_store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def fake_pleo() -> FakePleo:
    return FakePleo()


@pytest.fixture
async def pleo_client(fake_pleo: FakePleo) -> AsyncIterator[PleoClient]:
    client = PleoClient(PLEO_URL, transport=fake_pleo.transport())
    yield client
    await client.aclose()


@pytest.fixture
async def tenant_service(memory_store: MemoryStore, pleo_client: PleoClient) -> TenantService:
    """A TenantService on the in-memory store, asking the fake Pleo; its registry loaded
    once, as the broker's lifespan does (no background refresh: tests call `refresh`)."""
    service = TenantService(
        memory_store, pleo_client, Metrics(), requirements=Requirements(REQUIRED_SCOPES)
    )
    assert await service.registry.refresh()
    return service


@pytest.fixture
async def inprocess_broker(
    memory_store: MemoryStore, fake_pleo: FakePleo, tmp_path: Path
) -> AsyncIterator[Broker]:
    """The broker opened in this process on the in-memory store and the fake Pleo."""
    settings = broker_settings(PLEO_URL, tmp_path / "unused", required_scopes=REQUIRED_SCOPES)
    async with open_broker(
        settings, store=memory_store, pleo_transport=fake_pleo.transport()
    ) as broker:
        yield broker


@pytest.fixture
async def inprocess_admin(inprocess_broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API on `httpx.ASGITransport`, with the admin token."""
    token = inprocess_broker.settings.admin_token
    assert token is not None
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(inprocess_broker)),
        base_url="http://admin.test",
        headers={"Authorization": f"Bearer {token.get_secret_value()}"},
    ) as client:
        yield client


@pytest.fixture
async def inprocess_proxy(inprocess_broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy on `httpx.ASGITransport`: for answers given before anything is sent to Pleo
    (the data plane's connection pool is not on the fake)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_proxy_app(inprocess_broker)),
        base_url="http://127.0.0.1",  # a host name the proxy accepts by default
    ) as client:
        yield client


def acme_export_jobs_scope() -> dict[str, object]:
    """The ASGI scope of `GET /v3/export-jobs` for tenant `acme`, to call a `ProxyApp`
    directly."""
    return {
        "type": "http",
        "method": "GET",
        "path": "/v3/export-jobs",
        "raw_path": b"/v3/export-jobs",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"x-broker-tenant", b"acme")],
    }
