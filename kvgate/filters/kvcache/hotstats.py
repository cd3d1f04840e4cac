"""Hot-content statistics (Pixiu's hot map): recent request timestamps per request key.

Semantics kept from Pixiu: ``record`` runs the sweep if due, appends ``now``, drops timestamps older
than ``window``, keeps the last ``max_records``, then enforces ``max_keys`` by deleting the keys with
the oldest last-seen time. ``is_hot`` = (count within the window) >= threshold, threshold <= 0 → never.
The current request is already counted, so threshold 1 is hot on the first request.

Besides ``max_keys`` there is a byte budget ``max_bytes`` (0 = none): the map's memory is estimated as
``KEY_BYTES`` per key (key string + deque + map entry, measured with ``tracemalloc`` on CPython 3.11)
plus ``STAMP_BYTES`` per timestamp, and the oldest-last-seen keys are evicted while it is over budget.
``approx_bytes`` is that estimate (exported as a gauge by the filter).

Keys are kept in last-seen order (an ``OrderedDict``), which makes the key cap O(1) per eviction.
Pixiu trims every key before evicting; expired keys are exactly the oldest-last-seen prefix of that
order, so evicting from the front removes the same keys.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

SWEEP_FLOOR = 30.0  # seconds: with a window > 30 s, sweep no more often than this
KEY_BYTES = 960  # measured: ~850 B (deque + map entry) + 113 B (64-char hex key)
STAMP_BYTES = 32  # a float object (24 B) + its deque slot


def sweep_interval(window: float) -> float:
    """At most every ``window / 2``; never more often than every 30 s when the window exceeds 30 s."""
    half = window / 2
    return max(half, SWEEP_FLOOR) if window > SWEEP_FLOOR else half


class HotStats:
    def __init__(
        self,
        window: float,
        max_records: int,
        max_keys: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = 0,
    ):
        self.window = window
        self.max_records = max(1, max_records)
        self.max_keys = max(0, max_keys)
        self.max_bytes = max(0, max_bytes)
        self._stamps = 0  # total timestamps held (for approx_bytes)
        self._clock = clock
        self._data: OrderedDict[str, deque[float]] = OrderedDict()
        self._next_sweep: float | None = None  # None: the first call always sweeps
        self.sweeps = 0
        self.evicted_keys = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def approx_bytes(self) -> int:
        """Estimated memory held by the map (see the module docstring)."""
        return len(self._data) * KEY_BYTES + self._stamps * STAMP_BYTES

    def _trim(self, key: str, stamps: deque[float], now: float) -> None:
        cutoff = now - self.window
        while stamps and stamps[0] < cutoff:
            stamps.popleft()
            self._stamps -= 1
        if not stamps:
            del self._data[key]

    def _evict_oldest(self) -> None:
        _, stamps = self._data.popitem(last=False)
        self._stamps -= len(stamps)
        self.evicted_keys += 1

    def sweep(self, now: float | None = None) -> None:
        """Trim every key; delete the empty ones."""
        now = self._clock() if now is None else now
        for key, stamps in list(self._data.items()):
            self._trim(key, stamps, now)
        self.sweeps += 1
        self._next_sweep = now + sweep_interval(self.window)

    def record(self, key: str) -> int:
        """Count one request for ``key``; returns its count within the window."""
        now = self._clock()
        if self._next_sweep is None or now >= self._next_sweep:
            self.sweep(now)
        stamps = self._data.get(key)
        if stamps is None:
            stamps = deque(maxlen=self.max_records)
            self._data[key] = stamps
        else:
            self._data.move_to_end(key)
        if len(stamps) < self.max_records:
            self._stamps += 1  # a full deque drops its oldest stamp on append
        stamps.append(now)
        self._trim(key, stamps, now)
        if self.max_keys:
            while len(self._data) > self.max_keys:
                self._evict_oldest()
        if self.max_bytes:
            while len(self._data) > 1 and self.approx_bytes > self.max_bytes:
                self._evict_oldest()
        return len(stamps)

    def count(self, key: str) -> int:
        stamps = self._data.get(key)
        if stamps is None:
            return 0
        self._trim(key, stamps, self._clock())
        return len(stamps) if key in self._data else 0

    def is_hot(self, key: str, threshold: int) -> bool:
        if threshold <= 0 or not key:
            return False
        return self.count(key) >= threshold
