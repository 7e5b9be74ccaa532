"""Per-key concurrency helpers of the tenant service: keyed locks and single flight.

`KeyedLocks` gives each key (a tenant id) its own `asyncio.Lock`, so changes to one tenant
are serialised without holding up the others. `SingleFlight` runs one piece of work per key
at a time: callers that ask while it runs share its result (or its exception) instead of
starting it again, as many proxied requests do when they all want one tenant re-checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class KeyedLocks:
    """One lock per key, made on first use and kept."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __getitem__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock


class SingleFlight(Generic[T]):
    """Runs `work` once per key at a time; concurrent callers await the running one."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[T]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """The result of `work()`, or of the call already running for `key`.

        A waiter that is cancelled does not cancel the running work (it is shielded); an
        exception of the work reaches the caller that started it and every waiter.
        """
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await work()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._running[key]
