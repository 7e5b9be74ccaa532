"""The egress proxy (BROKER_UPSTREAM_PROXY): the data plane and introspection both go through
it, with Proxy-Authorization when the URL carries credentials, which are never shown.

A small forward proxy written here handles absolute-form HTTP requests (Pleo's base URL is the
sandbox's http://127.0.0.1:<port>, so no CONNECT is needed) and records what it forwarded."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox, ThreadedLoop

from broker.events import LOGGER_NAME
from broker.sandbox import SandboxKey
from broker.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.real

REQUIRED = ["export-jobs:read", "export-jobs:write"]
PASSWORD = "pr0xy-S3cret"
HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


@dataclass(frozen=True)
class Forwarded:
    method: str
    target: str
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1: one request per client connection."""

    seen: list[Forwarded] = field(default_factory=list)
    port: int = 0
    required_authorization: str | None = None

    async def serve(self, stop: asyncio.Event, started: Callable[..., None]) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        started()
        async with server:
            await stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines if line)
        ]
        named = {name.lower(): value for name, value in headers}
        self.seen.append(Forwarded(method, target, named.get("proxy-authorization")))
        url = urlsplit(target)
        wanted = self.required_authorization
        if wanted is not None and named.get("proxy-authorization") != wanted:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n\r\n'
            )
            await writer.drain()
            writer.close()
            return
        if url.scheme != "http" or url.hostname != "127.0.0.1":
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        length = int(named.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
        path = url.path + (f"?{url.query}" if url.query else "")
        kept = "".join(f"{n}: {v}\r\n" for n, v in headers if n.lower() not in HOP)
        upstream_writer.write(
            f"{method} {path} HTTP/1.1\r\n{kept}Connection: close\r\n\r\n".encode("latin-1") + body
        )
        await upstream_writer.drain()
        answer = await upstream_reader.read()  # the upstream closes after its answer
        upstream_writer.close()
        writer.write(answer)
        await writer.drain()
        writer.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    thread = ThreadedLoop(proxy.serve)
    try:
        yield proxy
    finally:
        thread.stop()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything logged meanwhile, the broker's events and every library's, at DEBUG."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(LOGGER_NAME), logging.getLogger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield stream
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def _activate_and_call(broker: RunningBroker, sandbox: RunningSandbox) -> SandboxKey:
    key = sandbox.state.create_key(scopes=REQUIRED)
    activated = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
        trust_env=False,
    )
    assert activated.status_code == 200, activated.text
    called = httpx.get(
        f"{broker.proxy_url}/v3/export-jobs",
        headers={"X-Broker-Tenant": "acme", "Proxy-Authorization": "Basic Y2FsbGVyOng="},
        trust_env=False,
    )
    assert called.status_code == 200, called.text
    return key


def test_introspection_and_proxied_calls_go_through_the_egress_proxy_with_credentials(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    forward_proxy: ForwardProxy,
    logs: io.StringIO,
) -> None:
    url = f"http://egress%40corp:{PASSWORD}@127.0.0.1:{forward_proxy.port}"
    broker = make_broker(upstream_proxy=url)
    key = _activate_and_call(broker, sandbox)

    expected = "Basic " + base64.b64encode(f"egress@corp:{PASSWORD}".encode()).decode()
    assert [(f.method, f.target) for f in forward_proxy.seen] == [
        ("GET", f"{sandbox.url}/v1/introspect"),
        ("GET", f"{sandbox.url}/v1/installations/me"),  # the installation's sync
        ("PUT", f"{sandbox.url}/v1/installations/me"),
        ("GET", f"{sandbox.url}/v3/export-jobs?company_id={key.company_id}"),
    ]
    assert all(f.proxy_authorization == expected for f in forward_proxy.seen)
    # Pleo sees neither the broker's proxy credentials nor the caller's.
    for seen in sandbox.state.requests:
        assert seen.header_values("proxy-authorization") == []
        assert seen.authorization_matched
    assert PASSWORD not in repr(broker.settings) + str(broker.settings)
    assert PASSWORD not in logs.getvalue()


def _activation_fails_without_credentials_shown(
    broker: RunningBroker, sandbox: RunningSandbox, logs: io.StringIO
) -> None:
    """Activation answers 503 pleo_unavailable, nothing reaches Pleo, and the proxy's
    password is in neither the answer nor the logs."""
    key = sandbox.state.create_key(scopes=REQUIRED)
    activated = httpx.put(
        f"{broker.admin_url}/v1/tenants/acme/key",
        headers=broker.auth,
        json={"api_key": key.api_key},
        trust_env=False,
    )
    assert activated.status_code == 503, activated.text
    assert activated.json()["error"]["code"] == "pleo_unavailable"
    assert PASSWORD not in activated.text + logs.getvalue()
    assert list(sandbox.state.requests) == []


def test_an_unreachable_egress_proxy_is_pleo_unreachable_and_shows_no_credentials(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, logs: io.StringIO
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    broker = make_broker(upstream_proxy=f"http://user:{PASSWORD}@127.0.0.1:{port}")
    _activation_fails_without_credentials_shown(broker, sandbox, logs)


def test_without_credentials_no_proxy_authorization_is_sent(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    forward_proxy: ForwardProxy,
) -> None:
    broker = make_broker(upstream_proxy=f"http://127.0.0.1:{forward_proxy.port}")
    _activate_and_call(broker, sandbox)
    assert len(forward_proxy.seen) == 4  # introspection, the installation (GET, PUT), the call
    assert all(f.proxy_authorization is None for f in forward_proxy.seen)


def test_an_egress_proxy_refusing_the_credentials_is_pleo_unavailable(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    forward_proxy: ForwardProxy,
    logs: io.StringIO,
) -> None:
    forward_proxy.required_authorization = "Basic " + base64.b64encode(b"u:right").decode()
    broker = make_broker(upstream_proxy=f"http://u:{PASSWORD}@127.0.0.1:{forward_proxy.port}")
    _activation_fails_without_credentials_shown(broker, sandbox, logs)


def test_without_the_setting_nothing_goes_through_a_proxy(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    forward_proxy: ForwardProxy,
) -> None:
    _activate_and_call(make_broker(), sandbox)
    assert forward_proxy.seen == []


@pytest.mark.parametrize(
    "value",
    [
        f"socks5://user:{PASSWORD}@proxy.corp:1080",
        f"proxy.corp:{PASSWORD}",
        f"http://user:{PASSWORD}@proxy.corp:port{PASSWORD}",
        f"http://user:{PASSWORD}@:3128",
        f"http://user:{PASSWORD}@proxy.corp:3128/{PASSWORD}",
    ],
)
def test_a_bad_proxy_url_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(upstream_proxy=value)
    message = str(caught.value)
    assert message.startswith("configuration error: BROKER_UPSTREAM_PROXY: ")
    assert PASSWORD not in message and "proxy.corp" not in message


def test_an_empty_proxy_url_means_none() -> None:
    assert Settings(upstream_proxy=" ").upstream_proxy is None
