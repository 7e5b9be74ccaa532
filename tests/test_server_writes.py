"""How the listeners write answers, over real sockets: an answer's head goes out with its first
body message in one write, yet never waits for anything the app awaits; streaming, keep-alive
and close work as before."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.raw_http import connect, read_response, read_to_close, read_until
from support.servers import (
    REQUIRED_SCOPES,
    ThreadedLoop,
    broker_settings,
    start_app,
    start_broker,
)
from support.upstream import RecordingUpstream

import broker.protocol
from broker.listening import Limits
from broker.protocol import ListenerProtocol

pytestmark = pytest.mark.real

Writes = list[bytes]


class _CountingTransport:
    """The connection's transport, recording every write."""

    def __init__(self, transport: asyncio.Transport, writes: Writes) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@pytest.fixture
def by_listener(monkeypatch: pytest.MonkeyPatch) -> dict[str, Writes]:
    """Every transport write of the listeners started in the test, in order, by listener."""
    recorded: dict[str, Writes] = {}
    original = broker.protocol.protocol_for

    def counting(listener: str, limits: Limits) -> type[ListenerProtocol]:
        base = original(listener, limits)
        writes = recorded.setdefault(listener, [])

        class Counting(base):  # type: ignore[valid-type,misc]
            def connection_made(self, transport: asyncio.Transport) -> None:
                super().connection_made(_CountingTransport(transport, writes))

        return Counting

    monkeypatch.setattr("broker.server.protocol_for", counting)
    return recorded


@pytest.fixture
def writes(by_listener: dict[str, Writes]) -> Writes:
    """The writes of the apps served with `serve` (the listener named `app`)."""
    return by_listener.setdefault("app", [])


@pytest.fixture
def serve() -> Iterator[Callable[[Any], int]]:
    """Serve an ASGI app on a listener; returns its port."""
    threads: list[ThreadedLoop] = []

    def start(app: Any) -> int:
        url, thread = start_app(app)
        threads.append(thread)
        return int(url.rsplit(":", 1)[1])

    yield start
    for thread in threads:
        thread.stop()


def request(port: int, extra: bytes = b"") -> socket.socket:
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    return sock


BODY = b'{"ok": true}'


