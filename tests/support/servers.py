"""Real servers for tests: the sandbox and the broker, each on its own thread and event loop,
listening on 127.0.0.1 free ports, so tests talk to them over real sockets."""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.listening import Limits
from broker.sandbox import SandboxState, create_app
from broker.server import Listener, bind, run_listeners, serve
from broker.settings import Settings
from broker.stores import SecretStore

StartFn = Callable[[asyncio.Event, Callable[..., None]], Coroutine[Any, Any, None]]

REQUIRED_SCOPES = ("export-jobs:read", "export-jobs:write")  # what test brokers require


class ThreadedLoop:
    """Runs one server coroutine on a private event loop in a daemon thread."""

    def __init__(self, start: StartFn, timeout: float = 15.0) -> None:
        self._start = start
        self._ready = threading.Event()
        self._result: tuple[Any, ...] = ()
        self._error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not start in time")
        if self._error is not None:
            raise RuntimeError("server failed to start") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def started(*result: Any) -> None:
                self._result = result
                self._ready.set()

            try:
                await self._start(self._stop, started)
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.close()

    @property
    def result(self) -> tuple[Any, ...]:
        return self._result

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


@dataclass
class RunningSandbox:
    url: str
    state: SandboxState
    thread: ThreadedLoop


def start_app(app: Any, limits: Limits | None = None) -> tuple[str, ThreadedLoop]:
    """Serve an ASGI app on a free 127.0.0.1 port (under `limits`, if given); returns its URL
    and its thread."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listener = Listener("app", app, sock, limits=limits or Limits())

    async def start(stop: asyncio.Event, started: Callable[..., None]) -> None:
        await run_listeners([listener], stop=stop, started=started)

    return f"http://127.0.0.1:{port}", ThreadedLoop(start)


def start_sandbox() -> RunningSandbox:
    state = SandboxState()
    url, thread = start_app(create_app(state))
    return RunningSandbox(url, state, thread)


@dataclass
class RunningBroker:
    settings: Settings
    proxy_url: str
    admin_url: str
    connect_url: str | None  # the connect listener, when BROKER_CONNECT_PUBLIC_URL is set
    token: str
    thread: ThreadedLoop
    keys_used: list[str] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def proxy_port(self) -> int:
        return int(self.proxy_url.rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.admin_url.rsplit(":", 1)[1])


def broker_settings(pleo_url: str, store_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pleo_base_url": pleo_url,
        "proxy_port": 0,
        "admin_port": 0,
        "admin_token": secrets.token_urlsafe(24),
        "store_path": store_path,
        "master_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "upstream_connect_timeout": 2.0,
        "upstream_timeout": 5.0,
        "cache_ttl": 0.5,
        "health_check_interval": 0,  # on only where a test asks: no check it did not expect
    }
    values.update(overrides)
    return Settings(**values)


def start_broker(settings: Settings, *, store: SecretStore | None = None) -> RunningBroker:
    async def start(stop: asyncio.Event, started: Callable[..., None]) -> None:
        await serve(settings, store=store, stop=stop, started=started)

    thread = ThreadedLoop(start)
    proxy_port, admin_port, connect_port = thread.result
    assert settings.admin_token is not None
    return RunningBroker(
        settings=settings,
        proxy_url=f"http://127.0.0.1:{proxy_port}",
        admin_url=f"http://127.0.0.1:{admin_port}",
        connect_url=f"http://127.0.0.1:{connect_port}" if connect_port else None,
        token=settings.admin_token.get_secret_value(),
        thread=thread,
    )
