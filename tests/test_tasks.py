"""`map_all`: every result in order, at most `limit` at once, the first failure alone."""

from __future__ import annotations

import asyncio

import pytest

from broker.tasks import Repeating, map_all


async def test_results_come_back_in_the_order_of_the_items() -> None:
    async def slower_first(number: int) -> int:
        await asyncio.sleep(0.001 * (5 - number))
        return number * 10

    assert await map_all(slower_first, range(5)) == [0, 10, 20, 30, 40]


async def test_no_items_no_work() -> None:
    async def never(item: int) -> int:
        raise AssertionError("called")

    assert await map_all(never, []) == []


@pytest.mark.parametrize(("limit", "most"), [(None, 8), (1, 1), (3, 3), (20, 8)])
async def test_at_most_limit_run_at_once(limit: int | None, most: int) -> None:
    running, seen = 0, 0
    gate = asyncio.Event()

    async def work(item: int) -> int:
        nonlocal running, seen
        running += 1
        seen = max(seen, running)
        await asyncio.sleep(0)
        if running == most:
            gate.set()
        await gate.wait()
        running -= 1
        return item

    assert await map_all(work, range(8), limit=limit) == list(range(8))
    assert seen == most


async def test_the_first_failure_is_raised_alone_and_cancels_the_rest() -> None:
    cancelled: list[int] = []
    started = asyncio.Event()

    async def work(item: int) -> int:
        if item == 0:
            await started.wait()
            raise LookupError("the first failure")
        try:
            started.set()
            await asyncio.Event().wait()  # never set: only cancellation ends it
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        return item

    with pytest.raises(LookupError, match="the first failure") as caught:
        await map_all(work, range(4))
    assert sorted(cancelled) == [1, 2, 3]
    assert not isinstance(caught.value.__context__, BaseExceptionGroup)


async def test_items_queued_behind_a_failure_never_start() -> None:
    started: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if item == 1:
            raise ValueError("stop")
        return item

    with pytest.raises(ValueError, match="stop"):
        await map_all(work, range(10), limit=1)
    assert started == [0, 1]


async def test_repeating_work_survives_a_failure_and_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    done = asyncio.Event()

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("the first run fails")
        if len(runs) == 3:
            done.set()

    repeating = Repeating(work, lambda: 0.0, "test work")
    repeating.start()
    await asyncio.wait_for(done.wait(), 5)
    await repeating.stop()
    stopped_at = len(runs)
    await asyncio.sleep(0)  # a stopped loop runs no more
    assert len(runs) == stopped_at >= 3
    assert "test work failed" in caplog.text
