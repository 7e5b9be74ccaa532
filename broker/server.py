"""Running listeners: the broker's two (proxy and admin) on one event loop, under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from broker import errors
from broker.admin import create_admin_app
from broker.events import emit
from broker.proxy import create_proxy_app
from broker.runtime import open_broker
from broker.settings import Settings
from broker.stores import SecretStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The request line's fixed part (method, spaces, `HTTP/1.1`, CRLF) counted against the head.
REQUEST_LINE_OVERHEAD = 20


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `run_listeners`, which stops every listener."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


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


class _TargetPreservingProtocol(HttpToolsProtocol):
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
        super().connection_lost(exc)

    def _evict_oldest_idle(self) -> bool:
        idle = [
            c
            for c in self.connections
            if isinstance(c, _TargetPreservingProtocol)
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
            elif self._head_timer is None:
                self._arm_head_timer()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

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
        head = (
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(STATUS_LINE[error.status] + head + body)


class _AnswerCancelled:
    """Answers 503 `shutting_down` for a request the drain's end cancelled before it answered.

    uvicorn cancels what still runs when `timeout_graceful_shutdown` passes; left alone it
    would log a traceback and answer a text 500.
    """

    def __init__(self, app: ASGIApp, listener: str) -> None:
        self.app = app
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # `send` is passed on unwrapped: the sandbox reaches through it to uvicorn's transport.
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            emit("listener.request_cancelled", level=logging.WARNING, listener=self.listener)
            error = errors.ShuttingDown()
            body = json.dumps(error.to_body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            # uvicorn refuses a second response start with RuntimeError and writes nothing:
            # a response already under way is cut short instead (the connection closes).
            with contextlib.suppress(RuntimeError):
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Listener:
    name: str
    app: Any
    sock: socket.socket
    # uvicorn's X-Forwarded-* middleware: the data plane reads neither client nor scheme,
    # so it skips that wrapper on every request.
    forwarded_headers: bool = True
    limits: Limits = field(default_factory=Limits)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run_listeners(
    listeners: Sequence[Listener],
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[], None] | None = None,
    drain: float | None = None,
) -> None:
    """Serve every listener until `stop` is set or SIGINT/SIGTERM arrives.

    On stop, requests in flight get `drain` seconds to finish (None: as long as they take);
    then they are cancelled and answered 503 `shutting_down` if they had not answered yet.
    """
    servers = [
        _Server(
            uvicorn.Config(
                _AnswerCancelled(listener.app, listener.name),
                http=type(
                    f"{listener.name.title()}Protocol",
                    (_TargetPreservingProtocol,),
                    {"limits": listener.limits, "refusals": RefusalLog(listener.name)},
                ),
                ws="none",
                lifespan="auto",
                access_log=False,
                log_level="warning",
                server_header=False,
                date_header=False,
                proxy_headers=listener.forwarded_headers,
                # uvicorn annotates int but only waits with it: fractions work.
                timeout_graceful_shutdown=drain,  # type: ignore[arg-type]
            )
        )
        for listener in listeners
    ]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    async def stop_all() -> None:
        await stop.wait()
        for server in servers:
            server.should_exit = True

    async def announce() -> None:
        # uvicorn offers only a flag for "listening"; poll it briefly.
        while not all(server.started for server in servers):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if started is not None:
            started()

    stopper = asyncio.create_task(stop_all())
    announcer = asyncio.create_task(announce())
    try:
        await asyncio.gather(
            *(s.serve(sockets=[ln.sock]) for s, ln in zip(servers, listeners, strict=True))
        )
    finally:
        stop.set()
        for task in (stopper, announcer):
            task.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)


async def serve(
    settings: Settings,
    *,
    store: SecretStore | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[int, int], None] | None = None,
) -> None:
    """`broker serve`: open the broker and run the proxy and admin listeners."""
    before, open_files, hard = raise_file_limit()
    proxy_cap, admin_cap = connection_caps(settings, open_files)
    emit(
        "broker.file_limit",
        soft_before=_limit_text(before),
        soft=_limit_text(open_files),
        hard=_limit_text(hard),
        proxy_max_connections=proxy_cap,
        admin_max_connections=admin_cap,
    )
    if proxy_cap < settings.proxy_max_connections:
        emit(
            "broker.connections_capped",
            level=logging.WARNING,
            proxy_max_connections=proxy_cap,
            configured=settings.proxy_max_connections,
            reason="the open-file limit leaves room for no more",
        )

    def limits(listener: str, cap: int) -> Limits:
        return Limits(
            listener=listener,
            max_head_bytes=settings.max_header_bytes,
            head_timeout=settings.header_timeout,
            idle_timeout=settings.idle_timeout,
            max_connections=cap,
            evict_idle=listener == "admin",
        )

    proxy_sock = bind(settings.proxy_host, settings.proxy_port)
    admin_sock = bind(settings.admin_host, settings.admin_port)
    async with open_broker(settings, store=store) as broker:
        admin = Listener(
            "admin", create_admin_app(broker), admin_sock, limits=limits("admin", admin_cap)
        )
        proxy = Listener(
            "proxy",
            create_proxy_app(broker),
            proxy_sock,
            forwarded_headers=False,
            limits=limits("proxy", proxy_cap),
        )

        def announce() -> None:
            # Everything loaded so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise walk every tenant record again.
            gc.freeze()
            if started is not None:
                started(proxy.port, admin.port)

        await run_listeners(
            [proxy, admin], stop=stop, started=announce, drain=settings.shutdown_drain_seconds
        )


def raise_file_limit() -> tuple[int, int, int]:
    """Raise the soft open-file limit to the hard one; returns (soft before, soft, hard).

    Every connection is a file: at a soft limit of 1024 a flood of idle sockets used to
    leave no file for anything else, the admin listener's probes included.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, now, hard


def connection_caps(settings: Settings, open_files: int) -> tuple[int, int]:
    """The proxy's and the admin listener's connection caps under `open_files` files.

    The admin listener's budget comes first, so its probes keep answering; the proxy gets
    at most half of what remains, since each of its connections may hold one to Pleo too.
    """
    admin = settings.admin_max_connections
    proxy = settings.proxy_max_connections
    if open_files != resource.RLIM_INFINITY:
        proxy = min(proxy, max(16, (open_files - admin) // 2))
    return proxy, admin


def _limit_text(value: int) -> str | int:
    return "unlimited" if value == resource.RLIM_INFINITY else value
