from __future__ import annotations

import asyncio

import pytest

from kvgate.errors import CircuitOpen, DeadlineExceeded
from kvgate.filters.kvcache.errors import (
    CallTimeout,
    CircuitOpenError,
    KVCacheError,
    PoolTimeout,
    StatusError,
    TransportError,
)
from kvgate.resilience import BreakerState, CircuitBreaker, RetryPolicy, retry_call


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def breaker(clock: Clock, threshold: int = 3, recovery: float = 10, half_open: int = 2) -> CircuitBreaker:
    return CircuitBreaker("t", threshold, recovery, half_open, clock)


def test_breaker_opens_after_threshold_and_rejects() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == BreakerState.CLOSED
    b.record_failure()
    assert b.state == BreakerState.OPEN
    clock.t += 9.99
    assert not b.allow() and not b.would_allow()


def test_breaker_success_resets_failure_count_when_closed() -> None:
    b = breaker(Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == BreakerState.CLOSED and b.half_open_calls == 0


def test_breaker_half_open_trial_accounting_and_single_success_closes() -> None:
    clock = Clock()
    b = breaker(clock, half_open=2)
    for _ in range(3):
        b.record_failure()
    clock.t += 10
    assert b.allow()  # Open → HalfOpen transition call: allowed, not counted
    assert b.state == BreakerState.HALF_OPEN and b.half_open_calls == 0
    assert b.allow() and b.allow()  # two counted trial calls
    assert not b.allow()  # 1 + half_open_max_calls in total
    b.record_success()
    assert b.state == BreakerState.CLOSED and b.failure_count == 0 and b.half_open_calls == 0


def test_breaker_half_open_failure_reopens() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.t += 10
    assert b.allow()
    b.record_failure()  # failure count was not reset: 4 >= 3
    assert b.state == BreakerState.OPEN
    assert not b.allow()
    clock.t += 10
    assert b.allow() and b.state == BreakerState.HALF_OPEN


async def test_breaker_call_counts_and_rejects() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    b = CircuitBreaker("x", 2, 5, 1, clock, on_change=lambda br: changes.append(br.state))

    async def fail() -> int:
        raise TransportError("down")

    async def bad_request() -> int:
        raise StatusError("lookup", 422, "bad")

    with pytest.raises(StatusError):
        await b.call(bad_request)  # alive upstream: not a failure
    assert b.failure_count == 0
    for _ in range(2):
        with pytest.raises(TransportError):
            await b.call(fail)
    assert b.state == BreakerState.OPEN and changes == [BreakerState.OPEN]
    with pytest.raises(CircuitOpen, match="x circuit breaker open"):
        await b.call(fail)


async def test_kvcache_error_types_plug_into_the_shared_breaker_and_retry() -> None:
    # The kvcache filter passes its own classes: its `except KVCacheError` / `except CircuitOpenError` still apply.
    clock = Clock()
    b = CircuitBreaker("lookup", 1, 5, 1, clock, open_error=CircuitOpenError)

    async def fail() -> int:
        raise TransportError("down")

    with pytest.raises(TransportError):
        await b.call(fail)
    with pytest.raises(CircuitOpenError, match=r"\[kvcache\] lookup circuit breaker open") as info:
        await b.call(fail)
    assert isinstance(info.value, KVCacheError)

    async def pool_wait() -> int:
        raise PoolTimeout("no slot")

    clock.t += 5
    assert b.allow() and b.state == BreakerState.HALF_OPEN  # the uncounted transition call
    with pytest.raises(PoolTimeout):
        await b.call(pool_wait)  # a local wait: the trial slot is given back, nothing counted
    assert b.state == BreakerState.HALF_OPEN and b.half_open_calls == 0 and b.failure_count == 1
    loop = asyncio.get_running_loop()
    with pytest.raises(CallTimeout) as late:
        await retry_call(fail, RetryPolicy(deadline_error=CallTimeout), deadline=loop.time() - 1)
    assert isinstance(late.value, KVCacheError)


def test_backoff_schedule() -> None:
    p = RetryPolicy(max_attempts=5, base_backoff=0.1, max_backoff=0.4)
    assert [p.backoff(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])
    p = RetryPolicy(base_backoff=0.1, max_backoff=2.0, jitter=True)
    for n in range(4):
        d = p.backoff(n)
        assert 0.05 * 2**n <= d <= 0.1 * 2**n


def _failing(errors: list[Exception], calls: list[int], result: str = "ok"):  # type: ignore[no-untyped-def]
    async def fn() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return fn


async def test_retry_success_after_two_502s_and_schedule() -> None:
    sleeps: list[float] = []

    async def sleep(d: float) -> None:
        sleeps.append(d)

    calls: list[int] = []
    fn = _failing([StatusError("lookup", 502, ""), StatusError("lookup", 502, "")], calls, "evt-1")
    assert await retry_call(fn, RetryPolicy(3, 0.1, 2.0), sleep=sleep) == "evt-1"
    assert len(calls) == 3 and sleeps == pytest.approx([0.1, 0.2])


async def test_no_sleep_after_last_attempt() -> None:
    sleeps: list[float] = []

    async def sleep(d: float) -> None:
        sleeps.append(d)

    calls: list[int] = []
    fn = _failing([TransportError(str(i)) for i in range(4)], calls)
    with pytest.raises(TransportError, match="2"):
        await retry_call(fn, RetryPolicy(3, 0.1, 0.4), sleep=sleep)
    assert len(calls) == 3 and sleeps == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize("status", [400, 404, 405, 422])
async def test_4xx_not_retried(status: int) -> None:
    calls: list[int] = []
    with pytest.raises(StatusError):
        await retry_call(_failing([StatusError("pin", status, "")], calls), RetryPolicy(3, 0.001, 0.001))
    assert len(calls) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_retryable_statuses(status: int) -> None:
    calls: list[int] = []
    assert await retry_call(_failing([StatusError("pin", status, "")], calls), RetryPolicy(3, 0.001, 0.001)) == "ok"
    assert len(calls) == 2


async def test_breaker_open_not_retried() -> None:
    calls: list[int] = []
    with pytest.raises(CircuitOpenError):
        await retry_call(_failing([CircuitOpenError("lookup")], calls), RetryPolicy(3, 0.001, 0.001))
    assert len(calls) == 1


async def test_cancellation_during_backoff() -> None:
    calls: list[int] = []
    task = asyncio.create_task(retry_call(_failing([TransportError("x")] * 3, calls), RetryPolicy(3, 10.0, 10.0)))
    await asyncio.sleep(0.02)
    assert len(calls) == 1  # sleeping in the 10 s backoff
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)


