"""One HTTP/1.1 connection to Pleo and the answer read from it: the data plane's own client.

An asyncio protocol with httptools' response parser, in place of aiohttp (docs/decisions.md):
the request goes out in one write where it can; the answer's head is parsed into a `Response`
whose body is read by `Content-Length`, chunked, or until the server closes (cleanly: a reset
is `ServerDisconnected`). Reading pauses while more than `HIGH_WATER` bytes wait for a slow
caller. Every wait for the server (each body read, a write's drain) is bounded by the read
timeout: no byte in that time is `ReadTimeout`; the answer's head must be whole within one
read timeout of the request's end (a head trickled a byte at a time is cut off too) and
within `MAX_ANSWER_HEAD` bytes. `broker.wire_pool` connects, pools and retries; `broker.upstream`
translates the errors below.

    WireError
    ├── ConnectError (not connected: refused, TLS, …)
    │   ├── ConnectTimeout (also a TimeoutError)
    │   ├── ProxyUnreachable
    │   └── ProxyRefused (407, or a CONNECT refused)
    ├── ServerDisconnected (closed before the answer was complete)
    ├── PayloadError (an answer that does not parse)
    └── ReadTimeout (also a TimeoutError)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

import httptools

HIGH_WATER = 256 * 1024  # answer bytes held for the caller before reading pauses
LOW_WATER = 64 * 1024
MAX_ANSWER_HEAD = 64 * 1024  # bytes of an answer's head (interim answers too) at most
MAX_READ = 1024 * 1024  # an answer read whole to be looked at (a 401, 403, a Vault secret)


class WireError(Exception):
    """Root of the client's errors."""


class ConnectError(WireError):
    """No connection to Pleo (nothing was sent)."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Not connected within the connect timeout."""


class ProxyUnreachable(ConnectError):
    """The egress proxy could not be reached."""


class ProxyRefused(ConnectError):
    """The egress proxy refused the call (407, or a CONNECT not answered 200)."""


class ServerDisconnected(WireError):
    """The server closed the connection before the answer was complete."""


class PayloadError(WireError):
    """The answer could not be parsed."""


class ReadTimeout(WireError, TimeoutError):
    """Nothing from the server within the read timeout."""


