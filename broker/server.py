"""Running listeners: the broker's two (proxy and admin) on one event loop, under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.admin import create_admin_app
from broker.proxy import create_proxy_app
from broker.runtime import open_broker
from broker.settings import Settings
from broker.stores import SecretStore


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `run_listeners`, which stops every listener."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _TargetPreservingProtocol(HttpToolsProtocol):
    """httptools parsing that keeps a non-origin-form target visible to the app.

    uvicorn reduces `GET http://host/path` to `raw_path=/path`; the proxy must refuse
    absolute-form targets (docs/contract.md), so the full target is put back in `raw_path`,
    where the policy sees that it does not start with `/`.
    """

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.url.startswith(b"/") and "raw_path" in self.scope:
            self.scope["raw_path"] = self.url.partition(b"?")[0]


@dataclass(frozen=True)
class Listener:
    name: str
    app: Any
    sock: socket.socket
    # uvicorn's X-Forwarded-* middleware: the data plane reads neither client nor scheme,
    # so it skips that wrapper on every request.
    forwarded_headers: bool = True

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
) -> None:
    """Serve every listener until `stop` is set or SIGINT/SIGTERM arrives."""
    servers = [
        _Server(
            uvicorn.Config(
                listener.app,
                http=_TargetPreservingProtocol,
                lifespan="auto",
                access_log=False,
                log_level="warning",
                server_header=False,
                date_header=False,
                proxy_headers=listener.forwarded_headers,
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
    proxy_sock = bind(settings.proxy_host, settings.proxy_port)
    admin_sock = bind(settings.admin_host, settings.admin_port)
    async with open_broker(settings, store=store) as broker:
        admin = Listener("admin", create_admin_app(broker), admin_sock)
        proxy = Listener("proxy", create_proxy_app(broker), proxy_sock, forwarded_headers=False)

        def announce() -> None:
            # Everything loaded so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise walk every tenant record again.
            gc.freeze()
            if started is not None:
                started(proxy.port, admin.port)

        await run_listeners([proxy, admin], stop=stop, started=announce)
