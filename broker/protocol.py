"""The HTTP/1.1 protocol of the broker's listeners: the httptools parser, with limits.

Each request's answer is written by its cycle, `broker.listener_cycle.ListenerCycle`.

Each listener gets its own subclass (`protocol_for`) carrying its `Limits` and its
`RefusalLog` (`broker.listening`); a refusal is answered in JSON like every other error, and
the connection closes. A connection is made with its listener's `ListenerState`.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import deque
from typing import Any, ClassVar

import httptools
from starlette.types import ASGIApp

from broker import errors
from broker.forwarded import forwarded
from broker.http1 import HIGH_WATER_LIMIT, STATUS_LINE, FlowControl
from broker.listener_cycle import ListenerCycle, answer_too_many_pipelined, refusal
from broker.listening import Limits, ListenerState, RefusalLog

# The scope's `asgi` entry, the same for every request.
_ASGI = {"version": "3.0", "spec_version": "2.3"}

_UPGRADE_WITH_BODY = (
    "A request that asks to upgrade the connection (Upgrade) cannot carry a body here;"
    " send it without Upgrade. The connection is closed."
)

# The request line's fixed part (method, spaces, `HTTP/1.1`, CRLF) counted against the head.
REQUEST_LINE_OVERHEAD = 20


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the protocol answers `error`."""


