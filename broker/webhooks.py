"""Webhooks (docs/contract.md, "Webhooks"): every event, signed, at least once, in order per tenant.

A background task, started by the broker's lifespan only when `BROKER_WEBHOOK_URL` is set,
claims the due events from the store (`SecretStore.claim_deliveries`: each tenant's oldest
event not delivered or given up, leased to this process), POSTs each to the receiver with
its own HTTP client and a total timeout, and settles them in the store: a 2xx delivers;
anything else (a status, a timeout, a connection error) schedules a retry after the next
interval of `BROKER_WEBHOOK_RETRY_SCHEDULE` (±10 % jitter); after the last retry the event is
given up, `webhook.failed` is logged and the tenant's next event goes on. Nothing here runs
on a listener's request path: a slow or failing receiver costs the proxy and the admin API
nothing.

Signing follows the Standard Webhooks specification: `webhook-id` is the event id,
`webhook-timestamp` the Unix time of the attempt, and `webhook-signature` is `v1,` and the
base64 HMAC-SHA256, keyed with the decoded `whsec_` secret, of `{id}.{timestamp}.{body}`.
The body is the event as the feed serves it; a `tenant.broken` event also carries
`data.reconnect_url` when the connect page is configured and the tenant is still broken at
the attempt (a connect session made at its first attempt and reused by its retries in this
process while it has an hour left: its token is kept only in memory, so it cannot be in the
feed). Neither the secret nor the receiver's URL (it may hold credentials) is logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.connect_sessions import MAX_TTL, ConnectSessions
from broker.delivery import Delivery, Settlement
from broker.events import emit
from broker.metrics import Metrics
from broker.outbox import Event
from broker.records import TenantState
from broker.settings import Settings
from broker.stores import SecretStore

if TYPE_CHECKING:
    import httpx

BATCH = 20  # events sent at once (each to another tenant)
POLL_SECONDS = 1.0  # how often an idle deliverer looks for due events
STORE_BACKOFF_MAX = 60.0  # seconds between tries at most while the store keeps failing
PENDING_SECONDS = 5.0  # how often an idle deliverer recounts the pending events
JITTER = 0.1  # a retry interval is stretched or shrunk by up to this fraction
LEASE_MARGIN = 1.0  # seconds a lease outlasts two attempts' timeouts
USER_AGENT = "pleo-key-broker-webhooks"
LINK_REUSE_MARGIN = 3600.0  # seconds a reused reconnect link must still be valid, at least
LINKS_KEPT = 1000  # reconnect links remembered for retries of their event, at most


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of the Standard Webhooks specification."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(key: bytes, message_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers of one attempt."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, message_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def retry_delay(
    schedule: Sequence[float], failed: int, rng: random.Random | None = None
) -> float | None:
    """Seconds until the next attempt after `failed` failed ones; None: give up."""
    if failed > len(schedule):
        return None
    jitter = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return schedule[failed - 1] * jitter


class Reconnect:
    """Makes a `tenant.broken` event's `reconnect_url` at delivery (connect page configured)."""

    def __init__(self, store: SecretStore, sessions: ConnectSessions) -> None:
        self.store = store
        self.sessions = sessions
        # event id: (link, monotonic time it expires); in memory only, never stored.
        self._links: dict[str, tuple[str, float]] = {}

    async def url(self, tenant: str, event_id: str | None = None) -> str | None:
        """A connect link for `tenant` if it is still broken, else None: the link made for
        `event_id` by an earlier attempt while it has `LINK_REUSE_MARGIN` left, else a new one."""
        if self.sessions.public_url is None:
            return None
        record = await self.store.get(tenant)
        if record is None or record.state is not TenantState.BROKEN:
            return None
        made = self._links.get(event_id) if event_id is not None else None
        if made is not None and made[1] - time.monotonic() > LINK_REUSE_MARGIN:
            return made[0]
        url = (await self.sessions.create(tenant, ttl_seconds=MAX_TTL)).url
        if event_id is not None:
            self._links.pop(event_id, None)
            self._links[event_id] = (url, time.monotonic() + MAX_TTL)
            while len(self._links) > LINKS_KEPT:
                del self._links[next(iter(self._links))]  # the oldest
        return url


