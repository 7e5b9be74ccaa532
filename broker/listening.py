"""What a listener is given and what its connections share: its `Limits`, its `RefusalLog`,
and its `ListenerState` (app, open connections, running requests). `broker.protocol` serves
each connection under them; `broker.server` makes them per listener and stops them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp

from broker.events import emit

if TYPE_CHECKING:
    from broker.protocol import ListenerProtocol


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
    # Requests one connection may pipeline behind the one being answered; the first beyond is
    # answered 503 `too_many_pipelined` in its turn and the connection closes.
    max_pipelined: int = 16
    # Headers every refusal of the listener itself carries (the connect page's security ones).
    answer_headers: tuple[tuple[bytes, bytes], ...] = ()


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


@dataclass(eq=False)
class ListenerState:
    """What one listener's connections share: its app, its open connections, its requests
    running, and whether it trusts `X-Forwarded-Proto`/`-For` from a peer on loopback."""

    app: ASGIApp
    forwarded_headers: bool = False
    connections: set[ListenerProtocol] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closing: bool = False  # stopping: a connection accepted now is closed at once
    _quiet: asyncio.Event | None = None

    def run(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._settle()

    def closed(self, connection: ListenerProtocol) -> None:
        self.connections.discard(connection)
        self._settle()

    def _settle(self) -> None:
        if self._quiet is not None and not self.connections and not self.tasks:
            self._quiet.set()

    async def settled(self) -> None:
        """Wait until no connection is open and no request runs."""
        self._quiet = asyncio.Event()
        self._settle()
        await self._quiet.wait()
