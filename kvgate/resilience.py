"""Retry policy with exponential backoff and Pixiu's circuit breaker (both with injectable clocks), shared by
the proxy filter (its per-endpoint ``retry_policy``) and the kvcache filter (calls to vLLM and LMCache).

Errors are classified through the core hierarchy in :mod:`kvgate.errors`: :class:`~kvgate.errors.CallError`
(with ``retryable``), :class:`~kvgate.errors.CircuitOpen` and :class:`~kvgate.errors.LocalWaitTimeout`; a filter
subclasses them for its own error types and passes its own classes for the errors raised here
(``open_error``, ``deadline_error``).

Retry (kvcache, fixes Pixiu's: no sleep after the last attempt, 4xx other than 408/429 not retried, optional
jitter, a deadline cuts a backoff short instead of sleeping into it):

* ``backoff(n) = min(base × 2**n, max)`` → 100, 200, 400 ms with defaults;
* :class:`CircuitOpenError` and non-retryable errors are raised at once;
* cancellation propagates immediately (also from inside the backoff sleep).

Proxy retry policies (``llm_meta.retry_policy``, Pixiu's names) map onto the same :class:`RetryPolicy`
(:meth:`RetryPolicy.from_pixiu`): ``NoRetry`` = one attempt; ``CountBased`` = ``times`` + 1 attempts, no wait;
``ExponentialBackoff`` = ``times`` + 1 attempts, ``min(initialInterval × multiplier**n, maxInterval)`` plus up
to 100 ms of random jitter.

Breaker (Pixiu §5, unchanged): Closed → Open after ``failure_threshold`` consecutive failures;
Open → HalfOpen on the first call at least ``recovery_timeout`` after the last failure — that call is
allowed and *not* counted; in HalfOpen up to ``half_open_max_calls`` more trial calls are allowed.
A single success closes it; since the failure count is not reset, one half-open failure reopens it.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvgate.durations import parse_duration
from kvgate.errors import CallError, CircuitOpen, DeadlineExceeded, LocalWaitTimeout

T = TypeVar("T")


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        recovery_timeout: float = 10.0,
        half_open_max_calls: int = 2,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitBreaker], None] | None = None,
        open_error: Callable[[str], Exception] = CircuitOpen,
    ):
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._on_change = on_change
        self._open_error = open_error
        self.state = BreakerState.CLOSED
        self.failure_count = 0
        self.half_open_calls = 0
        self.last_fail_time = 0.0

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self)

    def allow(self) -> bool:
        """Whether a call may proceed now (mutates state like Pixiu's ``Allow``)."""
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.OPEN:
            if self._clock() - self.last_fail_time >= self.recovery_timeout:
                self.half_open_calls = 0
                self._set(BreakerState.HALF_OPEN)
                return True  # the transition call is not counted
            return False
        if self.half_open_calls >= self.half_open_max_calls:
            return False
        self.half_open_calls += 1
        return True

    def would_allow(self) -> bool:
        """Like :meth:`allow` but without side effects (for cheap pre-checks)."""
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.OPEN:
            return self._clock() - self.last_fail_time >= self.recovery_timeout
        return self.half_open_calls < self.half_open_max_calls

    def record_success(self) -> None:
        self.failure_count = 0
        if self.state != BreakerState.CLOSED:
            self.half_open_calls = 0
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self.failure_count += 1
        self.last_fail_time = self._clock()
        if self.failure_count >= self.failure_threshold:
            self._set(BreakerState.OPEN)

    def _give_back_trial(self) -> None:
        """Not an upstream verdict (shutdown, client gone, pool wait): give the trial slot back, or a half-open
        breaker whose trials all ended that way would never close again."""
        if self.state == BreakerState.HALF_OPEN and self.half_open_calls > 0:
            self.half_open_calls -= 1

    async def call(self, fn: Callable[[], Awaitable[T]], *, deadline: float | None = None) -> T:
        """Run ``fn`` through the breaker.

        Counted as failure: a retryable :class:`~kvgate.errors.CallError` (transport, timeout, 5xx, 408/429,
        bad JSON), any other exception, or a cancellation at/after ``deadline`` (loop time: the caller's cap
        fired, i.e. the upstream was too slow). A non-retryable one (4xx) proves the upstream is alive: counted as
        success. Other cancellations (shutdown) are not counted, nor is :class:`~kvgate.errors.LocalWaitTimeout`
        (the call waited for a local connection slot and never reached the upstream). When open, raises
        ``open_error(name)``.
        """
        if not self.allow():
            raise self._open_error(self.name)
        try:
            result = await fn()
        except asyncio.CancelledError:
            if deadline is not None and asyncio.get_running_loop().time() >= deadline - 0.002:
                self.record_failure()
            else:
                self._give_back_trial()
            raise
        except LocalWaitTimeout:
            self._give_back_trial()
            raise
        except CallError as exc:
            if exc.retryable:
                self.record_failure()
            else:
                self.record_success()
            raise
        except Exception:
            self.record_failure()
            raise
        self.record_success()
        return result


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    base_backoff: float = 0.1
    max_backoff: float = 2.0
    jitter: bool = False
    multiplier: float = 2.0
    added_jitter: float = 0.0  # seconds: a uniform random [0, added_jitter) is added to every wait (proxy: 100 ms)
    deadline_error: Callable[[str], Exception] = field(default=DeadlineExceeded, compare=False)

    def backoff(self, n: int, rng: random.Random | None = None) -> float:
        """Wait after failed attempt ``n`` (0-based): ``min(base × multiplier**n, max)``; ``jitter`` scales it by
        [0.5, 1), then ``added_jitter`` adds a uniform random share."""
        delay: float = min(self.base_backoff * (self.multiplier**n), self.max_backoff)
        if self.jitter:
            delay *= 0.5 + 0.5 * (rng or random).random()
        if self.added_jitter:
            delay += (rng or random).random() * self.added_jitter
        return delay

    @classmethod
    def from_pixiu(cls, name: str, config: Mapping[str, Any]) -> RetryPolicy:
        """The proxy's ``retry_policy`` (``NoRetry`` / ``CountBased`` / ``ExponentialBackoff`` with Pixiu's keys,
        validated by :class:`kvgate.config.RetryPolicy`) as a schedule: ``times`` retries after the first try."""
        if name == "NoRetry":
            return cls(max_attempts=1, base_backoff=0.0, max_backoff=0.0)
        times = int(config.get("times", 2))
        if name == "CountBased":
            return cls(max_attempts=times + 1, base_backoff=0.0, max_backoff=0.0)
        return cls(
            max_attempts=times + 1,
            base_backoff=parse_duration(config.get("initialInterval", "100ms")),
            max_backoff=parse_duration(config.get("maxInterval", "5s")),
            multiplier=float(config.get("multiplier", 2.0)),
            added_jitter=0.1,
        )


Sleep = Callable[[float], Awaitable[None]]


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    deadline: float | None = None,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` up to ``policy.max_attempts`` times (``deadline`` in loop time).

    Only a retryable :class:`~kvgate.errors.CallError` is retried; anything else (a circuit breaker's rejection
    included) is raised at once. Raises the last error. No sleep after the last attempt; if the next backoff would
    end past the deadline, the last error is raised at once (the wait could only end in a timeout). A deadline
    already past before an attempt raises ``policy.deadline_error``.
    """
    attempts = max(1, policy.max_attempts)
    loop = asyncio.get_running_loop()
    for n in range(attempts):
        if deadline is not None and loop.time() >= deadline:
            raise policy.deadline_error("deadline exceeded before attempt")
        try:
            return await fn()
        except CallError as exc:
            if not exc.retryable or n == attempts - 1:
                raise
            delay = policy.backoff(n, rng)
            if deadline is not None and loop.time() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(n + 1, exc, delay)
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
