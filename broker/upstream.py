"""The way to Pleo: one pooled aiohttp session for every tenant, and its failures translated.

At most `UPSTREAM_CONNECTIONS` calls are in flight to Pleo; the next waits at most
`BROKER_UPSTREAM_POOL_TIMEOUT` for one (503 `upstream_busy`). aiohttp's exceptions become the
broker's in one place, `map_exceptions`: not connected in time or not at all is 502
`upstream_unreachable`, connected but no answer in time is 504 `upstream_timeout`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol

import aiohttp
from yarl import URL

from broker import errors
from broker.settings import Settings

UPSTREAM_CONNECTIONS = 256  # calls in flight to Pleo at once; the next waits for a free one

_EGRESS_REFUSED = (
    "The egress proxy (BROKER_UPSTREAM_PROXY) refused the call to Pleo; check its address"
    " and credentials."
)
_EGRESS_UNREACHABLE = (
    "The egress proxy (BROKER_UPSTREAM_PROXY) could not be reached; check its address."
)

# First match wins: aiohttp's connect timeout is also a TimeoutError, but nothing was sent;
# the egress proxy's failures are named, since no change at Pleo would fix them. A message of
# None is the broker error's own.
EXCEPTION_MAP: tuple[tuple[type[BaseException], type[errors.UpstreamError], str | None], ...] = (
    (aiohttp.ClientHttpProxyError, errors.UpstreamUnreachable, _EGRESS_REFUSED),
    (aiohttp.ClientProxyConnectionError, errors.UpstreamUnreachable, _EGRESS_UNREACHABLE),
    (aiohttp.ConnectionTimeoutError, errors.UpstreamUnreachable, None),
    (TimeoutError, errors.UpstreamTimeout, None),  # aiohttp.ServerTimeoutError among them
    (aiohttp.ClientError, errors.UpstreamUnreachable, None),
)


class BodySource(Protocol):
    """A request body streamed to Pleo that may fail on the caller's side."""

    failure: errors.BrokerError | None


def map_exceptions(tenant: str, body: BodySource | None = None) -> _ExceptionMap:
    """A context translating aiohttp's exceptions (and timeouts) into `UpstreamError`s for
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
        if exc is None or not isinstance(exc, aiohttp.ClientError | TimeoutError):
            return
        if self.body is not None and self.body.failure is not None:
            raise self.body.failure from None
        for library_error, broker_error, message in EXCEPTION_MAP:
            if isinstance(exc, library_error):
                raise broker_error(message, tenant=self.tenant) from exc


class Upstream:
    """The aiohttp session to Pleo (opened in `runtime.open_broker`) and its in-flight bound."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.pleo_base_url
        self.pool_timeout = settings.upstream_pool_timeout
        self._slots = asyncio.Semaphore(UPSTREAM_CONNECTIONS)
        # `connect` would also count waiting for a pooled connection; only the socket's own
        # connect is bounded here, so a busy pool is not mistaken for an unreachable Pleo. The
        # wait for a free connection is bounded by `_slots` (UPSTREAM_CONNECTIONS), which keeps
        # aiohttp's connector (unlimited) from ever queueing a request.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=settings.upstream_connect_timeout,
            sock_read=settings.upstream_timeout,
        )
        egress = settings.upstream_proxy  # credentials in it: never logged
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
            timeout=timeout,
            auto_decompress=False,
            # One session serves every tenant: a cookie Pleo sets for one must never be
            # replayed on another's call, so the session keeps no cookies at all.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            trust_env=False,
            proxy=egress.get_secret_value() if egress is not None else None,
        )

    async def close(self) -> None:
        await self.session.close()

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
        body: bytes | BodySource | None,
        *,
        tenant: str,
    ) -> aiohttp.ClientResponse:
        """Send one request (`target`: the path and query, as they go on the wire)."""
        stream = body if body is not None and not isinstance(body, bytes) else None
        with map_exceptions(tenant, stream):
            return await self.session.request(
                method,
                URL(self.base_url + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
