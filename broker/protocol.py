"""The HTTP/1.1 protocol of the broker's listeners: uvicorn's httptools parser, with limits.

Each listener gets its own subclass (`protocol_for`) carrying its `Limits` and its
`RefusalLog`; a refusal is answered in JSON like every other error, and the connection closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from broker import errors
from broker.events import emit

# The request line's fixed part (method, spaces, `HTTP/1.1`, CRLF) counted against the head.
REQUEST_LINE_OVERHEAD = 20


@dataclass(frozen=True)
class Limits:
    """What one listener grants a client connection."""

    listener: str = "listener"
    # The request line and header lines together, in bytes (431; 414 for the target alone).
    max_head_bytes: int = 32_768
    # Seconds from the connection's first byte (or its opening) to the end of its headers.
    head_timeout: float = 10.0
    # Seconds an idle keep-alive connection is kept between requests.
    idle_timeout: float = 5.0
    # Open connections beyond this are answered 503 and closed (None: no cap).
    max_connections: int | None = None
    # At the cap, close the oldest connection with no request in flight (an idle or
    # half-sent one) to make room, rather than refusing the new one: the admin listener's
    # probes then always get in while a flood of idle sockets only pushes itself out.
    evict_idle: bool = False
    # Headers every refusal of the listener itself carries (the connect page's security ones).
    answer_headers: tuple[tuple[bytes, bytes], ...] = ()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the protocol answers `error`."""


class RefusalLog:
    """Logs a listener's refusals, at most one line per code every `every` seconds.

    A flood (ten thousand idle sockets) would otherwise write ten thousand lines; each
    line says how many refusals of its code it stands for.
    """

    def __init__(self, listener: str, every: float = 1.0) -> None:
        self.listener = listener
        self.every = every
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def note(self, code: str, client: str | None) -> None:
        now = time.monotonic()
        count = self._unlogged.get(code, 0) + 1
        if now - self._last.get(code, -self.every) < self.every:
            self._unlogged[code] = count
            return
        self._last[code] = now
        self._unlogged[code] = 0
        emit(
            "listener.refused",
            level=logging.WARNING,
            listener=self.listener,
            code=code,
            client=client,
            count=count,
        )


class ListenerProtocol(HttpToolsProtocol):
    """httptools parsing with the listener's limits, keeping a non-origin-form target.

    uvicorn reduces `GET http://host/path` to `raw_path=/path`; the proxy must refuse
    absolute-form targets (docs/contract.md), so the full target is put back in `raw_path`,
    where the policy sees that it does not start with `/`.

    Limits (`Limits`, one subclass per listener): the head (request line and headers) is
    counted as it arrives and refused with 431 (414 for the target alone) before more of it
    is buffered; a head not complete `head_timeout` seconds after its first byte (or after
    the connection opened) is answered 408, or closed quietly if nothing arrived; beyond
    `max_connections` open connections a new one is answered 503 and closed at once.
    """

    limits: ClassVar[Limits] = Limits()
    refusals: ClassVar[RefusalLog] = RefusalLog("listener")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout  # type: ignore[assignment]
        self._in_head = True  # between the end of one request and the end of the next head
        self._head_bytes = 0  # raw bytes received while in the head
        self._header_bytes = 0  # parsed header lines of the current head
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._refusal: errors.ListenerRefusal | None = None
        self._refused = False
        self._opened_at = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cap = self.limits.max_connections
        full = cap is not None and len(self.connections) >= cap
        if full and self.limits.evict_idle:
            full = not self._evict_oldest_idle()
        super().connection_made(transport)
        if full:
            self._refuse(errors.TooManyConnections())
        else:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_drain_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (a refusal): the rest of the body may come
            # for `head_timeout` seconds at most, or a trickle would hold the socket forever.
            self._drain_timer = self.loop.call_later(self.limits.head_timeout, self._drained)

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
            if isinstance(c, ListenerProtocol)
            and not c._refused
            and (c.cycle is None or c.cycle.response_complete)
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
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade_refused()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            self._refuse(errors.RequestMalformed())
            return
        if self._in_head and not self._refused:
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(errors.HeaderTooLarge())
            elif self._head_timer is None and self._head_bytes > 0:
                # Bytes since the last request ended that began no message (blank lines,
                # which the parser skips): the next head's clock runs from them.
                self._arm_head_timer()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        # The head's clock starts with its first byte, not when the previous answer ended
        # (a slow answer is no slow head; an idle connection is the idle timeout's).
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) + REQUEST_LINE_OVERHEAD > self.limits.max_head_bytes:
            self._stop_parsing(errors.TargetTooLong())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        head = len(self.url) + REQUEST_LINE_OVERHEAD + self._header_bytes
        if head > self.limits.max_head_bytes:
            self._stop_parsing(errors.HeaderTooLarge())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()
        if not self.url.startswith(b"/") and "raw_path" in self.scope:
            self.scope["raw_path"] = self.url.partition(b"?")[0]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_drain_timer()  # the refused request's body came whole in time
        self._in_head = True
        self._head_bytes = 0

    # -- refusals -------------------------------------------------------------------------

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
            self.cycle.message_event.set()
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
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body:
                # The request's own body broke off: the app must see the caller gone (and
                # abort anything it forwards), as when the connection drops.
                cycle.disconnected = True
                cycle.message_event.set()
                if not cycle.response_started:
                    self._write_error(error)
                self.transport.close()
                return
            # Finish the response in flight on this connection, then close it.
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self._write_error(error)
        self.transport.close()

    def _write_error(self, error: errors.ListenerRefusal) -> None:
        body = json.dumps(error.to_body()).encode()
        extra = b"".join(b"%s: %s\r\n" % pair for pair in self.limits.answer_headers)
        head = (
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % len(body)
            + extra
            + b"\r\n"
        )
        self.transport.write(STATUS_LINE[error.status] + head + body)


def protocol_for(listener: str, limits: Limits) -> type[ListenerProtocol]:
    """The protocol class a listener named `listener` serves with, under `limits`."""
    return type(
        f"{listener.title()}Protocol",
        (ListenerProtocol,),
        {"limits": limits, "refusals": RefusalLog(listener)},
    )
