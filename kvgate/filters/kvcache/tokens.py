"""Token cache: a true LRU with ``max_size`` and ``ttl`` (Pixiu evicts an arbitrary entry; we fix that).

Tokens are stored compactly (``array('I')``). ``max_size`` 0 = unbounded, ``ttl`` 0 = no expiry.
An expired entry is removed when read (and counts as a miss) and also on every write: ``put`` drops the
entries whose ttl has passed, oldest write first, so a cache with a ttl but no ``max_size`` stays bounded
by the write rate × ttl instead of growing with every distinct key ever seen. Amortised O(1) per write.
Single-threaded (event loop) use only.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvgate.token_ids import token_array


@dataclass(frozen=True, slots=True)
class TokenCacheStats:
    size: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class TokenCache:
    def __init__(self, max_size: int = 0, ttl: float = 0.0, clock: Callable[[], float] = time.monotonic):
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        self._data: OrderedDict[str, tuple[array[int], float]] = OrderedDict()
        # (expiry, key) in write order; with one ttl for all entries expiry is non-decreasing along it.
        self._expiry: deque[tuple[float, str]] = deque()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, *, count: bool = True) -> list[int] | None:
        """Tokens for ``key`` (refreshing its LRU position) or ``None``. ``count=False`` skips hit/miss stats."""
        item = self._data.get(key)
        if item is not None and self.ttl > 0 and self._clock() >= item[1]:
            del self._data[key]
            item = None
        if item is None:
            if count:
                self.misses += 1
            return None
        self._data.move_to_end(key)
        if count:
            self.hits += 1
        return item[0].tolist()

    def get_array(self, key: str) -> array[int] | None:
        """``get`` without the copy to a list: the stored ``array('I')`` (do not modify it)."""
        item = self._data.get(key)
        if item is not None and self.ttl > 0 and self._clock() >= item[1]:
            del self._data[key]
            item = None
        if item is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[0]

    def contains(self, key: str) -> bool:
        """Whether ``key`` holds unexpired tokens (no copy, no stats, no LRU refresh)."""
        item = self._data.get(key)
        return item is not None and not (self.ttl > 0 and self._clock() >= item[1])

    def put(self, key: str, tokens: Sequence[int]) -> array[int]:
        """Store (or replace) ``key``; evicts least-recently-used entries beyond ``max_size``. Returns the stored
        ``array('I')`` (do not modify it)."""
        now = self._clock()
        if self.ttl > 0:
            self.purge_expired(now)
        expires = now + self.ttl if self.ttl > 0 else float("inf")
        stored = token_array(tokens)
        self._data[key] = (stored, expires)
        self._data.move_to_end(key)
        if self.ttl > 0:
            self._expiry.append((expires, key))
            if len(self._expiry) > 2 * len(self._data) + 64:  # stale marks (rewrites, LRU evictions): compact
                self._expiry = deque(sorted((exp, k) for k, (_, exp) in self._data.items()))
        if self.max_size > 0:
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)
                self.evictions += 1
        return stored

    def purge_expired(self, now: float | None = None) -> int:
        """Drop every entry whose ttl has passed; returns how many were dropped."""
        now = self._clock() if now is None else now
        dropped = 0
        q = self._expiry
        while q and q[0][0] <= now:
            expires, key = q.popleft()
            item = self._data.get(key)
            if item is not None and item[1] == expires:  # not rewritten since (a rewrite queued a later expiry)
                del self._data[key]
                dropped += 1
        self.expired += dropped
        return dropped

    def clear(self) -> None:
        self._data.clear()
        self._expiry.clear()

    def stats(self) -> TokenCacheStats:
        return TokenCacheStats(size=len(self._data), hits=self.hits, misses=self.misses)