class ListenerProtocol(asyncio.Protocol):
    """httptools parsing with the listener's limits, keeping a non-origin-form target.

    A target in absolute form (`GET http://host/path`) is kept whole in `raw_path`: the proxy
    must refuse it (docs/contract.md), and the policy sees that it does not start with `/`.

    Limits (`Limits`, one subclass per listener): the head (request line and headers) is
    counted as it arrives and refused with 431 (414 for the target alone) before more of it
    is buffered; a head not complete `head_timeout` seconds after its first byte (or after
    the connection opened) is answered 408, or closed quietly if nothing arrived; beyond
    `max_connections` open connections a new one is answered 503 and closed at once.

    Requests pipelined behind one being answered wait for its answer; an `Upgrade` is
    answered as plain HTTP and the connection closes (neither listener speaks WebSocket).
    """

    limits: ClassVar[Limits] = Limits()
    refusals: ClassVar[RefusalLog] = RefusalLog("listener")
    cycle_class: ClassVar[type[ListenerCycle]] = ListenerCycle

    transport: asyncio.Transport
    flow: FlowControl
    url: bytes
    headers: list[tuple[bytes, bytes]]
    scope: dict[str, Any]

    def __init__(self, state: ListenerState, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.app = state.app
        self.loop = loop
        self.connections = state.connections
        self.parser = httptools.HttpRequestParser(self)
        # Parse (and answer) a request pipelined after one that closes the connection.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.timeout_keep_alive = self.limits.idle_timeout
        self.timeout_keep_alive_task: asyncio.TimerHandle | None = None
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.pipeline: deque[tuple[ListenerCycle, ASGIApp]] = deque()
        self.expect_100_continue = False
        self.cycle: ListenerCycle | None = None  # the request parsed last
        self._answering: ListenerCycle | None = None  # the request whose app runs
        self._in_head = True  # between the end of one request and the end of the next head
        self._head_begun = False  # a message began and its head is not whole yet
        self._head_bytes = 0  # raw bytes received while in the head
        self._header_bytes = 0  # parsed header lines of the current head
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._refusal: errors.ListenerRefusal | None = None
        self._refused = False
        self._opened_at = time.monotonic()
        self._idle_since: float | None = None  # loop time the last answer completed, if idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cap = self.limits.max_connections
        full = cap is not None and len(self.connections) >= cap
        if full and self.limits.evict_idle:
            full = not self._evict_oldest_idle()
        self.connections.add(self)
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.flow = FlowControl(self.transport)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if self.state.closing:
            self._refused = True
            self.transport.close()
        elif full:
            self._refuse(errors.TooManyConnections())
        else:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.closed(self)
        self._cancel_head_timer()
        self._cancel_drain_timer()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        # The request being answered and every one queued behind it see the caller gone.
        for cycle in {self._answering, self.cycle, *(queued for queued, _ in self.pipeline)}:
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.wake()
        self.flow.resume_writing()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        """The caller is done sending: the transport closes (an answer in progress is cut)."""

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def shutdown(self) -> None:
        """Stop the connection: at once if idle, else after the answer in progress."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:
            self.cycle.keep_alive = False

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _start_asgi_task(self, cycle: ListenerCycle, app: ASGIApp) -> None:
        self._answering = cycle
        self.state.run(self.loop.create_task(cycle.run_asgi(app)))

    # -- the idle (keep-alive) timeout ----------------------------------------------------
    # uvicorn arms a timer when an answer completes and cancels it when the next bytes come:
    # a timer made and cancelled for every request. Here the timer stays armed: bytes
    # arriving only mark the connection busy, an answer completing marks it idle since now,
    # and when the timer fires it closes a connection idle for the whole timeout, or waits
    # out the rest (or, for a busy one, until its answer completes).

    def _idle_check(self) -> None:
        self.timeout_keep_alive_task = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy: armed again when its answer completes
        remaining = since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self._idle_check)
        else:
            self.timeout_keep_alive_handler()

    def on_response_complete(self, cycle: ListenerCycle) -> None:
        """An answer completed: start the request pipelined behind it, or idle under the idle
        timer. `cycle` is the one whose answer completed (it passes itself), not
        `self.cycle`, which may be one pipelined behind it."""
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if cycle.more_body:
            # Answered before its body was read (a refusal): the rest of the body may come
            # for `head_timeout` seconds at most, or a trickle would hold the socket forever.
            # (Nothing is pipelined behind it: its body comes first.)
            self._cancel_drain_timer()
            self._drain_timer = self.loop.call_later(self.limits.head_timeout, self._drained)
        if self.pipeline:
            self._idle_since = None
            pipelined, app = self.pipeline.pop()
            self._start_asgi_task(pipelined, app)
        else:
            self._idle()

    def _idle(self) -> None:
        """No request in flight from now on: idle since now, under the idle timer."""
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._idle_check
            )

    def _drained(self) -> None:
        self._drain_timer = None
        self._refused = True
        self.transport.close()

    def _cancel_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _evict_oldest_idle(self) -> bool:
        idle = [
            c
            for c in self.connections
            if not c._refused and (c.cycle is None or c.cycle.response_complete)
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._opened_at)
        oldest._refused = True
        oldest._cancel_head_timer()
        oldest.transport.close()
        self.refusals.note("evicted_idle", oldest.client[0] if oldest.client else None)
        return True

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._idle_since = None
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade_refused()
            return
        except httptools.HttpParserError:
            if self._refused:
                return  # refused from a callback, which did what a refusal does
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            self._refuse(errors.RequestMalformed())
            return
        if self._in_head and not self._refused:
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(errors.HeaderTooLarge())
            elif self._head_timer is None and (self._head_bytes > 0 or self._head_begun):
                # A head begun but not whole, or bytes since the last request ended that
                # began no message (blank lines, which the parser skips): the next head's
                # clock runs from them. A head that came whole needs no clock at all.
                self._arm_head_timer()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": "http",
            "root_path": "",
            "headers": self.headers,
        }
        self._header_bytes = 0
        # Not idle while a request is under way (bytes in the packet that ended the last
        # body may begin it): the head timer, then the answer's completion, take over.
        self._idle_since = None
        # The head's clock starts with its first byte, not when the previous answer ended
        # (a slow answer is no slow head; an idle connection is the idle timeout's): armed
        # in `data_received` once the bytes at hand are parsed, if the head is not whole.
        self._head_begun = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) + REQUEST_LINE_OVERHEAD > self.limits.max_head_bytes:
            self._stop_parsing(errors.TargetTooLong())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        head = len(self.url) + REQUEST_LINE_OVERHEAD + self._header_bytes
        if head > self.limits.max_head_bytes:
            self._stop_parsing(errors.HeaderTooLarge())
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is whole: the request's scope, and its cycle started (or queued behind
        the answer in progress)."""
        self._in_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._cancel_head_timer()
        parser = self.parser
        scope = self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._declares_body():
            # The parser stops at an upgrade's head: its body would reach the app as none.
            self._stop_parsing(errors.RequestMalformed(_UPGRADE_WITH_BODY))
        url = self.url
        parsed_url = httptools.parse_url(url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = path
        # An absolute-form target is kept whole: the policy must see it to refuse it.
        scope["raw_path"] = raw_path if url.startswith(b"/") else url.partition(b"?")[0]
        scope["query_string"] = parsed_url.query or b""
        if self.state.forwarded_headers:
            forwarded(scope)
        app = self.app
        existing = self.cycle
        cycle = self.cycle = self.cycle_class(
            scope,
            self.transport,
            self.flow,
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        cycle.loop = self.loop
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined HTTP requests wait for the answer in progress, so many at most.
            self.flow.pause_reading()
            if len(self.pipeline) >= self.limits.max_pipelined:
                self._pipeline_full(cycle)
            self.pipeline.appendleft((cycle, app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.more_body = False
            cycle.wake()
        self._in_head = True
        self._head_bytes = 0
        self._cancel_drain_timer()  # the refused request's body came whole in time
        # Answered before its body was read: the body's bytes marked the connection busy,
        # but no answer is left to complete and re-arm the idle timer.
        answered = cycle is not None and cycle.response_complete and not self.pipeline
        if answered and not self.transport.is_closing():
            self._idle()

    def _declares_body(self) -> bool:
        return any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers)

    # -- refusals -------------------------------------------------------------------------

    def _pipeline_full(self, cycle: ListenerCycle) -> None:
        """The first request beyond `max_pipelined` is answered 503 in its turn, the
        connection closes after it, and nothing more is parsed or read."""
        cycle.keep_alive = False
        self.pipeline.appendleft((cycle, answer_too_many_pipelined))
        self._refused = True
        self.refusals.note(errors.TooManyPipelined.code, self.client[0] if self.client else None)
        raise _Refused(errors.TooManyPipelined.code)  # stops parsing what is at hand

    def _close_after_answers(self) -> None:
        """Close the connection once the requests already taken are answered."""
        last = self.pipeline[0][0] if self.pipeline else self._answering
        if last is not None:
            last.keep_alive = False
        self.flow.pause_reading()

    def _stop_parsing(self, error: errors.ListenerRefusal) -> None:
        self._refusal = error
        raise _Refused(error.code)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._head_bytes == 0:
            # Nothing of a request arrived: close quietly, like an idle keep-alive connection.
            self._refused = True
            self.transport.close()
            return
        self._refuse(errors.HeaderTimeout())

    def _upgrade_refused(self) -> None:
        # Neither listener speaks WebSocket (ws="none"): the request is answered as plain
        # HTTP, and the connection closes after that answer, since the parser stops there.
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            self.cycle.more_body = False
            self.cycle.wake()
        else:
            self.transport.close()

    def _refuse(self, error: errors.ListenerRefusal) -> None:
        """Answer `error` and close, unless an earlier request is still being answered."""
        self._refused = True
        self._cancel_head_timer()
        self.refusals.note(error.code, self.client[0] if self.client else None)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and self.pipeline and self.pipeline[0][0] is cycle:
            # The broken request waits behind an answer in progress: an answer written now
            # would cut into that one, so it gets none, and the connection closes after the
            # answers before it.
            self.pipeline.popleft()
            self._close_after_answers()
            return
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body:
                # The request's own body broke off: the app must see the caller gone (and
                # abort anything it forwards), as when the connection drops.
                cycle.disconnected = True
                cycle.wake()
                if not cycle.response_started:
                    self._write_error(error)
                else:
                    cycle.flush()  # the head the app sent goes out, as it would have
                self.transport.close()
                return
            # Finish the response in flight on this connection (the last one taken: nothing
            # is queued, or the branch above took it), then close it.
            self._close_after_answers()
            return
        self._write_error(error)
        self.transport.close()

    def _write_error(self, error: errors.ListenerRefusal) -> None:
        headers, body = refusal(error, self.limits.answer_headers)
        head = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        self.transport.write(STATUS_LINE[error.status] + head + b"\r\n" + body)


def protocol_for(listener: str, limits: Limits) -> type[ListenerProtocol]:
    """The protocol class a listener named `listener` serves with, under `limits`."""
    cycle = type(f"{listener.title()}Cycle", (ListenerCycle,), {"listener": listener})
    return type(
        f"{listener.title()}Protocol",
        (ListenerProtocol,),
        {"limits": limits, "refusals": RefusalLog(listener), "cycle_class": cycle},
    )


def _address(info: Any) -> tuple[str, int] | None:
    """A socket address as ASGI's `client` and `server` give it: (host, port)."""
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None
