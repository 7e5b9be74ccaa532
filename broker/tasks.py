"""Running one coroutine per item at once, where the first failure stops the others."""

from __future__ import annotations

import asyncio
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
