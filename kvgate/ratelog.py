"""Rate-limited logging: an event's WARNING goes out at most once per interval; the rest are counted.

:class:`LogLimiter` is the pure core (injectable clock, a callback per suppressed occurrence, e.g. a metric):
``allow(event)`` returns ``None`` while the event is suppressed, else how many occurrences were suppressed since
the last line, so the line can say so. :class:`RateLimitedLog` is the thin wrapper around a ``logging.Logger``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

DEFAULT_LOG_INTERVAL = 30.0  # seconds


def _ignore(event: str) -> None:
    return None


class LogLimiter:
    def __init__(
        self,
        interval: float = DEFAULT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[str], None] = _ignore,
    ):
        self.interval = interval
        self._clock = clock
        self._on_suppressed = on_suppressed
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, event: str) -> int | None:
        """``None``: do not log (counted as suppressed). Else: log now; the value is the suppressed count."""
        now = self._clock()
        if now < self._next.get(event, float("-inf")):
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            self._on_suppressed(event)
            return None
        self._next[event] = now + self.interval
        return self._suppressed.pop(event, 0)


class RateLimitedLog:
    """``warning(kind, msg, *args)`` through a :class:`LogLimiter`; a line after suppressed ones says how many."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[str], None] = _ignore,
    ):
        self.logger = logger
        self.limiter = LogLimiter(interval_s, clock, on_suppressed)

    @property
    def interval_s(self) -> float:
        return self.limiter.interval

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        """Log ``msg`` unless ``kind`` was logged within the interval; True when it was logged."""
        n = self.limiter.allow(kind)
        if n is None:
            return False
        if n:
            msg += f" (+{n} similar in the last {self.interval_s:g}s)"
        self.logger.warning(msg, *args)
        return True
