"""When the listeners keep a connection and when they close it, over real sockets: a request
answered before its body was read, the rest of that body, a request pipelined behind another,
and answers that have no body whatever their Content-Length says."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support.raw_http import connect, read_until

pytestmark = pytest.mark.real

Serve = Callable[..., int]

REFUSAL = b'{"error": "refused"}'


async def refuse_unread(scope: Any, receive: Any, send: Any) -> None:
    """Answers 403 without reading the request's body (as the proxy refuses)."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(REFUSAL))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": REFUSAL})


class Counting:
    """Reads the whole body and answers `got <bytes>`; `/refuse` answers 403 unread, and
    `/held` waits for `release` first. Records the paths whose app saw the caller gone."""

    def __init__(self) -> None:
        self.disconnected: list[str] = []
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/refuse":
            await refuse_unread(scope, receive, send)
            return
        if scope["path"] == "/held":
            await asyncio.to_thread(self.release.wait, 10)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.append(scope["path"])
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"got %d" % size
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes the connection, which it must within `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s; got {data!r}") from None
    except ConnectionResetError:
        pass
    return data


def kept_for(sock: socket.socket, seconds: float) -> None:
    """The server neither sends anything nor closes the connection for `seconds`."""
    sock.settimeout(seconds)
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        return
    raise AssertionError(f"expected nothing for {seconds} s; got {chunk!r}")


POST_10 = b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


# -- a request answered before its body was read -----------------------------------------------


def test_a_connection_is_closed_once_idle_after_the_body_of_an_early_answer(
    serve_app: Serve,
) -> None:
    """The 403 goes out before the body is read; the body then arrives in time. The
    connection is idle from then on and must close after the idle timeout, not stay open
    (an unauthenticated client could otherwise hold every socket the listener has)."""
    port = serve_app(refuse_unread, idle_timeout=0.3, head_timeout=30)
    with connect(port) as sock:
        sock.sendall(POST_10)
        assert read_until(sock, REFUSAL).startswith(b"HTTP/1.1 403 ")
        sock.sendall(b"0123456789")  # the rest of the body, after the answer
        assert closed_within(sock, 5) == b""


def test_the_request_after_an_early_answers_body_is_served_and_not_cut_off(
    serve_app: Serve,
) -> None:
    """The body's end and the next request in one packet: the next request is served,
    however long its app takes (longer than the idle timeout), then the connection idles."""
    app = Counting()
    port = serve_app(app, idle_timeout=0.3, head_timeout=30)
    with connect(port) as sock:
        sock.sendall(POST_10)
        read_until(sock, REFUSAL)
        sock.sendall(b"0123456789GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        kept_for(sock, 1.0)  # the app is still waiting: the connection is busy, not idle
        app.release.set()
        assert read_until(sock, b"got 0").startswith(b"HTTP/1.1 200 ")
        assert closed_within(sock, 5) == b""  # then idle, and closed
    assert app.disconnected == []


def test_a_body_that_stops_after_an_early_answer_is_closed_after_the_head_timeout(
    serve_app: Serve,
) -> None:
    """The drain bound still holds: a body that never ends does not keep the connection."""
    port = serve_app(refuse_unread, idle_timeout=30, head_timeout=0.3)
    with connect(port) as sock:
        sock.sendall(POST_10)
        read_until(sock, REFUSAL)
        sock.sendall(b"01234")  # half of it, then nothing
        assert closed_within(sock, 5) == b""


# -- pipelined requests ------------------------------------------------------------------------


def test_a_pipelined_request_whose_body_is_still_coming_is_served(serve_app: Serve) -> None:
    """`GET /a` and `POST /b` with half its body in one packet: when /a is answered, /b is
    being served, not refused, so its body may take longer than the head timeout."""
    app = Counting()
    port = serve_app(app, idle_timeout=30, head_timeout=0.3)
    with connect(port) as sock:
        sock.sendall(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab"
        )
        first = read_until(sock, b"got 0")
        kept_for(sock, 1.0)  # more than the head timeout
        sock.sendall(b"cd")
        both = read_until(sock, b"got 4", first)
    assert both.count(b"HTTP/1.1 200 ") == 2
    assert app.disconnected == []


def test_a_pipelined_request_refused_before_its_body_keeps_the_connection(serve_app: Serve) -> None:
    """/refuse, pipelined behind /a, is answered before its body: the body arriving in time
    keeps the connection for the next request (no drain timer left behind for it)."""
    app = Counting()
    port = serve_app(app, idle_timeout=30, head_timeout=0.3)
    with connect(port) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + POST_10 + b"01234")
        answers = read_until(sock, REFUSAL, read_until(sock, b"got 0"))
        sock.sendall(b"56789")  # the rest of the refused request's body, in time
        kept_for(sock, 1.0)  # more than the head timeout
        sock.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_until(sock, b"got 0", answers.partition(REFUSAL)[2])
    assert answers.startswith(b"HTTP/1.1 200 ")


# -- answers without a body ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [204, 304])
def test_a_bodiless_answer_with_a_content_length_keeps_the_connection(
    serve_app: Serve, status: int
) -> None:
    """A 304 carries the Content-Length the full answer would have (RFC 9110 §8.6); a 204
    should not, but one that does is still a whole answer: no body, the connection kept."""

    async def bodiless(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/next":
            await refuse_unread(scope, receive, send)
            return
        headers = [(b"etag", b'"v1"'), (b"content-length", b"1234")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    port = serve_app(bodiless)
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_until(sock, b"\r\n\r\n")
        sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = closed_within(sock, 5)
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length: 1234\r\n" in head and b"transfer-encoding" not in head
    assert (head + rest).partition(b"\r\n\r\n")[2].startswith(b"HTTP/1.1 403 ")
