"""A WARNING logged at most once per interval per kind: handled events must not flood the log."""

from __future__ import annotations

import logging
import time
from typing import Any


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        """Log ``msg`` unless ``kind`` was logged within the interval; True when it was logged."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        n = self._suppressed.pop(kind, 0)
        if n:
            msg += f" (+{n} similar in the last {self.interval_s:g}s)"
        self.logger.warning(msg, *args)
        return True