class Webhooks:
    """The background deliverer of one process (one lease holder)."""

    def __init__(
        self,
        settings: Settings,
        store: SecretStore,
        metrics: Metrics,
        *,
        reconnect: Reconnect | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        key = settings.webhook_key()
        if settings.webhook_url is None or key is None:
            raise ValueError("webhooks need BROKER_WEBHOOK_URL and BROKER_WEBHOOK_SECRET")
        self.url = settings.webhook_url
        self._key = key
        self.store = store
        self.metrics = metrics
        self.reconnect = reconnect
        self.timeout = settings.webhook_timeout
        self.schedule = settings.webhook_retry_schedule
        self.lease = timedelta(seconds=2 * self.timeout + LEASE_MARGIN)
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._sleep = sleep
        self._transport = transport
        self._client: httpx.AsyncClient | None = None  # made at the first attempt
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_round = False  # claiming, sending or settling a batch
        self._soonest_retry = math.inf  # monotonic time of this process's next retry
        self._counted_at = -math.inf  # monotonic time the pending events were last counted

    def start(self) -> None:
        """Start delivering in the background."""
        if self._runner is None:
            self._stopping = False
            self._runner = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop delivering: the batch in flight finishes (within the lease) and is settled,
        then the lease is given back, so another process goes on at once. An attempt cut
        short (past the lease) is sent again once its lease runs out."""
        if self._runner is not None:
            self._stopping = True
            if not self._in_round:
                self._runner.cancel()  # idle: nothing to finish
            await asyncio.wait({self._runner}, timeout=self.lease.total_seconds())
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
            try:
                async with asyncio.timeout(self.timeout):
                    await self.store.release_deliveries(self.holder, now=_now())
            except Exception as exc:  # the lease runs out by itself
                emit("webhook.release_failed", level=logging.WARNING, error=type(exc).__name__)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, made (and httpx imported) at the first attempt, not at start."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                trust_env=False,
                transport=self._transport,
            )
        return self._client

    async def _run(self) -> None:
        failures = 0  # store failures in a row
        while not self._stopping:
            self._in_round = True
            try:
                busy = await self.deliver_once()
            except Exception as exc:  # the store failed: try again later, never stop
                failures += 1
                wait = self._store_failed(exc, failures)
            else:
                if failures:
                    emit("webhook.store_recovered", failures=failures)
                    failures = 0
                wait = 0.0 if busy else self._idle_for()
            finally:
                self._in_round = False
            if wait and not self._stopping:
                await self._sleep(wait)

    def _store_failed(self, exc: Exception, failures: int) -> float:
        """Log a failing store once, when it starts; how long to wait before trying again."""
        if failures == 1:
            message = exc.message if isinstance(exc, errors.BrokerError) else type(exc).__name__
            emit("webhook.store_failed", level=logging.WARNING, error=message)
        return min(STORE_BACKOFF_MAX, POLL_SECONDS * 2.0 ** min(failures - 1, 16))

    def _idle_for(self) -> float:
        """How long to wait before looking again: a poll, or less if a retry is due sooner."""
        wait = min(POLL_SECONDS, max(0.0, self._soonest_retry - time.monotonic()))
        if self._soonest_retry <= time.monotonic() + wait:
            self._soonest_retry = math.inf
        return wait

    async def deliver_once(self) -> bool:
        """Claim the due events, send them, settle them; whether there were any."""
        batch = await self.store.claim_deliveries(
            self.holder, now=_now(), lease=self.lease, limit=BATCH
        )
        if batch:
            settled = await asyncio.gather(*(self._attempt(item) for item in batch))
            applied = set(await self.store.settle_deliveries(self.holder, settled, now=_now()))
            for item, outcome in zip(batch, settled, strict=True):
                if outcome.event_id not in applied:
                    continue  # the lease had passed on: another replica settles it
                self.metrics.webhook_deliveries.labels(result=outcome.result).inc()
                if outcome.result == "given_up":
                    emit(
                        "webhook.failed",
                        level=logging.ERROR,
                        event_id=item.event.id,
                        type=item.event.type,
                        tenant=item.event.tenant,
                        attempts=item.attempts + 1,
                        reason=outcome.reason,
                    )
        if batch or time.monotonic() - self._counted_at >= PENDING_SECONDS:
            self.metrics.webhook_pending.set(await self.store.pending_deliveries())
            self._counted_at = time.monotonic()
        return bool(batch)

    async def _attempt(self, delivery: Delivery) -> Settlement:
        event = delivery.event
        failure = await self._send(event)
        if failure is None:
            emit("webhook.delivered", event_id=event.id, type=event.type, tenant=event.tenant)
            return Settlement(event.id, "delivered")
        failed = delivery.attempts + 1
        delay = retry_delay(self.schedule, failed)
        if delay is None:
            return Settlement(event.id, "given_up", reason=failure)
        self._soonest_retry = min(self._soonest_retry, time.monotonic() + delay)
        emit(
            "webhook.retry_scheduled",
            level=logging.WARNING,
            event_id=event.id,
            type=event.type,
            tenant=event.tenant,
            attempts=failed,
            reason=failure,
            retry_in=round(delay, 3),
        )
        return Settlement(event.id, "retried", _now() + timedelta(seconds=delay), failure)

    async def _send(self, event: Event) -> str | None:
        """POST the event once; None if the receiver took it, else why not."""
        try:
            async with asyncio.timeout(self.timeout):  # the body (its link) counts too
                body = json.dumps(await self._body(event), separators=(",", ":")).encode()
                headers = signed_headers(self._key, event.id, body, int(time.time()))
                client = self._http()
                request = client.build_request("POST", self.url, content=body)
                request.headers.update(headers)
                response = await client.send(request, stream=True)
                await response.aclose()  # the receiver's answer is not read, only its status
        except TimeoutError:
            return f"no answer within {self.timeout:g} seconds"
        except Exception as exc:  # any failure fails this attempt only (never its message:
            return type(exc).__name__  # it may quote the receiver's URL)
        if 200 <= response.status_code < 300:
            return None
        return f"status {response.status_code}"

    async def _body(self, event: Event) -> dict[str, Any]:
        body = event.body()
        if event.type != "tenant.broken" or self.reconnect is None:
            return body
        try:
            url = await self.reconnect.url(event.tenant, event.id)
        except errors.BrokerError as exc:  # sent without a link rather than not at all
            emit(
                "webhook.reconnect_link_failed",
                level=logging.WARNING,
                event_id=event.id,
                tenant=event.tenant,
                error=exc.message,
            )
            return body
        if url is not None:
            body["data"] = {**body["data"], "reconnect_url": url}
        return body


@contextlib.asynccontextmanager
async def webhooks(
    settings: Settings, store: SecretStore, metrics: Metrics, sessions: ConnectSessions
) -> AsyncIterator[Webhooks | None]:
    """The deliverer, running while the context is open; None when no URL is configured
    or the store takes no writes (delivery state is written to it)."""
    if settings.webhook_url is None:
        yield None
        return
    if store.read_only is not None:
        emit("webhook.disabled", level=logging.WARNING, reason=store.read_only)
        yield None
        return
    deliverer = Webhooks(settings, store, metrics, reconnect=Reconnect(store, sessions))
    deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop()


def _now() -> datetime:
    return datetime.now(UTC)
