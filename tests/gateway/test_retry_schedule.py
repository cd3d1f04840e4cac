"""The proxy's per-endpoint ``retry_policy`` (Pixiu's NoRetry / CountBased / ExponentialBackoff) as a schedule of
the shared :class:`kvgate.resilience.RetryPolicy` (pure: no I/O)."""

from __future__ import annotations

import random

import pytest

from kvgate.config import RetryPolicy as RetryPolicyConfig
from kvgate.resilience import RetryPolicy


def schedule(name: str, **config: object) -> RetryPolicy:
    cfg = RetryPolicyConfig.model_validate({"name": name, "config": config})
    return RetryPolicy.from_pixiu(cfg.name, cfg.config)


def test_no_retry_is_one_attempt_whatever_times_says() -> None:
    p = schedule("NoRetry", times=5)
    assert p.max_attempts == 1


def test_count_based_retries_times_without_waiting() -> None:
    p = schedule("CountBased", times=3)
    assert p.max_attempts == 4
    assert [p.backoff(n) for n in range(3)] == [0.0, 0.0, 0.0]
    assert schedule("countbased").max_attempts == 3  # times defaults to 2; names are case-insensitive


def test_exponential_backoff_grows_by_the_multiplier_up_to_the_cap_plus_100ms_jitter() -> None:
    p = schedule("ExponentialBackoff", times=4, initialInterval="100ms", maxInterval="1s", multiplier=3)
    assert p.max_attempts == 5
    rng = random.Random(4)
    waits = [p.backoff(n, rng) for n in range(4)]
    base = [0.1, 0.3, 0.9, 1.0]  # min(100ms × 3**n, 1s)
    for w, b in zip(waits, base, strict=True):
        assert b <= w < b + 0.1
    assert len({round(w - b, 9) for w, b in zip(waits, base, strict=True)}) > 1  # the jitter is random
    assert RetryPolicy.from_pixiu("ExponentialBackoff", {}).backoff(0, random.Random(0)) == pytest.approx(
        0.1 + random.Random(0).random() * 0.1
    )  # Pixiu defaults: 100ms initial, 5s cap, ×2
