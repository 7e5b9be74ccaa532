"""broker.upstream: the data plane's connection pool and the one translation of its errors.

The table is checked on exception values, then each row that a real socket can produce is
produced with the real client (broker.wire) against an aiohttp server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from starlette.types import Message

from broker import errors, upstream, wire
from broker.proxy import create_proxy_app
from broker.runtime import open_broker
from broker.settings import Settings
from broker.upstream import Upstream, map_exceptions


def _settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "pleo_base_url": url,
        "admin_token": secrets.token_urlsafe(24),
        "store_path": tmp_path / "store",
        "master_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "upstream_connect_timeout": 2.0,
        "upstream_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class FailedBody:
    """A streamed body that failed on the caller's side."""

    def __init__(self, failure: errors.BrokerError | None) -> None:
        self.failure = failure


MAPPING: list[tuple[BaseException, type[errors.BrokerError]]] = [
    (wire.ConnectTimeout(), errors.UpstreamUnreachable),  # nothing sent in time
    (wire.ReadTimeout(), errors.UpstreamTimeout),
    (TimeoutError(), errors.UpstreamTimeout),
    (wire.ServerDisconnected(), errors.UpstreamUnreachable),
    (wire.ConnectError(), errors.UpstreamUnreachable),
    (wire.PayloadError(), errors.UpstreamUnreachable),
    (wire.ProxyUnreachable(), errors.UpstreamUnreachable),
    (wire.ProxyRefused(), errors.UpstreamUnreachable),
    (wire.WireError(), errors.UpstreamUnreachable),
]


@pytest.mark.parametrize(("raised", "expected"), MAPPING)
def test_map_exceptions_translates_the_clients_errors(
    raised: BaseException, expected: type[errors.BrokerError]
) -> None:
    with pytest.raises(expected) as caught, map_exceptions("acme"):
        raise raised
    assert type(caught.value) is expected
    assert caught.value.tenant == "acme"
    assert caught.value.__cause__ is raised


def test_map_exceptions_lets_other_errors_pass() -> None:
    with pytest.raises(ValueError, match="a bug"), map_exceptions("acme"):
        raise ValueError("a bug")
    with pytest.raises(errors.TenantChanged), map_exceptions("acme"):
        raise errors.TenantChanged()
    with map_exceptions("acme"):
        pass


def test_a_failed_streamed_body_wins_over_the_transport_error() -> None:
    failure = errors.RequestTimeout("stalled")
    with pytest.raises(errors.RequestTimeout) as caught, map_exceptions("a", FailedBody(failure)):
        raise wire.ServerDisconnected()
    assert caught.value is failure
    with pytest.raises(errors.UpstreamUnreachable), map_exceptions("a", FailedBody(None)):
        raise wire.ServerDisconnected()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    made: list[Upstream] = []
    runners: list[web.AppRunner] = []

    async def make(handler: Handler | None = None, **overrides: object) -> Upstream:
        if handler is None:
            url = "http://127.0.0.1:" + str(_closed_port())
        else:
            runner, url = await _serve(handler)
            runners.append(runner)
        made.append(Upstream(_settings(tmp_path, url, **overrides)))
        return made[-1]

    yield make
    for one in made:
        await one.close()
    for runner in runners:
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_answer_comes_back_and_no_cookie_is_kept(
    opened: Callable[..., Awaitable[Upstream]],
) -> None:
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("session", "s3cret")
        return response

    pleo = await opened(answer)
    for _ in range(2):
        response = await pleo.send("GET", "/v1/x?a=1", {}, None, tenant="acme")
        assert (response.status, await response.read()) == (200, b"ok")
        response.close()
    assert seen == [None, None]


async def test_nothing_listening_is_upstream_unreachable(
    opened: Callable[..., Awaitable[Upstream]],
) -> None:
    pleo = await opened()
    with pytest.raises(errors.UpstreamUnreachable) as caught:
        await pleo.send("GET", "/", {}, None, tenant="acme")
    assert isinstance(caught.value.__cause__, wire.ConnectError)


async def test_an_egress_proxy_out_of_reach_is_named(
    opened: Callable[..., Awaitable[Upstream]],
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="never reached")

    pleo = await opened(answer, upstream_proxy=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(errors.UpstreamUnreachable) as caught:
        await pleo.send("GET", "/", {}, None, tenant="acme")
    assert "BROKER_UPSTREAM_PROXY" in caught.value.message


async def test_no_answer_in_time_is_upstream_timeout(
    opened: Callable[..., Awaitable[Upstream]],
) -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    pleo = await opened(silent, upstream_timeout=0.2)
    try:
        with pytest.raises(errors.UpstreamTimeout):
            await pleo.send("GET", "/", {}, None, tenant="acme")
    finally:
        release.set()


async def test_a_dropped_connection_is_upstream_unreachable(
    opened: Callable[..., Awaitable[Upstream]],
) -> None:
    async def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    pleo = await opened(drop)
    with pytest.raises(errors.UpstreamUnreachable) as caught:
        await pleo.send("GET", "/", {}, None, tenant="acme")
    assert isinstance(caught.value.__cause__, wire.ServerDisconnected)


async def test_a_full_pool_is_upstream_busy_after_the_pool_timeout(
    opened: Callable[..., Awaitable[Upstream]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "UPSTREAM_CONNECTIONS", 1)
    pleo = await opened(upstream_pool_timeout=0.05)
    await pleo.acquire("acme")
    with pytest.raises(errors.UpstreamBusy) as caught:
        await pleo.acquire("acme")
    assert caught.value.tenant == "acme"
    pleo.release()
    await pleo.acquire("acme")  # free again
    pleo.release()


async def test_a_free_call_is_taken_at_once_and_never_ahead_of_a_waiter(
    opened: Callable[..., Awaitable[Upstream]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`take` (the proxy's way, no coroutine) takes a free call, refuses when none is free
    or when a caller already waits for one (first come, first served), and `release` then
    hands the call to that waiter."""
    monkeypatch.setattr(upstream, "UPSTREAM_CONNECTIONS", 1)
    pleo = await opened(upstream_pool_timeout=5)
    assert pleo.take()
    assert not pleo.take()  # none free
    waiter = asyncio.ensure_future(pleo.acquire("acme"))
    await asyncio.sleep(0)  # it waits now
    pleo.release()  # the one call goes to the waiter ...
    assert not pleo.take()  # ... not to a newcomer
    await asyncio.wait_for(waiter, 5)
    pleo.release()
    assert pleo.take()
    pleo.release()


async def test_close_closes_the_pool(opened: Callable[..., Awaitable[Upstream]]) -> None:
    pleo = await opened()
    await pleo.close()
    assert pleo.pool.closed


async def test_the_one_lifespan_opens_and_closes_the_pool(tmp_path: Path) -> None:
    async with open_broker(_settings(tmp_path, "http://127.0.0.1:9")) as broker:
        pool = broker.upstream.pool
        assert not pool.closed
        app = create_proxy_app(broker)

        async def receive() -> Message:
            raise AssertionError("the proxy has no lifespan of its own")

        async def send(message: Message) -> None:
            raise AssertionError("the proxy has no lifespan of its own")

        await app({"type": "lifespan"}, receive, send)
        assert app.upstream is broker.upstream
    assert pool.closed
