"""The blocking-call runner both stores use: off the loop, bounded, timed, translated."""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker.stores.runner import BlockingRunner


class Translated(Exception):
    pass


def translate(exc: Exception) -> Exception | None:
    if isinstance(exc, TimeoutError):
        return Translated("timed out")
    if isinstance(exc, KeyError):
        return Translated(f"translated {exc}")
    return None


async def test_calls_run_off_the_event_loop_on_the_runner_threads() -> None:
    runner = BlockingRunner("test-runner", workers=2)
    try:
        name = await runner.run(lambda: threading.current_thread().name)
    finally:
        await runner.close()
    assert name.startswith("test-runner") and name != threading.current_thread().name


async def test_failures_are_translated_and_others_pass_through() -> None:
    runner = BlockingRunner("test-runner", translate=translate)

    empty: dict[str, int] = {}

    def lookup() -> int:
        return empty["missing"]

    def divide() -> float:
        return 1 / 0

    try:
        with pytest.raises(Translated, match="translated 'missing'") as caught:
            await runner.run(lookup)
        assert isinstance(caught.value.__cause__, KeyError)
        with pytest.raises(ZeroDivisionError):
            await runner.run(divide)
    finally:
        await runner.close()


async def test_a_call_over_the_timeout_fails_and_the_time_counts_from_a_free_thread() -> None:
    release = threading.Event()
    runner = BlockingRunner("test-runner", workers=1, timeout=0.5, translate=translate)
    try:
        with pytest.raises(Translated, match="timed out"):
            await runner.run(lambda: release.wait(5))  # holds the one thread past its timeout
        release.set()
        # Two calls of 0.3 s each on the one thread: the third waits 0.6 s in all, more than
        # the timeout, yet is not charged for the wait.
        busy = [asyncio.create_task(runner.run(lambda: threading.Event().wait(0.3))) for _ in "ab"]
        assert await runner.run(lambda: "done") == "done"
        assert await asyncio.gather(*busy) == [False, False]
    finally:
        release.set()
        await runner.close()


async def test_at_most_workers_calls_run_at_once() -> None:
    lock = threading.Lock()
    running, most = 0, 0

    def call() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.02)
        with lock:
            running -= 1

    runner = BlockingRunner("test-runner", workers=3, timeout=5.0)
    try:
        await asyncio.gather(*(runner.run(call) for _ in range(9)))
    finally:
        await runner.close()
    assert most == 3


async def test_close_runs_the_last_call_after_the_queued_ones() -> None:
    order: list[str] = []
    runner = BlockingRunner("test-runner")
    queued = asyncio.create_task(runner.run(lambda: order.append("queued")))
    await asyncio.sleep(0)  # the queued call is submitted
    await runner.close(lambda: order.append("last"))
    await queued
    assert order == ["queued", "last"]


def test_call_now_runs_on_the_pool_without_an_event_loop() -> None:
    runner = BlockingRunner("test-runner")
    try:
        assert runner.call_now(lambda: threading.current_thread().name).startswith("test-runner")
    finally:
        runner.shutdown()
