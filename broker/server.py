"""Running listeners: the broker's two (proxy and admin) on one event loop.

`serve` fits the connection caps to the open-file limit, binds both sockets, opens the broker
(the one lifespan) and runs the listeners until stopped; `run_listeners` is the part that
serves any set of listeners (the demo's sandbox too). How each connection is parsed and
limited is `broker.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import resource
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from starlette.types import ASGIApp

from broker.admin import create_admin_app
from broker.events import emit
from broker.listening import Limits, ListenerState
from broker.protocol import protocol_for
from broker.proxy import create_proxy_app
from broker.runtime import Broker, open_broker
from broker.settings import Settings
from broker.stores import SecretStore

# Connections the kernel queues for a listener before it accepts them.
BACKLOG = 2048


@dataclass(frozen=True)
class Listener:
    """One app served on one bound socket, under its limits."""

    name: str
    app: ASGIApp
    sock: socket.socket
    # X-Forwarded-Proto/-For from a proxy on loopback (broker.forwarded): the data plane
    # reads neither client nor scheme, so it skips them on every request.
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
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


# -- broker serve ---------------------------------------------------------------------------


async def serve(
    settings: Settings,
    *,
    store: SecretStore | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[int, int, int | None], None] | None = None,
) -> None:
    """`broker serve`: open the broker and run the proxy and admin listeners, and the
    connect listener when BROKER_CONNECT_PUBLIC_URL is set; `started` gets their ports."""
    proxy_cap, admin_cap = fit_connections_to_file_limit(settings)
    proxy_sock = bind(settings.proxy_host, settings.proxy_port)
    warn_if_open_to_network(settings)
    admin_sock = bind(settings.admin_host, settings.admin_port)
    connect_sock = None
    if settings.connect_public_url is not None:
        connect_sock = bind(settings.connect_host, settings.connect_port)
    async with open_broker(settings, store=store) as broker:
        admin = Listener(
            "admin",
            create_admin_app(broker),
            admin_sock,
            limits=listener_limits(settings, "admin", admin_cap),
        )
        proxy = Listener(
            "proxy",
            create_proxy_app(broker),
            proxy_sock,
            forwarded_headers=False,
            limits=listener_limits(settings, "proxy", proxy_cap),
        )

        listeners = [proxy, admin]
        if connect_sock is not None:
            listeners.append(_connect_listener(broker, connect_sock, admin_cap))

        def announce() -> None:
            # Everything loaded so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise walk every tenant record again.
            gc.freeze()
            if started is not None:
                connect_port = listeners[2].port if len(listeners) > 2 else None
                started(proxy.port, admin.port, connect_port)

        await run_listeners(
            listeners, stop=stop, started=announce, drain=settings.shutdown_drain_seconds
        )


def warn_if_open_to_network(settings: Settings) -> bool:
    """Log `proxy.open_to_network` when a proxy beyond loopback trusts every caller."""
    if settings.callers_file is not None or is_loopback(settings.proxy_host):
        return False
    emit(
        "proxy.open_to_network",
        level=logging.WARNING,
        host=settings.proxy_host,
        advice="anyone who reaches this address can use every tenant's key;"
        " set BROKER_CALLERS_FILE to name the callers",
    )
    return True


def is_loopback(host: str) -> bool:
    """True if `host` (a bind address) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _connect_listener(broker: Broker, sock: socket.socket, max_connections: int) -> Listener:
    """The connect page's listener; its modules (jinja2 and the pages) are imported only
    when it is on, so a broker without it does not carry them (docs/performance.md)."""
    from broker.connect import create_connect_app
    from broker.connect_guards import security_headers

    settings = broker.settings
    limits = listener_limits(settings, "connect", max_connections)
    return Listener(
        "connect",
        create_connect_app(broker),
        sock,
        limits=replace(
            limits, answer_headers=tuple(security_headers(settings.connect_frame_ancestors))
        ),
    )


def listener_limits(settings: Settings, listener: str, max_connections: int) -> Limits:
    """What the proxy or admin listener grants a connection, from the settings."""
    return Limits(
        listener=listener,
        max_head_bytes=settings.max_header_bytes,
        head_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
        max_connections=max_connections,
        evict_idle=listener in ("admin", "connect"),
    )


# -- open files -----------------------------------------------------------------------------


def fit_connections_to_file_limit(settings: Settings) -> tuple[int, int]:
    """Raise the open-file limit, then the proxy's and admin's caps that fit under it (logged)."""
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
    return proxy_cap, admin_cap


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


# -- any listeners --------------------------------------------------------------------------


async def run_listeners(
    listeners: Sequence[Listener],
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[], None] | None = None,
    drain: float | None = None,
) -> None:
    """Serve every listener until `stop` is set or SIGINT/SIGTERM arrives.

    On stop, the listeners stop accepting, idle connections close, and requests in flight get
    `drain` seconds to finish (None: as long as they take); then they are cancelled and
    answered 503 `shutting_down` if they had not answered yet.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    states = [ListenerState(ln.app, forwarded_headers=ln.forwarded_headers) for ln in listeners]
    servers: list[asyncio.AbstractServer] = []
    with _stopped_by_signals(stop):
        try:
            for listener, state in zip(listeners, states, strict=True):
                protocol = protocol_for(listener.name, listener.limits)
                server = await loop.create_server(
                    functools.partial(protocol, state, loop), sock=listener.sock, backlog=BACKLOG
                )
                servers.append(server)
            if started is not None:
                started()
            await stop.wait()
        finally:
            stop.set()
            await _shut_down(servers, states, drain)


async def _shut_down(
    servers: Sequence[asyncio.AbstractServer], states: Sequence[ListenerState], drain: float | None
) -> None:
    """Stop accepting, close idle connections, let requests finish within `drain` seconds."""
    for server in servers:
        server.close()
    for state in states:
        state.closing = True
        for connection in list(state.connections):
            connection.shutdown()
    try:
        async with asyncio.timeout(drain):
            await asyncio.gather(*(state.settled() for state in states))
    except TimeoutError:
        running = [task for state in states for task in state.tasks]
        for task in running:
            task.cancel()
        if running:
            # Each answers 503 `shutting_down` as it ends (broker.listener_cycle).
            await asyncio.wait(running, timeout=CANCELLED_GRACE)


# Seconds a request cancelled at the drain's end gets to send its 503.
CANCELLED_GRACE = 1.0


@contextlib.contextmanager
def _stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while inside (where this loop may handle signals)."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
