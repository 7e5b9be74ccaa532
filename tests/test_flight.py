"""Keyed locks and single flight (broker.flight), with real asyncio tasks and no sleeps."""

from __future__ import annotations

import asyncio
import functools

import pytest

from broker.flight import KeyedLocks, SingleFlight


def test_one_lock_per_key() -> None:
    locks = KeyedLocks()
    assert locks["acme"] is locks["acme"]
    assert locks["acme"] is not locks["globex"]


async def test_a_held_lock_holds_up_its_key_only() -> None:
    locks = KeyedLocks()
    async with locks["acme"]:
        assert locks["acme"].locked()
        assert not locks["globex"].locked()
        async with locks["globex"]:  # another key is free meanwhile
            pass
    assert not locks["acme"].locked()


async def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return runs

    first = asyncio.create_task(flight.run("acme", work))
    await started.wait()
    others = [asyncio.create_task(flight.run("acme", work)) for _ in range(5)]
    await asyncio.sleep(0)  # let the waiters reach the running future
    release.set()
    assert await first == 1
    assert await asyncio.gather(*others) == [1] * 5
    assert runs == 1
    assert await flight.run("acme", work) == 2  # the next call runs again


async def test_each_key_flies_on_its_own() -> None:
    flight: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()
    started: set[str] = set()
    both = asyncio.Event()

    async def work(key: str) -> str:
        started.add(key)
        if len(started) == 2:
            both.set()
        await release.wait()
        return key

    tasks = [asyncio.create_task(flight.run(k, functools.partial(work, k))) for k in "ab"]
    await both.wait()  # both ran at once: neither waited for the other
    release.set()
    assert await asyncio.gather(*tasks) == ["a", "b"]


async def test_a_failure_reaches_every_caller_and_the_next_call_runs_again() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        raise RuntimeError("Pleo is down")

    first = asyncio.create_task(flight.run("acme", failing))
    await started.wait()
    waiter = asyncio.create_task(flight.run("acme", failing))
    await asyncio.sleep(0)
    release.set()
    for task in (first, waiter):
        with pytest.raises(RuntimeError, match="Pleo is down"):
            await task
    assert calls == 1

    async def fine() -> int:
        return 7

    assert await flight.run("acme", fine) == 7  # nothing left in flight


async def test_a_cancelled_waiter_does_not_cancel_the_run() -> None:
    flight: SingleFlight[str] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        await release.wait()
        return "checked"

    first = asyncio.create_task(flight.run("acme", work))
    await started.wait()
    waiter = asyncio.create_task(flight.run("acme", work))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    assert await first == "checked"