async def small_answer(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def test_a_small_answer_goes_out_in_one_write(writes: Writes, serve: Callable[[Any], int]) -> None:
    port = serve(small_answer)
    with request(port) as sock:
        answer = read_until(sock, BODY)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(writes) == 1
    assert writes[0] == answer


def test_keep_alive_answers_each_go_out_in_one_write(
    writes: Writes, serve: Callable[[Any], int]
) -> None:
    port = serve(small_answer)
    with request(port) as sock:
        first = read_until(sock, BODY)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = read_to_close(sock)  # the server closes after the answer
    assert first.count(b"HTTP/1.1 200") == 1
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(BODY)
    assert b"connection: close\r\n" in second
    assert writes == [first, second]


def test_a_streamed_head_is_not_held_while_the_app_waits(
    writes: Writes, serve: Callable[[Any], int]
) -> None:
    """The head goes out before the app's first chunk when the app awaits something between."""
    release = threading.Event()

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.to_thread(release.wait, 5)  # Pleo has not sent its first chunk yet
        for part in (b"one", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    port = serve(streaming)
    with request(port) as sock:
        head = read_until(sock, b"\r\n\r\n")  # arrives while the app is still waiting
        assert b"transfer-encoding: chunked" in head
        release.set()
        rest = read_until(sock, b"0\r\n\r\n", head.partition(b"\r\n\r\n")[2])
    assert rest == b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"
    assert writes[0] == head


def test_an_empty_first_chunk_sends_the_head_at_once(
    writes: Writes, serve: Callable[[Any], int]
) -> None:
    release = threading.Event()

    async def announce_then_wait(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await asyncio.to_thread(release.wait, 5)
        await send({"type": "http.response.body", "body": b"done"})

    port = serve(announce_then_wait)
    with request(port) as sock:
        head = read_until(sock, b"\r\n\r\n")
        release.set()
        rest = read_until(sock, b"0\r\n\r\n", head.partition(b"\r\n\r\n")[2])
    assert rest == b"4\r\ndone\r\n0\r\n\r\n"
    assert writes[0] == head


def test_a_head_without_a_body_goes_out_before_the_close(
    writes: Writes, serve: Callable[[Any], int]
) -> None:
    """An app that starts an answer and returns: the head still goes out, then the close."""

    async def head_only(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    port = serve(head_only)
    with request(port) as sock:
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n")


def test_a_head_answer_goes_out_in_one_write(writes: Writes, serve: Callable[[Any], int]) -> None:
    port = serve(small_answer)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_to_close(sock)
    assert answer.endswith(b"\r\n\r\n") and b"content-length: 12" in answer
    assert writes == [answer]


def test_an_invalid_header_value_is_still_refused(serve: Callable[[Any], int]) -> None:
    async def bad(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"x-bad", b"a\r\nset-cookie: b"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    port = serve(bad)
    with request(port) as sock:
        answer = read_to_close(sock)
    assert answer == b""  # closed: nothing of the answer, and no injected header, is sent


def test_a_proxied_answer_and_a_refusal_each_go_out_in_one_write(
    by_listener: dict[str, Writes], tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    url, thread = start_app(upstream)
    key = "pik_" + secrets.token_hex(20)
    upstream.add_key(key, str(uuid.uuid4()), list(REQUIRED_SCOPES))
    running = start_broker(broker_settings(url, tmp_path / "store"))
    try:
        connected = httpx.put(
            f"{running.admin_url}/v1/tenants/acme/key",
            headers=running.auth,
            json={"api_key": key},
        )
        assert connected.status_code == 200, connected.text
        writes = by_listener["proxy"]
        with socket.create_connection(("127.0.0.1", running.proxy_port), timeout=5) as sock:
            sock.sendall(
                b"GET /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Broker-Tenant: acme\r\n\r\n"
            )
            proxied = read_response(sock)
            sock.sendall(b"GET /v3/export-jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            refused = read_response(sock)
    finally:
        running.thread.stop()
        thread.stop()
    assert proxied.startswith(b"HTTP/1.1 200 OK\r\n") and b"server-timing: broker;dur=" in proxied
    assert refused.startswith(b"HTTP/1.1 400 ") and b"tenant_missing" in refused
    assert writes == [proxied, refused]


SECRET_IN_MESSAGE = "pls_" + "7" * 40


async def raising(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        raise ValueError(SECRET_IN_MESSAGE)


async def silent(scope: Any, receive: Any, send: Any) -> None:
    """Returns without answering."""


@pytest.mark.parametrize(("app", "how"), [(raising, "raised"), (silent, "returned without")])
def test_an_app_that_fails_before_answering_gets_a_500_and_a_log_line_without_its_message(
    serve: Callable[[Any], int], caplog: pytest.LogCaptureFixture, app: Any, how: str
) -> None:
    port = serve(app)
    with request(port) as sock:
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"connection: close\r\n" in answer and answer.endswith(b"Internal Server Error")
    failed = [r for r in caplog.records if getattr(r, "event", None) == "listener.app_failed"]
    assert len(failed) == 1
    fields = failed[0].fields  # type: ignore[attr-defined]
    assert fields["how"].startswith(how) and fields["listener"] == "app"
    assert fields.get("error_type") == ("ValueError" if app is raising else None)
    assert SECRET_IN_MESSAGE not in caplog.text


async def echo_scope(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    seen = {k: scope[k] for k in ("scheme", "client", "server", "asgi", "http_version", "path")}
    body = json.dumps(seen).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def scope_seen(port: int, extra: bytes = b"") -> dict[str, Any]:
    with request(port, extra + b"Connection: close\r\n") as sock:
        answer = read_to_close(sock)
    return dict(json.loads(answer.partition(b"\r\n\r\n")[2]))


def test_the_scope_names_both_ends_of_the_connection(serve: Callable[[Any], int]) -> None:
    port = serve(echo_scope)
    seen = scope_seen(port)
    assert seen["scheme"] == "http" and seen["http_version"] == "1.1" and seen["path"] == "/"
    assert seen["server"] == ["127.0.0.1", port]
    assert seen["client"][0] == "127.0.0.1" and seen["client"][1] > 0
    assert seen["asgi"] == {"version": "3.0", "spec_version": "2.3"}


def test_a_loopback_proxy_tells_the_scheme_and_the_client(serve: Callable[[Any], int]) -> None:
    port = serve(echo_scope)
    seen = scope_seen(
        port, b"X-Forwarded-Proto: https\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n"
    )
    assert seen["scheme"] == "https"
    assert seen["client"] == ["203.0.113.9", 0]
    # anything but http or https is no scheme
    assert scope_seen(port, b"X-Forwarded-Proto: javascript\r\n")["scheme"] == "http"
