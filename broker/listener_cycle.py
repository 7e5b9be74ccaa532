"""One request's answer on a listener connection (`ListenerCycle`): the request's body handed
to the app, the answer's head written together with its first body message, and the 503 a
request the drain's end cancels gets (`answer_shutting_down`). `broker.protocol` parses the
connection and makes one cycle per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import errors
from broker.events import emit
from broker.http1 import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, FlowControl


def _answered(*_: object) -> None:
    """A cycle's `on_response` once its app has returned: nothing left to tell."""


# Statuses whose answers never have a body (RFC 9110 §15: 1xx, 204, 304).
_BODILESS = frozenset((*range(100, 200), 204, 304))

# Response headers whose values change how the answer is framed or the connection ends.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})

_INTERNAL_ERROR = (
    STATUS_LINE[500]
    + b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
    + b"Internal Server Error"
)


class ListenerCycle:
    """One request's answer, writing its head together with its first body message.

    Writing the head when the app sends `http.response.start` and the body when it sends
    `http.response.body` would be two writes (two system calls, and the caller woken twice)
    for an answer whose body was in hand all along. Here the head is held until the first
    body message, or until the event loop next runs anything else: a `call_soon` flushes it,
    so a head is never held while the app waits (for Pleo's first chunk, say). A body message
    with an empty chunk and `more_body` sends the head at once, as an app asks with it; a
    close (the app failing, or returning mid-answer) flushes the head first.

    The head is checked as uvicorn checked it (no control character in a value, no separator
    in a name), in two searches over all names and all values rather than two per header.

    A request the end of the shutdown drain cancels before it answered is answered 503
    `shutting_down` here (an answer already under way is cut short), with no wrapper around
    every listener's app.
    """

    listener: ClassVar[str] = "listener"
    loop: asyncio.AbstractEventLoop
    _held = b""  # the answer's head, not yet written
    _bodiless = False  # a HEAD request's answer, or a 1xx, 204 or 304: nothing after the head
    _flusher: asyncio.Handle | None = None
    _waiter: asyncio.Future[None] | None = None  # `receive` waiting for the connection
    _woken = False  # something for `receive` happened since it last looked

    def __init__(
        self,
        scope: Scope,
        transport: asyncio.Transport,
        flow: FlowControl,
        expect_100_continue: bool,
        keep_alive: bool,
        on_response: Callable[..., None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.on_response = on_response
        # The connection's state
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        # The request's
        self.body = bytearray()
        self.more_body = True
        # The answer's
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0

    def wake(self) -> None:
        """Tell a waiting `receive` that body, the body's end or a disconnect arrived."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> Message:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            if not self._woken:
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            self._woken = False
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message

    async def run_asgi(self, app: ASGIApp) -> None:
        try:
            try:
                result = await app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
            except asyncio.CancelledError:
                # The end of the shutdown drain cancels what still runs; left alone it would
                # end in a traceback and a text 500.
                emit("listener.request_cancelled", level=logging.WARNING, listener=self.listener)
                await answer_shutting_down(self.send)
                result = None
        except BaseException as exc:
            self._failed("raised", error_type=type(exc).__name__)
            if not self.response_started:
                self._internal_error()
            else:
                self._close()
        else:
            self._returned(result)
        finally:
            self.on_response = _answered

    def _returned(self, result: object) -> None:
        if result is not None:
            self._failed("returned a value")
            self._close()
        elif not self.response_started and not self.disconnected:
            self._failed("returned without starting an answer")
            self._internal_error()
        elif not self.response_complete and not self.disconnected:
            self._failed("returned without completing its answer")
            self._close()

    def _failed(self, how: str, **fields: Any) -> None:
        """Log the app's failure: its exception's type, never its message (it may hold data)."""
        emit("listener.app_failed", level=logging.ERROR, listener=self.listener, how=how, **fields)

    def _internal_error(self) -> None:
        """A text 500 and close, for an app that failed before it answered."""
        if not self.disconnected and not self.transport.is_closing():
            self.transport.write(_INTERNAL_ERROR)
            self.transport.close()
        self.response_started = self.response_complete = True

    def _close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        """Write the held head, if any (it goes out alone)."""
        held = self._take_held()
        if held and not self.transport.is_closing():
            self.transport.write(held)

    def _take_held(self) -> bytes:
        held = self._held
        if held:
            self._held = b""
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None
        return held

    async def send(self, message: Message) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self.response_started = True
            if self.waiting_for_100_continue and self.more_body:
                # Answered before the body it asked to send: the client may send it or not
                # (RFC 9110 §10.1.1), so what came next on the connection would be misread.
                self.keep_alive = False
            self.waiting_for_100_continue = False
            self._held = self._head(message["status"], message.get("headers", ()))
            self._flusher = self.loop.call_soon(self.flush)
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent,"
                " after response already completed."
            )

    def _head(self, status: int, headers: Any) -> bytes:
        """The status line and header block (uvicorn's rules); raises RuntimeError if invalid."""
        lines = [STATUS_LINE[status]]
        names = []
        values = []
        close = False
        for name, value in headers:
            names.append(name)
            values.append(value)
            name = name.lower()
            if name in _FRAMING:
                close = self._framing(name, value) or close
            lines.append(b"%s: %s\r\n" % (name, value))
        # A tab is allowed in a value and '-' in a name: joined, they change nothing found.
        if HEADER_RE.search(b"-".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"\t".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not close:
            lines.append(b"connection: close\r\n")
        if self.scope["method"] == "HEAD" or status in _BODILESS:
            # No body follows, whatever Content-Length says (a 304 carries the full
            # answer's): the answer is whole with its head (RFC 9112 §6.3).
            self._bodiless = True
            self.expected_content_length = 0
        elif self.chunked_encoding is None:
            self.chunked_encoding = True
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _framing(self, name: bytes, value: bytes) -> bool:
        """Take Content-Length, Transfer-Encoding or Connection; True if it says close."""
        if name == b"content-length":
            if self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
        elif name == b"transfer-encoding":
            if value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
        elif b"close" in [token.lower().strip() for token in value.split(b",")]:
            self.keep_alive = False
            return True
        return False

    def _body(self, body: bytes, more_body: bool) -> None:
        data = self._framed(body, more_body)
        held = self._take_held()
        if held:
            data = held + data
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                self.transport.close()
            self.on_response(self)

    def _framed(self, body: bytes, more_body: bool) -> bytes:
        """What a body message puts on the wire (uvicorn's rules)."""
        if self._bodiless:
            return b""
        if self.chunked_encoding:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            return data + b"0\r\n\r\n" if not more_body else data
        if len(body) > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= len(body)
        return body


async def answer_shutting_down(send: Send) -> None:
    """503 `shutting_down`, unless the answer had started (then it is cut short)."""
    await answer_refusal(send, errors.ShuttingDown())


async def answer_too_many_pipelined(scope: Scope, receive: Receive, send: Send) -> None:
    """The app of the first request pipelined beyond `Limits.max_pipelined`."""
    await answer_refusal(send, errors.TooManyPipelined())


def refusal(
    error: errors.ListenerRefusal, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and JSON body of a listener's own refusal, which closes the connection
    (`extra`: headers every refusal of the listener carries)."""
    body = json.dumps(error.to_body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        *extra,
    ]
    return headers, body


async def answer_refusal(send: Send, error: errors.ListenerRefusal) -> None:
    """`error` in JSON, closing the connection, unless the answer had started (then it is
    cut short)."""
    headers, body = refusal(error)
    # A response already under way is refused with RuntimeError and writes nothing: the
    # connection closes instead.
    with contextlib.suppress(RuntimeError):
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
