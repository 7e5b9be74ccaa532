"""Requests pipelined behind an answer in progress, over real sockets: the queue a connection
may build is bounded, a broken request in the queue does not cut into the answer before it,
a caller gone is told to the request being answered, and requests the answer cannot make
unambiguous (an upgrade with a body, an early answer to `Expect: 100-continue`) close."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.raw_http import connect, read_to_close

from broker.listening import Limits, ListenerState
from broker.protocol import protocol_for

pytestmark = pytest.mark.real

Serve = Callable[..., int]


class Slow:
    """Answers each request after `delay` seconds with its path; counts the apps running."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls.append(scope["path"])
        await asyncio.sleep(self.delay)
        body = scope["path"].encode()
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_a_connection_may_queue_only_so_many_pipelined_requests(serve_app: Serve) -> None:
    """Past the bound the connection answers what it queued, then the first beyond with
    `too_many_pipelined`, and closes; the client sends the rest again on a new connection
    (RFC 9112 §9.3.2). Nothing beyond the bound is kept."""
    app = Slow()
    port = serve_app(app, max_pipelined=4)
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(500))
    with connect(port) as sock:
        sock.sendall(requests)
        answers = read_to_close(sock)
    # the one being answered, then the four queued behind it, then the refusal
    assert answers.count(b"HTTP/1.1 200 OK") == 5
    assert app.calls == ["/0", "/1", "/2", "/3", "/4"]
    refusal = answers.split(b"HTTP/1.1 ")[-1]
    assert refusal.startswith(b"503 ") and b"connection: close\r\n" in refusal
    assert json.loads(refusal.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_many_pipelined"


def test_pipelined_requests_within_the_bound_are_all_answered_in_order(serve_app: Serve) -> None:
    port = serve_app(Slow(), max_pipelined=4)
    with connect(port) as sock:
        sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4)))
        sock.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = read_to_close(sock)
    bodies = [part.rpartition(b"\r\n\r\n")[2] for part in answers.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"/0", b"/1", b"/2", b"/3", b"/last"]


async def streams_slowly(scope: Any, receive: Any, send: Any) -> None:
    """Ten bytes, five now and five a moment later."""
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
    )
    await send({"type": "http.response.body", "body": b"AAAAA", "more_body": True})
    await asyncio.sleep(0.2)
    await send({"type": "http.response.body", "body": b"BBBBB"})


def test_a_broken_body_in_the_queue_does_not_cut_into_the_answer_before_it(
    serve_app: Serve,
) -> None:
    port = serve_app(streams_slowly)
    with connect(port) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).endswith(b"AAAAA")  # the first answer is under way
        sock.sendall(
            b"POST /second HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        rest = read_to_close(sock)
    # the first answer completes untouched; the broken request gets none, and the connection closes
    assert rest == b"BBBBB"


def test_a_caller_gone_is_told_to_the_request_being_answered(serve_app: Serve) -> None:
    seen: dict[str, str] = {}
    done = threading.Event()

    async def waits_for_the_caller(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()  # the (empty) body
        if message.get("more_body") is False:
            message = await asyncio.wait_for(receive(), 5)
        seen[scope["path"]] = message["type"]
        done.set()

    port = serve_app(waits_for_the_caller)
    with connect(port) as sock:
        sock.sendall(
            b"GET /alone HTTP/1.1\r\nHost: x\r\n\r\nGET /queued HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        time.sleep(0.1)  # both parsed: /alone being answered, /queued behind it
    assert done.wait(5)
    assert seen == {"/alone": "http.disconnect"}


def test_an_upgrade_that_carries_a_body_is_refused(serve_app: Serve) -> None:
    app = Slow(0)
    port = serve_app(app)
    body = b'{"key": "x"}\r\n'
    head = (
        b"POST /v1/tenants/acme/key HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with connect(port) as sock:
        sock.sendall(head + body)
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_malformed"
    assert app.calls == []


def test_an_upgrade_without_a_body_is_answered_as_plain_http(serve_app: Serve) -> None:
    app = Slow(0)
    port = serve_app(app)
    with connect(port) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"/ws")
    assert app.calls == ["/ws"]


async def refuses_unread(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


def test_an_early_answer_to_expect_100_continue_closes_the_connection(serve_app: Serve) -> None:
    """The client may send the body or skip it (RFC 9110 §10.1.1): whatever came next on the
    connection would be misread, so there is no next."""
    port = serve_app(refuses_unread)
    with connect(port) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"connection: close\r\n" in answer
    assert b"100 Continue" not in answer


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: Any) -> None:
        raise AssertionError("a connection accepted while stopping writes nothing")


def test_a_connection_accepted_while_the_listener_stops_is_closed() -> None:
    loop = asyncio.new_event_loop()
    try:
        state = ListenerState(Slow())
        state.closing = True
        protocol = protocol_for("app", Limits())(state, loop)
        transport = _Transport()
        protocol.connection_made(transport)
        assert transport.closed
        protocol.connection_lost(None)
        assert state.connections == set()
    finally:
        loop.close()
