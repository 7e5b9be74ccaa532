"""Running a store's blocking calls (sqlite3, hvac) on threads of its own, off the event loop.

A `BlockingRunner` owns a thread pool of `workers` threads. With a `timeout` it lets at most
that many calls in at once, so that a call's time counts from when a thread takes it, not
from when it was queued. A call that times out is no longer awaited, but its thread finishes it: a
blocking call cannot be interrupted. `translate` turns a library's exception (or the
`TimeoutError`) into the store's own; it returns None for one to let through unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")

Translate = Callable[[Exception], Exception | None]


def _unchanged(exc: Exception) -> Exception | None:
    return None


class BlockingRunner:
    """A bounded thread pool for one store's blocking calls."""

    def __init__(
        self,
        name: str,
        *,
        workers: int = 1,
        timeout: float | None = None,
        translate: Translate = _unchanged,
    ) -> None:
        self.timeout = timeout
        self._translate = translate
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._slots = asyncio.Semaphore(workers) if timeout is not None else None

    def call_now(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the pool and wait for it, blocking (for set-up outside the event loop)."""
        return self._pool.submit(fn).result()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the pool within the timeout; its failure translated."""
        try:
            if self._slots is None:
                return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
            async with self._slots:
                future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
                return await asyncio.wait_for(future, self.timeout)
        except Exception as exc:
            failure = self._translate(exc)
            if failure is None:
                raise
            raise failure from exc

    async def close(self, last: Callable[[], object] | None = None) -> None:
        """Run `last` (untranslated) after the calls already queued, then stop the threads."""
        try:
            if last is not None:
                await asyncio.get_running_loop().run_in_executor(self._pool, last)
        finally:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop the threads at once, blocking (when set-up failed)."""
        self._pool.shutdown(wait=True)


class Run(Protocol):
    """What runs a blocking call off the event loop: `await run(fn)` (a runner, or a wrapper)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...
