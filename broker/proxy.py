"""The data plane (docs/contract.md): a plain ASGI app that forwards tenant-tagged requests to Pleo.

Per request, five steps: identify the tenant (after the header rules of `broker.headers`:
Host names, browsers, method overrides, Content-Type), take its active record from the
registry, let `broker.policy` decide, send upstream (`broker.upstream`) with the tenant's key,
relay the answer. Pleo's 401 breaks the tenant at once; a 403 triggers one re-introspection per
tenant at a time.

With a callers file (`broker.callers`), the caller its `Proxy-Authorization` names is found
before the tenant, and must be allowed the tenant (step 1) and the route's scope (step 3).
Before sending, `broker.throttle` answers for a tenant that Pleo rate-limited or that has
`BROKER_TENANT_MAX_IN_FLIGHT` calls in flight already; Pleo's 429 starts such a back-off.

The key is taken from the registry at the moment of sending: a tenant disconnected or re-keyed
while its request arrived is refused. Bodies are read, streamed and relayed by `broker.bodies`.

Kept deliberately free of Starlette routing and Request objects: this is the hot path
(docs/performance.md). Header names arrive lower-cased from the ASGI server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback

from prometheus_client import Counter, Histogram
from starlette.types import Receive, Scope, Send

from broker import errors
from broker.bodies import StreamedBody, read_bounded, relay_body
from broker.callers import ANONYMOUS, Caller
from broker.catalog import METHODS
from broker.errors import ScopeNotGranted
from broker.events import emit
from broker.headers import (
    BodyKind,
    HeaderRules,
    HostNames,
    RequestHead,
    forwarded_request_headers,
    forwarded_response_headers,
    named_tenant,
    new_request_id,
)
from broker.metrics import Metrics
from broker.policy import BodyHandling, Decision, Decisions, Policy, check_body
from broker.records import ActiveTenant, TenantRecord, TenantState
from broker.registry import not_active
from broker.runtime import Broker
from broker.throttle import TenantThrottle
from broker.timing import Overhead, Sent
from broker.upstream import map_exceptions
from broker.wire import MAX_READ, Response

UNMATCHED = "unmatched"
JSON_HEADERS = [(b"content-type", b"application/json")]


class ProxyApp:
    """The proxy listener's ASGI application."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.tenants = broker.tenants
        self.registry = broker.tenants.registry  # reads go straight to memory
        self.catalog = broker.catalog
        self.metrics = broker.metrics
        self.upstream = broker.upstream
        settings = broker.settings
        self.rules = HeaderRules(
            settings.tenant_header,
            HostNames(settings.proxy_allowed_hosts, bind=settings.proxy_host),
        )
        self.max_body = settings.max_inspected_body
        self.body_timeout = settings.request_body_timeout
        self.policy = Decisions(Policy(broker.catalog, settings.proxy_allow_control_plane))
        self.counts = ProxyMetrics(broker.metrics)
        self.callers = broker.callers
        self.throttle = TenantThrottle(settings.tenant_max_in_flight, broker.metrics)
        self.timing = Overhead(broker.metrics.overhead)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._refuse_websocket(scope, receive, send)
            return  # lifespan: the broker's parts are opened by `runtime.open_broker`
        began = time.perf_counter()
        head = self.rules.read(scope["headers"])
        route = UNMATCHED
        tenant = None
        try:
            content = self.rules.check(head)
            caller = self._caller(head)
            tenant = self.rules.tenant(head)  # 1. identify the tenant
            if caller is not None and not caller.allows_tenant(tenant):
                raise errors.CallerNotAllowed(
                    f"The caller {caller.name!r} may not use this tenant.", tenant=tenant
                )
            active = self.registry.active(tenant)  # 2. take its active record
            decision = self._decide(scope, active, content)  # 3. decide
            if caller is not None and not caller.allows_scope(decision.route.scope):
                raise _scope_refused(caller, decision, tenant)
            route = decision.route.template
            sent = await self._send(scope, receive, head, active, decision, began)  # 4. send
            status = await self._relay(sent, send, receive, head, active, decision)  # 5.
        except errors.BrokerError as exc:
            status = exc.status
            await self._refuse(send, exc, head, tenant, began)
        except Exception as exc:
            status = 500
            await self._fail(send, exc, head, tenant, began)
        self.counts.count(scope["method"], route, status, head.caller)

    def _caller(self, head: RequestHead) -> Caller | None:
        """The caller the request's Proxy-Authorization names (None: no callers file)."""
        if self.callers is None:
            return None
        caller = self.callers.table.identify(head.proxy_authorization)
        head.caller = caller.name
        return caller

    def _decide(self, scope: Scope, active: ActiveTenant, content: BodyKind | None) -> Decision:
        return self.policy.decide(
            scope["method"],
            scope.get("raw_path") or scope["path"].encode(),
            scope["query_string"],
            company_id=active.company_id,
            scopes=active.scopes,
            content=content,
        )

    async def _send(
        self,
        scope: Scope,
        receive: Receive,
        head: RequestHead,
        active: ActiveTenant,
        decision: Decision,
        began: float,
    ) -> Sent:
        """Send the request to Pleo; the answer holds an upstream slot until `_relay` ends."""
        headers = forwarded_request_headers(
            scope["headers"], tenant_header=self.rules.tenant_header, request_id=head.request_id
        )
        target = decision.path
        if decision.query_string:
            target += "?" + decision.query_string.decode("latin-1")
        self.throttle.enter(active.tenant)  # refused before the body is read
        try:
            body = None  # no coroutine for the (most common) request without a body
            if decision.body is not BodyHandling.NONE:
                body = await self._body(receive, headers, active, decision)
            if not self.upstream.take():
                await self.upstream.acquire(active.tenant)
        except BaseException:
            self.throttle.leave(active.tenant)
            raise
        try:
            # The key is taken now, at the moment of sending, not when the headers arrived.
            headers["Authorization"] = self._still_active(active, decision).authorization
            started = time.perf_counter()
            response = await self.upstream.send(
                scope["method"], target, headers, body, tenant=active.tenant
            )
        except BaseException:
            self._release(active.tenant)
            raise
        return Sent(response, began, time.perf_counter() - started)

    async def _body(
        self, receive: Receive, headers: dict[str, str], active: ActiveTenant, decision: Decision
    ) -> bytes | StreamedBody | None:
        """What to send as the body, as the decision says."""
        if decision.body is BodyHandling.INSPECT_JSON:
            raw = await read_bounded(receive, self.max_body, headers, self.body_timeout)
            body = check_body(decision.route, raw, company_id=active.company_id)
            headers["Content-Length"] = str(len(body))
            return body
        if decision.body is BodyHandling.STREAM:
            return StreamedBody(receive, self.body_timeout)
        return None

    def _still_active(self, admitted: ActiveTenant, decision: Decision) -> ActiveTenant:
        """The tenant now; refused if it changed in a way that matters since the request was
        admitted (disconnected, no longer active, another key or company)."""
        try:
            now = self.registry.active(admitted.tenant)
        except errors.TenantUnknown:
            raise errors.TenantUnknown(
                "This tenant was disconnected while the request was arriving; nothing was sent.",
                tenant=admitted.tenant,
            ) from None
        if now is admitted:
            return now
        if now.key != admitted.key or now.company_id != admitted.company_id:
            raise errors.TenantChanged(tenant=admitted.tenant)
        scope = decision.route.scope
        if scope is not None and scope not in now.scopes:
            raise ScopeNotGranted(
                f"{decision.route.method} {decision.route.template} needs the scope {scope!r},"
                " which this tenant's key was not granted.",
                tenant=admitted.tenant,
                required_scope=scope,
            )
        return now

    async def _relay(
        self,
        sent: Sent,
        send: Send,
        receive: Receive,
        head: RequestHead,
        active: ActiveTenant,
        decision: Decision,
    ) -> int:
        """Relay Pleo's answer (after judging a 401 or 403); frees the upstream slot. What
        only counts (the histograms, the connection back to the pool) comes after the answer
        is written: at one connection, all before it is latency."""
        response = sent.response
        spent = None
        try:
            if response.status == 429:
                self._rate_limited(response, head, active)
            buffered = None
            if response.status in (401, 403):
                buffered = await self._judge(response, head, active)
            headers = forwarded_response_headers(
                response.raw_headers,
                connection=response.connection_header,
                request_id=head.request_id,
            )
            timing, spent = self.timing.proxied(sent)
            headers.append(timing)
            start = {"type": "http.response.start", "status": response.status, "headers": headers}
            await send(start)
            try:
                if buffered is not None:
                    await send({"type": "http.response.body", "body": buffered})
                else:
                    with map_exceptions(active.tenant):
                        await relay_body(response, send, receive)
            except errors.UpstreamError as exc:
                # The answer had started: too late for an error response. Closing the
                # connection without completing it tells the caller the body is cut short.
                emit(
                    "proxy.upstream_aborted",
                    level=logging.WARNING,
                    tenant=active.tenant,
                    caller=head.caller,
                    route=decision.route.template,
                    error_type=type(exc.__cause__).__name__,
                    request_id=head.request_id.decode("latin-1"),
                )
            return response.status
        finally:
            self._finish(sent, active.tenant, decision.route.template, spent)

    def _finish(self, sent: Sent, tenant: str, route: str, spent: float | None) -> None:
        """Close the answer (its connection back to the pool), give back the places `_send`
        took, and count the call: Pleo's wait, and the broker's part if the answer got as far
        as its head."""
        try:
            sent.response.close()
        except BaseException:
            sent.response.connection.abort()  # a failed close leaves no socket open
            raise
        finally:  # even if closing failed: a leaked place would keep the tenant busy
            self._release(tenant)
            self.counts.observe(route, sent.waited)
            if spent is not None:
                self.timing.observe(spent)

    def _release(self, tenant: str) -> None:
        """Give back the upstream slot and the tenant's in-flight place `_send` took."""
        try:
            self.upstream.release()
        finally:
            self.throttle.leave(tenant)

    def _rate_limited(self, response: Response, head: RequestHead, active: ActiveTenant) -> None:
        """Pleo's 429: the tenant's next calls are answered here until its Retry-After."""
        seconds = self.throttle.rate_limited(active.tenant, response.headers.get("Retry-After"))
        emit(
            "proxy.rate_limited",
            level=logging.WARNING,
            tenant=active.tenant,
            retry_after=seconds,
            caller=head.caller,
            request_id=head.request_id.decode("latin-1"),
        )

    async def _judge(
        self, response: Response, head: RequestHead, active: ActiveTenant
    ) -> bytes | None:
        """Pleo's 401 breaks the tenant, its 403 re-checks it; their (small) body, read first."""
        caller = self._event_caller(head)
        if response.status == 401:
            # Decided on the status alone: the body may never arrive.
            now = await self.tenants.key_rejected(active.record, caller=caller)
            if now.state is not TenantState.ACTIVE:
                raise not_active(now)
            # The key was replaced while this call was in flight: the tenant is fine,
            # this one call was made with the old key; the caller may retry.
        elif response.status != 403:
            return None
        with map_exceptions(active.tenant):
            buffered = await response.read(limit=MAX_READ)
        if response.status == 403:
            checked = await self._recheck(active, caller)
            if checked.state is not TenantState.ACTIVE:
                raise not_active(checked)
        return buffered

    def _event_caller(self, head: RequestHead) -> str | None:
        """The caller an event names: only with a callers file (docs/decisions.md)."""
        return head.caller if self.callers is not None else None

    async def _recheck(self, active: ActiveTenant, caller: str | None) -> TenantRecord:
        try:
            return await self.tenants.recheck_after_forbidden(active.tenant, caller=caller)
        except errors.BrokerError as exc:
            emit("tenant.check_failed", level=logging.WARNING, tenant=active.tenant, code=exc.code)
            return active.record

    async def _refuse(
        self,
        send: Send,
        exc: errors.BrokerError,
        head: RequestHead,
        tenant: str | None,
        began: float,
    ) -> None:
        if exc.tenant is None:
            exc.tenant = tenant if tenant is not None else named_tenant(head)
        self.counts.deny(exc, head.caller)
        body = json.dumps(exc.to_body()).encode()
        headers = [*JSON_HEADERS, (b"x-request-id", head.request_id)]
        headers.append((b"content-length", str(len(body)).encode()))
        if isinstance(exc, errors.TenantThrottled):
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        headers.append(self.timing.refused(began))
        if isinstance(exc, errors.RequestTimeout):
            headers.append((b"connection", b"close"))  # the rest of the body is not awaited
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _fail(
        self, send: Send, exc: Exception, head: RequestHead, tenant: str | None, began: float
    ) -> None:
        """A bug: answer JSON, log where, never a traceback to the caller."""
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        emit(
            "proxy.internal_error",
            level=logging.ERROR,
            error_type=type(exc).__name__,
            where=f"{os.path.basename(frame.filename)}:{frame.lineno}",
            caller=head.caller,
            request_id=head.request_id.decode("latin-1"),
        )
        # If the answer had already started, the server closes the connection instead.
        with contextlib.suppress(Exception):
            await self._refuse(send, errors.BrokerError(), head, tenant, began)

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake: a JSON 403 where the server can send one, else a plain close."""
        if (await receive())["type"] != "websocket.connect":
            return  # the caller went away first
        exc = errors.RouteNotAllowed(
            "The broker forwards plain HTTP requests to Pleo, not WebSocket connections."
        )
        self.counts.deny(exc, ANONYMOUS)
        self.counts.count(scope.get("method", "GET"), UNMATCHED, exc.status, ANONYMOUS)
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(exc.to_body()).encode()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        headers.append((b"x-request-id", new_request_id()))
        await send(
            {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})


def _scope_refused(caller: Caller, decision: Decision, tenant: str) -> errors.CallerNotAllowed:
    """A caller with `scopes` on a route outside them (one needing no scope included)."""
    scope = decision.route.scope
    if scope is None:
        return errors.CallerNotAllowed(
            f"The caller {caller.name!r} may use only routes that need one of its scopes;"
            f" {decision.route.method} {decision.route.template} needs none.",
            tenant=tenant,
        )
    return errors.CallerNotAllowed(
        f"The caller {caller.name!r} may not use routes that need the scope {scope!r}.",
        tenant=tenant,
    )


class ProxyMetrics:
    """The proxy's counters and timings, children cached: labels() is too slow for every
    request."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[tuple[str, str, int, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._denials: dict[str, Counter] = {}  # by error code: a fixed set

    def count(self, method: str, route: str, status: int, caller: str) -> None:
        if method not in METHODS:
            method = "OTHER"  # before the cache key too: made-up methods must not grow it
        key = (method, route, status, caller)  # callers: names from the file, bounded by it
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.metrics.proxy_requests.labels(
                method=method, route=route, code=str(status), caller=caller
            )
        child.inc()

    def observe(self, route: str, seconds: float) -> None:
        child = self._durations.get(route)
        if child is None:
            child = self._durations[route] = self.metrics.upstream_duration.labels(route=route)
        child.observe(seconds)

    def deny(self, exc: errors.BrokerError, caller: str) -> None:
        child = self._denials.get(exc.code)
        if child is None:
            child = self._denials[exc.code] = self.metrics.proxy_denials.labels(reason=exc.code)
        child.inc()
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        emit(
            "proxy.refused",
            level=level,
            code=exc.code,
            tenant=exc.tenant,
            status=exc.status,
            caller=caller,
        )


def create_proxy_app(broker: Broker) -> ProxyApp:
    """The proxy listener's ASGI app over an opened broker."""
    return ProxyApp(broker)