async def test_deadline_cuts_backoff_short() -> None:
    # Pixiu: 100 ms backoff with a 20 ms context → returns at the deadline. Here: at once, no pointless sleep.
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    t0 = loop.time()
    with pytest.raises(TransportError):
        await retry_call(_failing([TransportError("x")] * 3, calls), RetryPolicy(3, 0.1, 2.0), deadline=t0 + 0.02)
    assert len(calls) == 1 and loop.time() - t0 < 0.05
    with pytest.raises(DeadlineExceeded):
        await retry_call(_failing([], calls), RetryPolicy(), deadline=loop.time() - 1)


async def test_cancelled_half_open_trials_give_their_slot_back() -> None:
    # Regression: trials cancelled by something other than their deadline (client gone) used to keep
    # their half-open slot forever, so the breaker could never close again.
    now = [0.0]
    b = CircuitBreaker("c", 1, 10, 1, lambda: now[0])
    b.record_failure()
    assert b.state == BreakerState.OPEN
    now[0] = 11.0

    async def hang() -> None:
        await asyncio.sleep(30)

    for _ in range(3):  # the uncounted transition call, then trials, all cancelled
        t = asyncio.create_task(b.call(hang))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert b.state == BreakerState.HALF_OPEN
    assert b.would_allow()

    async def ok() -> int:
        return 1

    assert await b.call(ok) == 1
    assert b.state == BreakerState.CLOSED
