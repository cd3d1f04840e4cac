"""kvgate.deadlines: asyncio.timeout's behaviour for many waits of one length on one lazily re-armed timer."""

from __future__ import annotations

import asyncio

import pytest

from kvgate.deadlines import Deadlines


async def test_a_wait_longer_than_the_delay_raises_timeout_error() -> None:
    d = Deadlines(0.05)
    with pytest.raises(TimeoutError):
        with d.wait():
            await asyncio.sleep(5)
    assert len(d) == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # the cancel was taken back


async def test_a_wait_that_ends_in_time_is_not_cancelled_and_later_waits_still_expire() -> None:
    d = Deadlines(0.1)
    with d.wait():
        await asyncio.sleep(0)  # the timer armed for this wait outlives it
    assert len(d) == 0
    # the timer fires for the finished wait, finds this one not yet due and re-arms for it
    await asyncio.sleep(0.02)
    with pytest.raises(TimeoutError):
        with d.wait():
            await asyncio.sleep(5)


async def test_only_the_waits_past_their_deadline_expire() -> None:
    d = Deadlines(0.2)

    async def waiter(seconds: float) -> str:
        try:
            with d.wait():
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(waiter(5), waiter(0.01), waiter(5), waiter(0))
    assert results == ["timeout", "done", "timeout", "done"]
    assert len(d) == 0


async def test_a_cancellation_from_outside_is_not_turned_into_a_timeout() -> None:
    d = Deadlines(10)
    seen: list[str] = []

    async def waiter() -> None:
        try:
            with d.wait():
                await asyncio.sleep(5)
        except TimeoutError:
            seen.append("timeout")
            raise

    t = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert seen == []
    assert len(d) == 0


async def test_an_exception_inside_the_block_passes_through_and_leaves_the_fifo() -> None:
    d = Deadlines(10)
    with pytest.raises(KeyError):
        with d.wait():
            raise KeyError("x")
    assert len(d) == 0


def test_delay_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Deadlines(0)


def test_one_instance_serves_a_new_loop_after_the_first_closed() -> None:
    d = Deadlines(0.05)

    async def expire() -> str:
        try:
            with d.wait():
                await asyncio.sleep(5)
        except TimeoutError:
            return "timeout"
        return "done"

    assert asyncio.run(expire()) == "timeout"
    assert asyncio.run(expire()) == "timeout"


def test_wait_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Deadlines(1).wait()
