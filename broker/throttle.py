"""Per-tenant traffic protection (docs/contract.md): Pleo's 429 honoured, bursts bounded.

- After Pleo answers a tenant `429` with `Retry-After` (seconds, or an HTTP date), the broker
  answers that tenant's calls itself with `429 upstream_rate_limited` and the remaining
  seconds until the time has passed (at most `MAX_BACKOFF`); other tenants are unaffected. A
  429 without a usable `Retry-After` is relayed and changes nothing; nor does a shorter one
  (`0` included) shorten a back-off already running. Seconds are ASCII digits, a fraction
  allowed (`1.5`, answered rounded up); anything else (`²`, other scripts' digits, `1e3`) is
  unusable.
- At most `BROKER_TENANT_MAX_IN_FLIGHT` requests of one tenant are in flight to Pleo; the
  next gets `429 tenant_busy` at once, so one tenant's burst cannot take the whole pool
  (`broker.upstream`) while the others wait.

Both are a dictionary look-up per request; a tenant that is neither backed off nor in flight
has no entry.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from prometheus_client import Counter

from broker import errors
from broker.metrics import Metrics

MAX_BACKOFF = 3600.0  # seconds: a Retry-After beyond this is taken as this
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` value asks for (delta-seconds or an HTTP date), capped at
    `MAX_BACKOFF`; None if it is missing or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        try:
            seconds = float(text)
        except ValueError:  # not reached for ASCII digits; never a 500 for Pleo's header
            return None
    else:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_BACKOFF)


class TenantThrottle:
    """Back-off deadlines and in-flight counts, per tenant."""

    def __init__(self, max_in_flight: int, metrics: Metrics) -> None:
        self.max_in_flight = max_in_flight
        self._until: dict[str, float] = {}  # tenant → monotonic time its back-off ends
        self._in_flight: dict[str, int] = {}
        self._answered: dict[str, Counter] = {
            reason: metrics.throttled.labels(reason=reason)
            for reason in ("upstream_rate_limited", "tenant_busy")
        }

    def enter(self, tenant: str) -> None:
        """Admit one request of `tenant` towards Pleo (`leave` when it is done), or refuse it."""
        until = self._until.get(tenant)
        if until is not None:
            remaining = until - time.monotonic()
            if remaining > 0:
                self._answered["upstream_rate_limited"].inc()
                raise errors.UpstreamRateLimited(
                    tenant=tenant, retry_after=max(1, math.ceil(remaining))
                )
            del self._until[tenant]
        count = self._in_flight.get(tenant, 0)
        if count >= self.max_in_flight:
            self._answered["tenant_busy"].inc()
            raise errors.TenantBusy(tenant=tenant, retry_after=1)
        self._in_flight[tenant] = count + 1

    def leave(self, tenant: str) -> None:
        count = self._in_flight[tenant] - 1
        if count:
            self._in_flight[tenant] = count
        else:
            del self._in_flight[tenant]

    def rate_limited(self, tenant: str, retry_after: str | None) -> float | None:
        """Pleo answered `tenant` 429: back off for what its `Retry-After` asks (seconds)."""
        seconds = retry_after_seconds(retry_after)
        if seconds:
            until = time.monotonic() + seconds
            self._until[tenant] = max(until, self._until.get(tenant, 0.0))
        return seconds

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)
