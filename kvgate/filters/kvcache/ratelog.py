"""Rate-limited logging: an event's WARNING goes out at most once per interval; the rest are counted.

``LogLimiter.allow(event)`` returns ``None`` while the event is suppressed, else how many occurrences were
suppressed since the last line (so the line can say so). Pure logic with an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_LOG_INTERVAL = 30.0  # seconds


class LogLimiter:
    def __init__(
        self,
        interval: float = DEFAULT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[str], None] = lambda event: None,
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
