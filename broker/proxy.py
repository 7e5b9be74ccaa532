"""The data plane (docs/contract.md): a plain ASGI app that forwards tenant-tagged requests to Pleo.

Per request: pick the tenant from its header, refuse what the policy refuses, inject the
tenant's key, forward with one pooled aiohttp session, stream the answer back. Pleo's 401
breaks the tenant at once; a 403 triggers one re-introspection per tenant at a time.

Before the policy, the header rules of `broker.headers` (Host names, browsers, method
overrides, Content-Type). A body to inspect must arrive within `BROKER_REQUEST_BODY_TIMEOUT`; a
streamed body that stalls that long or ends early aborts the upstream request instead of ending
it cleanly. The key is taken from the registry at the moment of sending: a tenant disconnected or
re-keyed while its request arrived is refused. At most `UPSTREAM_CONNECTIONS` calls are in flight
to Pleo; the next waits at most `BROKER_UPSTREAM_POOL_TIMEOUT` for one (503 `upstream_busy`).

Kept deliberately free of Starlette routing and Request objects: this is the hot path
(docs/performance.md). Header names arrive lower-cased from the ASGI server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from yarl import URL

from broker import errors
from broker.errors import ScopeNotGranted
from broker.events import emit
from broker.headers import (
    BROWSER_ONLY,
    INVALID,
    JSON,
    METHOD_OVERRIDE,
    OTHER,
    REROUTING,
    REROUTING_PREFIXES,
    HostNames,
    body_kind,
)
from broker.pleo import basic_auth
from broker.policy import Decision, check_body, decide
from broker.records import TenantRecord, TenantState, valid_tenant_id
from broker.runtime import Broker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_DROP = (
    HOP_BY_HOP
    | REROUTING
    | METHOD_OVERRIDE
    | {b"host", b"authorization", b"cookie", b"x-request-id", b"expect"}
)
RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"x-request-id"}
STREAM_WATCH_THRESHOLD = 64 * 1024
CHUNK = 64 * 1024
UNMATCHED = "unmatched"
JSON_HEADERS = [(b"content-type", b"application/json")]
UPSTREAM_CONNECTIONS = 256  # calls in flight to Pleo at once; the next waits for a free one
# Request headers the first pass looks at (besides the tenant header and its lookalike).
_WATCHED = frozenset(
    {
        b"host",
        b"x-request-id",
        b"content-type",
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        *BROWSER_ONLY,
        *METHOD_OVERRIDE,
    }
)


class ProxyApp:
    """The proxy listener's ASGI application."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.tenants = broker.tenants
        self.registry = broker.tenants.registry  # reads go straight to memory
        self.catalog = broker.catalog
        self.metrics = broker.metrics
        settings = broker.settings
        self.base_url = settings.pleo_base_url
        self.tenant_header = settings.tenant_header.lower().encode("latin-1")
        self.tenant_lookalike = self.tenant_header.replace(b"-", b"_")
        self.max_body = settings.max_inspected_body
        self.body_timeout = settings.request_body_timeout
        self.pool_timeout = settings.upstream_pool_timeout
        self._slots = asyncio.Semaphore(UPSTREAM_CONNECTIONS)
        self.host_names = HostNames(settings.proxy_allowed_hosts, bind=settings.proxy_host)
        # `connect` would also count waiting for a pooled connection; only the socket's own
        # connect is bounded here, so a busy pool is not mistaken for an unreachable Pleo. The
        # wait for a free connection is bounded by `_slots` (UPSTREAM_CONNECTIONS), which keeps
        # aiohttp's connector (unlimited) from ever queueing a request.
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=settings.upstream_connect_timeout,
            sock_read=settings.upstream_timeout,
        )
        self.session: aiohttp.ClientSession | None = None
        self._requests_total = self.metrics.proxy_requests
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    # -- lifespan ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
            egress = self.broker.settings.upstream_proxy  # credentials in it: never logged
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                auto_decompress=False,
                # One session serves every tenant: a cookie Pleo sets for one must never be
                # replayed on another's call, so the session keeps no cookies at all.
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                trust_env=False,
                proxy=egress.get_secret_value() if egress is not None else None,
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            elif scope["type"] == "websocket":
                await self._refuse_websocket(scope, receive, send)
            return
        method: str = scope["method"]
        request_id, tenant, refusal, kind = self._read_headers(scope["headers"])
        route = UNMATCHED
        try:
            if refusal is not None:
                raise refusal
            if isinstance(tenant, errors.BrokerError):
                raise tenant
            record = self._active_record(tenant)
            decision = decide(
                self.catalog,
                method,
                scope.get("raw_path") or scope["path"].encode(),
                scope["query_string"],
                company_id=record.company_id or "",
                scopes=record.scopes,
                allow_control_plane=self.broker.settings.proxy_allow_control_plane,
            )
            route = decision.route.template
            status = await self._forward(scope, receive, send, record, decision, request_id, kind)
        except errors.BrokerError as exc:
            status = exc.status
            await self._refuse(send, exc, request_id, tenant)
        except Exception as exc:  # a bug: answer JSON, log where, never a traceback to the caller
            status = 500
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            emit(
                "proxy.internal_error",
                level=logging.ERROR,
                error_type=type(exc).__name__,
                where=f"{os.path.basename(frame.filename)}:{frame.lineno}",
                request_id=request_id.decode("latin-1"),
            )
            # If the answer had already started, the server closes the connection instead.
            with contextlib.suppress(Exception):
                await self._refuse(send, errors.BrokerError(), request_id, tenant)
        self._count(method, route, status)

    def _read_headers(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, Any, errors.BrokerError | None, str | None]:
        """One pass over the request headers: the request id to use, the tenant id (or the
        error the tenant header earns), the refusal the other headers earn, and the body kind
        (None without a body, else `body_kind`'s)."""
        request_id = b""
        tenant: Any = None
        host: bytes | None = None
        content_type: bytes | None = None
        content_types = 0
        has_body = browser = lookalike = upgrade = False
        override: bytes | None = None
        for name, value in headers:
            if name == self.tenant_header:
                if tenant is not None:
                    tenant = errors.TenantInvalid("Give the tenant header only once.")
                else:
                    tenant = value
            elif name in _WATCHED:
                if name == b"host":
                    host = value if host is None else b""  # twice: matches no name
                elif name == b"x-request-id":
                    request_id = value
                elif name == b"content-type":
                    content_type = value
                    content_types += 1
                elif name == b"transfer-encoding" or name == b"content-length":
                    has_body = has_body or value != b"0"
                elif name in BROWSER_ONLY:
                    browser = True
                elif name == b"upgrade":
                    upgrade = True
                else:
                    override = name
            elif name == self.tenant_lookalike:
                lookalike = True
        if not request_id or len(request_id) > 128 or not request_id.isascii():
            request_id = _new_request_id()
        refusal: errors.BrokerError | None = None
        kind = None
        if not self.host_names.allows(host):
            refusal = errors.HostNotAllowed()
        elif browser:
            refusal = errors.BrowserRequestRefused()
        elif override is not None:
            refusal = errors.RouteNotAllowed(
                f"The broker forwards the request's own method only; send it as that method"
                f" instead of naming one in {override.decode('latin-1').title()}."
            )
        elif upgrade and has_body:
            # The server reads what follows the headers of an upgrade as the new protocol's,
            # not as the body: the body would be lost or misread.
            refusal = errors.RouteNotAllowed(
                "The broker forwards plain HTTP/1.1 requests; send this one without the"
                " Upgrade header."
            )
        elif content_types > 1:
            refusal = errors.ContentTypeInvalid(
                "Content-Type is given more than once; give it once, with one media type."
            )
        else:
            kind = body_kind(content_type)
            if kind is INVALID:
                refusal = errors.ContentTypeInvalid()
            elif not has_body:
                kind = None
        if lookalike:
            tenant = errors.TenantInvalid(
                "The tenant header must be spelled with dashes, not underscores."
            )
        elif tenant is None:
            tenant = errors.TenantMissing(
                f"Name the tenant in the {self.broker.settings.tenant_header} header."
            )
        elif isinstance(tenant, bytes):
            text = tenant.decode("latin-1")
            tenant = text if valid_tenant_id(text) else errors.TenantInvalid(tenant=text[:80])
        return request_id, tenant, refusal, kind

    def _active_record(self, tenant: str) -> TenantRecord:
        record = self.registry.get(tenant)
        if record is None:
            if not self.registry.loaded:
                raise errors.StoreUnavailable(
                    "No tenant records could be loaded from the key store yet.", tenant=tenant
                )
            raise errors.TenantUnknown(tenant=tenant)
        if record.state is not TenantState.ACTIVE:
            raise _not_active(record)
        return record

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: TenantRecord,
        decision: Decision,
        request_id: bytes,
        kind: str | None,
    ) -> int:
        headers = self._upstream_headers(scope["headers"], request_id)
        body: Any = None
        stream: _RequestBody | None = None
        if decision.inspect_body or kind is JSON:
            raw = await _read_bounded(receive, self.max_body, headers, self.body_timeout)
            body = check_body(decision.route, raw, company_id=record.company_id or "")
            headers["Content-Length"] = str(len(body))
        elif kind is OTHER:
            body = stream = _RequestBody(receive, self.body_timeout)
        await self._take_slot(record.tenant)
        try:
            # The key is taken now, at the moment of sending, not when the headers arrived.
            record = self._current_record(record, decision)
            assert record.api_key is not None
            headers["Authorization"] = basic_auth(record.api_key)
            return await self._send(
                scope, receive, send, record, decision, request_id, headers, body, stream
            )
        finally:
            self._slots.release()

    async def _take_slot(self, tenant: str) -> None:
        """Wait (at most `pool_timeout`) for one of the UPSTREAM_CONNECTIONS calls to Pleo."""
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self.pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise errors.UpstreamBusy(tenant=tenant) from None

    def _current_record(self, admitted: TenantRecord, decision: Decision) -> TenantRecord:
        """The tenant's record now; refused if it changed in a way that matters since the
        request was admitted (disconnected, no longer active, another key or company)."""
        record = self.registry.get(admitted.tenant)
        if record is admitted:
            return record
        if record is None:
            raise errors.TenantUnknown(
                "This tenant was disconnected while the request was arriving; nothing was sent.",
                tenant=admitted.tenant,
            )
        if record.state is not TenantState.ACTIVE:
            raise _not_active(record)
        if record.api_key != admitted.api_key or record.company_id != admitted.company_id:
            raise errors.TenantChanged(tenant=admitted.tenant)
        scope = decision.route.scope
        if scope is not None and scope not in record.scopes:
            raise ScopeNotGranted(
                f"{decision.route.method} {decision.route.template} needs the scope {scope!r},"
                " which this tenant's key was not granted.",
                tenant=admitted.tenant,
                required_scope=scope,
            )
        return record

    async def _send(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: TenantRecord,
        decision: Decision,
        request_id: bytes,
        headers: dict[str, str],
        body: Any,
        stream: _RequestBody | None,
    ) -> int:
        if self.session is None:
            await self.open()
        assert self.session is not None
        target = self.base_url + decision.path
        if decision.query_string:
            target += "?" + decision.query_string.decode("latin-1")
        started = time.perf_counter()
        try:
            response = await self.session.request(
                scope["method"],
                URL(target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if stream is not None and stream.failure is not None:
                raise stream.failure from None  # the caller's body failed, not Pleo
            raise _upstream_error(exc, record.tenant) from exc
        self._observe(decision.route.template, time.perf_counter() - started)
        try:
            buffered = None
            if response.status == 401:
                # Decided on the status alone: the body may never arrive.
                now = await self.tenants.key_rejected(record)
                if now.state is not TenantState.ACTIVE:
                    raise _not_active(now)
                # The key was replaced while this call was in flight: the tenant is fine,
                # this one call was made with the old key; the caller may retry.
                buffered = await _read_error_body(response, record.tenant)
            elif response.status == 403:
                buffered = await _read_error_body(response, record.tenant)
                checked = await self._recheck(record)
                if checked.state is not TenantState.ACTIVE:
                    raise _not_active(checked)
            try:
                await self._relay(response, send, receive, request_id, buffered)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The answer had started: too late for an error response. Closing the
                # connection without completing it tells the caller the body is cut short.
                emit(
                    "proxy.upstream_aborted",
                    level=logging.WARNING,
                    tenant=record.tenant,
                    route=decision.route.template,
                    error_type=type(exc).__name__,
                    request_id=request_id.decode("latin-1"),
                )
            return response.status
        finally:
            response.close()

    async def _recheck(self, record: TenantRecord) -> TenantRecord:
        try:
            return await self.tenants.recheck_after_forbidden(record.tenant)
        except errors.BrokerError as exc:
            emit("tenant.check_failed", level=logging.WARNING, tenant=record.tenant, code=exc.code)
            return record

    def _upstream_headers(
        self, headers: list[tuple[bytes, bytes]], request_id: bytes
    ) -> dict[str, str]:
        """The caller's headers less credentials, hop-by-hop and rerouting ones (the key is
        added at the moment of sending)."""
        named_in_connection: set[bytes] = set()
        for name, value in headers:
            if name == b"connection":
                named_in_connection.update(t.strip().lower() for t in value.split(b","))
        out: dict[str, str] = {}
        tenant_header = self.tenant_header
        for name, value in headers:
            if (
                name in REQUEST_DROP
                or name == tenant_header
                or name in named_in_connection
                or name.startswith(REROUTING_PREFIXES)
            ):
                continue
            key = name.decode("latin-1")
            if key in out:  # repeated header: join as HTTP allows
                out[key] += ", " + value.decode("latin-1")
            else:
                out[key] = value.decode("latin-1")
        out["X-Request-Id"] = request_id.decode("latin-1")
        return out

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        receive: Receive,
        request_id: bytes,
        buffered: bytes | None = None,
    ) -> None:
        drop = RESPONSE_DROP
        connection = response.headers.get("Connection")
        if connection:  # headers Pleo names in Connection are hop-by-hop too
            drop = drop | {t.strip().lower().encode("latin-1") for t in connection.split(",")}
        headers = [
            (name, value) for name, value in response.raw_headers if name.lower() not in drop
        ]
        headers.append((b"x-request-id", request_id))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if buffered is not None:
            await send({"type": "http.response.body", "body": buffered})
            return
        length = response.content_length
        if length is not None and length <= STREAM_WATCH_THRESHOLD:
            await send({"type": "http.response.body", "body": await response.read()})
            return
        # A long answer: stop reading from Pleo as soon as the caller goes away.
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                if gone.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()

    async def _refuse(
        self, send: Send, exc: errors.BrokerError, request_id: bytes, tenant: Any
    ) -> None:
        if exc.tenant is None and isinstance(tenant, str):
            exc.tenant = tenant
        self._deny(exc)
        body = json.dumps(exc.to_body()).encode()
        headers = [*JSON_HEADERS, (b"x-request-id", request_id)]
        headers.append((b"content-length", str(len(body)).encode()))
        if isinstance(exc, errors.RequestTimeout):
            headers.append((b"connection", b"close"))  # the rest of the body is not awaited
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake: a JSON 403 where the server can send one, else a plain close."""
        if (await receive())["type"] != "websocket.connect":
            return  # the caller went away first
        exc = errors.RouteNotAllowed(
            "The broker forwards plain HTTP requests to Pleo, not WebSocket connections."
        )
        self._deny(exc)
        self._count(scope.get("method", "GET"), UNMATCHED, exc.status)
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(exc.to_body()).encode()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        headers.append((b"x-request-id", _new_request_id()))
        await send(
            {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})

    # -- metrics (children cached: labels() is too slow for every request) ---------------

    def _count(self, method: str, route: str, status: int) -> None:
        if method not in _KNOWN_METHODS:
            method = "OTHER"  # before the cache key too: made-up methods must not grow it
        key = (method, route, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._requests_total.labels(
                method=method, route=route, code=str(status)
            )
        child.inc()

    def _observe(self, route: str, seconds: float) -> None:
        child = self._durations.get(route)
        if child is None:
            child = self._durations[route] = self.metrics.upstream_duration.labels(route=route)
        child.observe(seconds)

    def _deny(self, exc: errors.BrokerError) -> None:
        self.metrics.proxy_denials.labels(reason=exc.code).inc()
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        emit("proxy.refused", level=level, code=exc.code, tenant=exc.tenant, status=exc.status)


_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _new_request_id() -> bytes:
    """A random UUID4 as 32 hex digits: what `uuid.uuid4().hex` gives, at a third of its cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex().encode()


def _upstream_error(exc: BaseException, tenant: str) -> errors.UpstreamError:
    """Pleo could not be reached (502), or reached but did not answer in time (504)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.UpstreamUnreachable(tenant=tenant)  # not even connected in time
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return errors.UpstreamTimeout(tenant=tenant)
    return errors.UpstreamUnreachable(tenant=tenant)


async def _read_error_body(response: aiohttp.ClientResponse, tenant: str) -> bytes:
    """The (small) body of Pleo's 401/403, read before answering; failures map to 502/504."""
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _upstream_error(exc, tenant) from exc


def _not_active(record: TenantRecord) -> errors.TenantNotActive:
    message = record.message or "This tenant has not been connected with a working key yet."
    return errors.TenantNotActive(
        message,
        tenant=record.tenant,
        state=record.state.value,
        reason=record.reason.value if record.reason is not None else None,
        since=record.view()["updated_at"],
    )


async def _read_bounded(
    receive: Receive, limit: int, headers: dict[str, str], seconds: float
) -> bytes:
    declared = headers.pop("content-length", None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.BodyTooLarge(
            f"The JSON body is {declared} bytes; the broker inspects at most {limit}.", limit=limit
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise errors.BodyInvalid("The caller went away before sending the whole body.")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise errors.BodyTooLarge(
                        f"The JSON body is over the {limit} bytes the broker inspects.", limit=limit
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise _body_timeout(seconds) from None


def _body_timeout(timeout: float, *, streamed: bool = False) -> errors.RequestTimeout:
    if streamed:
        return errors.RequestTimeout(
            f"The request body stalled for {timeout:g} seconds (BROKER_REQUEST_BODY_TIMEOUT);"
            " the call to Pleo was aborted. Send the body without pauses."
        )
    return errors.RequestTimeout(
        f"The request body did not arrive within {timeout:g} seconds"
        " (BROKER_REQUEST_BODY_TIMEOUT); nothing was sent to Pleo."
    )


async def _disconnected(receive: Receive) -> None:
    """Returns once the caller has gone away (request body messages are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _RequestBody:
    """A caller's body streamed to Pleo. If it stalls for `timeout` seconds or the caller goes
    away before its end, iteration raises, so aiohttp aborts the upstream request rather than
    ending it as if the body were complete; `failure` then says what happened."""

    __slots__ = ("failure", "receive", "timeout")

    def __init__(self, receive: Receive, timeout: float) -> None:
        self.receive = receive
        self.timeout = timeout
        self.failure: errors.BrokerError | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    message = await self.receive()
            except TimeoutError:
                self.failure = _body_timeout(self.timeout, streamed=True)
                raise self.failure from None
            if message["type"] == "http.disconnect":
                self.failure = errors.BodyInvalid(
                    "The caller went away before sending the whole body; the call to Pleo was"
                    " aborted."
                )
                raise self.failure
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def create_proxy_app(broker: Broker) -> ProxyApp:
    """The proxy listener's ASGI app over an opened broker."""
    return ProxyApp(broker)
