"""Running coroutines: one per item at once (the first failure stops the others), or one
again and again in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def map_all(
    work: Callable[[T], Awaitable[R]], items: Iterable[T], *, limit: int | None = None
) -> list[R]:
    """`work(item)` for every item, at most `limit` at once; results in the items' order.

    A TaskGroup, not `gather`: the first failure cancels the work still running or queued
    and is raised as itself, not wrapped in an `ExceptionGroup`.
    """
    queue = list(enumerate(items))
    pending = iter(queue)
    results: dict[int, R] = {}

    async def worker() -> None:
        for index, item in pending:  # shared by the workers: each item is taken once
            results[index] = await work(item)

    workers = len(queue) if limit is None else min(limit, len(queue))
    failure: Exception | None = None
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())
    except ExceptionGroup as failed:
        failure = failed.exceptions[0]
    if failure is not None:
        raise failure  # outside the `except`, so the group is not its context
    return [results[index] for index in range(len(queue))]


class Repeating:
    """`work` run again and again in the background, `delay()` seconds apart; a failure is
    logged (with its traceback) and the loop goes on."""

    def __init__(
        self, work: Callable[[], Awaitable[object]], delay: Callable[[], float], name: str
    ) -> None:
        self.work = work
        self.delay = delay
        self.name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            try:
                await self.work()
            except Exception:  # the loop must survive anything its work raises
                logging.getLogger(__name__).exception("%s failed", self.name)