class Connection(asyncio.Protocol):
    """One connection: `send_head` (and `write_body`) a request; its `Response` is read as it
    arrives."""

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        # The loop, kept: on Python 3.11 each `asyncio.get_running_loop()` is a system call.
        self.loop = self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False  # lost, or the server said it would close
        self.reused = False  # taken from the pool, not just opened
        self.idle_since = 0.0
        self.answer: Response | None = None  # the answer being read
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._writable = True
        self._head_only = False  # HEAD: the answer has no body whatever its headers say
        self._error: WireError | None = None
        self.received = 0  # bytes of the current request's answer so far
        self.reusable = True  # False: closed once its answer is read, never pooled again
        self._head_deadline: float | None = None  # the answer's head is due by then

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        answer = self.answer
        if answer is not None and not answer.complete:
            if answer.started and not answer.length_known and not self._head_only and exc is None:
                answer.complete = True  # a body delimited by the (clean) close
            else:
                self._fail(ServerDisconnected("Pleo closed the connection mid-answer"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self.received += len(data)
        answer = self.answer
        try:
            self.parser.feed_data(data)
            if answer is not None and not answer.started and self.received > MAX_ANSWER_HEAD:
                self._fail(PayloadError(f"Pleo's answer head is over {MAX_ANSWER_HEAD} bytes"))
                self.abort()
        except httptools.HttpParserUpgrade:  # 101: the broker asked for no upgrade
            self._fail(PayloadError("Pleo switched protocols unasked"))
            self.abort()
        except httptools.HttpParserError as exc:
            self._fail(PayloadError(f"Pleo's answer could not be parsed: {exc}"))
            self.abort()
        self._wake()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.answer is None or self.answer.complete:
            error = PayloadError("Pleo sent an answer to no request")
            self._fail(error)
            raise error  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self.answer
        assert answer is not None
        answer.raw_headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            answer.length_known = True
            answer.content_length = int(value) if value.isdigit() else None
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            answer.length_known = True
        elif len(name) == 10 and answer.connection_header is None and name.lower() == b"connection":
            answer.connection_header = value.decode("latin-1")  # the first, as `headers.get` gives

    def on_headers_complete(self) -> None:
        answer = self.answer
        assert answer is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            answer.raw_headers.clear()
            answer.connection_header = None
            answer.length_known = False
            answer.content_length = None
            return
        answer.status = status
        answer.started = True
        self._head_deadline = None
        if self._head_only:
            answer.complete = True
            self.closed = True  # its body framing cannot be skipped by the parser: not reused

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        assert answer is not None
        if answer.complete:  # after a HEAD answer: nothing should come
            return
        answer.chunks.append(body)
        answer.buffered += len(body)
        if answer.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            answer.paused = True

    def on_message_complete(self) -> None:
        answer = self.answer
        assert answer is not None
        if answer.started:
            answer.complete = True
            if not self.parser.should_keep_alive() or self.parser.get_http_version() != "1.1":
                self.closed = True

    # the request

    def send_head(self, data: bytes, *, head_only: bool) -> Response:
        """Write the request's head (and a body in hand); the answer to read.

        Written first: the answer's record is made while Pleo works (no byte of the answer
        is read before the event loop runs again)."""
        assert self.transport is not None
        self.transport.write(data)
        self._head_only = head_only
        self.received = 0
        self._head_deadline = None
        self.answer = answer = Response(self)
        return answer

    async def write_body(self, data: bytes) -> None:
        """Write part of a streamed body, waiting while the server does not read."""
        assert self.transport is not None
        if self.closed:
            raise ServerDisconnected("Pleo closed the connection during the request")
        self.transport.write(data)
        while not self._writable and not self.closed:
            await self.wait()

    def expect_head(self) -> None:
        """The request is out: its answer's head is due within the read timeout."""
        if self.answer is not None and not self.answer.started:
            self._head_deadline = self._loop.time() + self.read_timeout

    def _due(self) -> float:
        due = self._last_data + self.read_timeout
        deadline = self._head_deadline
        return due if deadline is None or deadline > due else deadline

    async def wait(self) -> None:
        """Until something happens on the connection (ReadTimeout after the read timeout
        without any byte from the server)."""
        if self._error is not None:
            raise self._error
        loop = self._loop
        self._waiter = waiter = loop.create_future()
        self._last_data = loop.time()
        # One timer a connection, not one a wait: it fires no later than any wait's due
        # moment (those only move later) and re-arms itself while someone waits.
        if self._timer is None:
            self._timer = loop.call_at(self._due(), self._timed_out)
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # nobody waits: the next wait arms it again
        loop = self._loop
        due = self._due()
        if loop.time() < due:  # bytes arrived meanwhile: the wait goes on
            self._timer = loop.call_at(due, self._timed_out)
            return
        if self._head_deadline is not None and due == self._head_deadline:
            message = f"Pleo's answer head was not complete within {self.read_timeout:g} s"
        else:
            message = f"Pleo sent nothing for {self.read_timeout:g} s"
        self._fail(ReadTimeout(message))
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WireError) -> None:
        self.closed = True
        if self._error is None:
            self._error = error

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()


class Headers:
    """The answer's headers, looked up case-insensitively (the first of a repeated one)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for found, value in self._raw:
            if len(found) == len(key) and found.lower() == key:
                return value.decode("latin-1")
        return default


class Response:
    """Pleo's answer: status and headers once `send` returns; the body read as it arrives."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers = Headers(self.raw_headers)
        self.connection_header: str | None = None  # the first Connection header, as parsed
        self.content_length: int | None = None
        self.length_known = False
        self.started = False  # the head is in
        self.complete = False  # the whole answer is in
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.released = False
        self.on_release: Callable[[Connection], None] | None = None

    @property
    def content(self) -> Response:
        """The body as a stream (what `iter_chunked` reads)."""
        return self

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (PayloadError past `limit` bytes: the connection is dropped)."""
        while not self.complete:
            if limit is not None and self.buffered > limit:
                self.connection.abort()
                break
            if self.paused:  # all of it is wanted: no point holding back
                self.paused = False
                self.connection.resume_reading()
            await self.connection.wait()
        body = b"".join(self.chunks) if limit is None or self.buffered <= limit else None
        self.chunks.clear()
        self.buffered = 0
        self._done()
        if body is None:
            raise PayloadError(f"Pleo's answer body is over {limit} bytes")
        return body

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        """The body in parts of at most `size` bytes, as they arrive."""
        while True:
            while not self.chunks and not self.complete:
                self._resume()
                await self.connection.wait()
            if not self.chunks:
                self._done()
                return
            chunk = self.chunks.popleft()
            if len(chunk) > size:
                self.chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self.buffered -= len(chunk)
            self._resume()
            yield chunk

    def _resume(self) -> None:
        if self.paused and self.buffered < LOW_WATER:
            self.paused = False
            self.connection.resume_reading()

    def _done(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it may."""
        if not self.released:
            self.released = True
            if self.paused:  # paused by the answer's last bytes: the next answer is read
                self.paused = False
                self.connection.resume_reading()
            if self.on_release is not None:
                self.on_release(self.connection)

    def whole(self) -> bytes:
        """The body of a `complete` answer, read without a wait; the connection stays with the
        answer until `close` (called once the body is passed on: not on the answer's way)."""
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return body

    def close(self) -> None:
        """Done with the answer: a connection whose answer was not read to its end is closed."""
        if self.released:
            return
        if not self.complete:
            self.connection.abort()
        self._done()
