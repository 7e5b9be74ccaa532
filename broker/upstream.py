"""The way to Pleo: one pool of keep-alive connections for every tenant (`broker.wire_pool`),
and its failures translated.

At most `UPSTREAM_CONNECTIONS` calls are in flight to Pleo; the next waits at most
`BROKER_UPSTREAM_POOL_TIMEOUT` for one (503 `upstream_busy`). The client's exceptions
(`broker.wire`) become the broker's in one place, `map_exceptions`: not connected in time or
not at all is 502 `upstream_unreachable`, connected but no answer in time is 504
`upstream_timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

from broker import errors, wire
from broker.settings import Settings
from broker.wire import Response
from broker.wire_pool import Pool

UPSTREAM_CONNECTIONS = 256  # calls in flight to Pleo at once; the next waits for a free one

_EGRESS_REFUSED = (
    "The egress proxy (BROKER_UPSTREAM_PROXY) refused the call to Pleo; check its address"
    " and credentials."
)
_EGRESS_UNREACHABLE = (
    "The egress proxy (BROKER_UPSTREAM_PROXY) could not be reached; check its address."
)

# First match wins: the connect timeout is also a TimeoutError, but nothing was sent;
# the egress proxy's failures are named, since no change at Pleo would fix them. A message of
# None is the broker error's own.
EXCEPTION_MAP: tuple[tuple[type[BaseException], type[errors.UpstreamError], str | None], ...] = (
    (wire.ProxyRefused, errors.UpstreamUnreachable, _EGRESS_REFUSED),
    (wire.ProxyUnreachable, errors.UpstreamUnreachable, _EGRESS_UNREACHABLE),
    (wire.ConnectTimeout, errors.UpstreamUnreachable, None),
    (TimeoutError, errors.UpstreamTimeout, None),  # wire.ReadTimeout among them
    (wire.WireError, errors.UpstreamUnreachable, None),
)


class BodySource(Protocol):
    """A request body streamed to Pleo that may fail on the caller's side."""

    failure: errors.BrokerError | None


class StreamedBody(BodySource, Protocol):
    """A `BodySource` read as it arrives (`broker.bodies.StreamedBody`)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...


def map_exceptions(tenant: str, body: BodySource | None = None) -> _ExceptionMap:
    """A context translating the client's exceptions (and timeouts) into `UpstreamError`s for
    `tenant`, by `EXCEPTION_MAP`. If `body` (a streamed request body) failed, its failure is
    raised instead: the caller's body broke the call, not Pleo."""
    return _ExceptionMap(tenant, body)


class _ExceptionMap:
    """`map_exceptions`: a plain class, cheaper than a generator-based context manager."""

    __slots__ = ("body", "tenant")

    def __init__(self, tenant: str, body: BodySource | None = None) -> None:
        self.tenant = tenant
        self.body = body

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, wire.WireError | TimeoutError):
            return
        if self.body is not None and self.body.failure is not None:
            raise self.body.failure from None
        for library_error, broker_error, message in EXCEPTION_MAP:
            if isinstance(exc, library_error):
                raise broker_error(message, tenant=self.tenant) from exc


class Upstream:
    """The pool of connections to Pleo (opened in `runtime.open_broker`) and its in-flight
    bound."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.pleo_base_url
        self.pool_timeout = settings.upstream_pool_timeout
        self._slots = asyncio.Semaphore(UPSTREAM_CONNECTIONS)
        # Only the connect itself (TCP, TLS, the egress proxy's CONNECT) is bounded by the
        # connect timeout, so a busy pool is not mistaken for an unreachable Pleo: the wait for
        # a free call is bounded by `_slots` (UPSTREAM_CONNECTIONS); the pool has no limit.
        # One pool serves every tenant and keeps no cookies: a cookie Pleo sets for one is never
        # replayed on another's call. Answers pass through undecoded.
        egress = settings.upstream_proxy  # credentials in it: never logged
        self.pool = Pool(
            settings.pleo_base_url,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_timeout,
            proxy=egress.get_secret_value() if egress is not None else None,
        )

    async def close(self) -> None:
        await self.pool.close()

    def take(self) -> bool:
        """Take one of the UPSTREAM_CONNECTIONS calls if one is free and nobody waits for one
        (True; `release` gives it back), without a coroutine: the proxy's way on every request,
        `acquire` only when this says no."""
        slots = self._slots
        # asyncio.Semaphore's own state (typed in typeshed): `locked()` builds a generator
        # over the waiters on every call. Never takes a call that `acquire` would wait for.
        if slots._value > 0 and not slots._waiters:
            slots._value -= 1
            return True
        return False

    async def acquire(self, tenant: str) -> None:
        """Take one of the UPSTREAM_CONNECTIONS calls (waiting at most `pool_timeout`);
        `release` gives it back."""
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self.pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise errors.UpstreamBusy(tenant=tenant) from None

    def release(self) -> None:
        self._slots.release()

    async def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | StreamedBody | None,
        *,
        tenant: str,
    ) -> Response:
        """Send one request (`target`: the path and query, as they go on the wire); its answer
        once the head is in."""
        stream = body if body is not None and not isinstance(body, bytes) else None
        with map_exceptions(tenant, stream):
            return await self.pool.request(method, target, headers, body)
