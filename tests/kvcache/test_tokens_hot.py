from __future__ import annotations

from kvgate.filters.kvcache.hotstats import HotStats, sweep_interval
from kvgate.filters.kvcache.tokens import TokenCache


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_token_cache_lru_eviction() -> None:
    c = TokenCache(max_size=2)
    c.put("a", [1])
    c.put("b", [2])
    assert c.get("a") == [1]  # a is now most recent
    c.put("c", [3])  # evicts b (least recently used), not an arbitrary entry
    assert c.get("b") is None
    assert c.get("a") == [1] and c.get("c") == [3]
    assert len(c) == 2 and c.evictions == 1


def test_token_cache_ttl_and_stats() -> None:
    clock = Clock()
    c = TokenCache(max_size=0, ttl=10, clock=clock)
    assert c.get("k") is None
    c.put("k", [5, 6])
    clock.t += 9.9
    assert c.get("k") == [5, 6]
    clock.t += 0.2
    assert c.get("k") is None  # expired → removed, counted as miss
    s = c.stats()
    assert (s.size, s.hits, s.misses) == (0, 1, 2)
    assert s.hit_rate == 1 / 3
    assert c.get("k", count=False) is None and c.stats().misses == 2


def test_token_cache_pixiu_get_tokens_case() -> None:
    c = TokenCache()
    assert c.get("k") is None
    c.put("k", [1, 2, 3])
    assert c.get("k") == [1, 2, 3]
    s = c.stats()
    assert (s.size, s.hits, s.misses, s.hit_rate) == (1, 1, 1, 0.5)


def test_token_cache_unbounded_and_no_ttl() -> None:
    clock = Clock()
    c = TokenCache(clock=clock)
    for i in range(100):
        c.put(str(i), [i])
    clock.t += 1e9
    assert len(c) == 100 and c.get("0") == [0]


def test_hot_window_counts_and_threshold() -> None:
    clock = Clock()
    h = HotStats(window=60, max_records=300, clock=clock)
    assert h.record("k") == 1
    assert h.is_hot("k", 1)  # current request already counted
    assert not h.is_hot("k", 2)
    clock.t += 30
    h.record("k")
    assert h.is_hot("k", 2)
    clock.t += 31  # first stamp now older than the window
    assert h.count("k") == 1 and not h.is_hot("k", 2)
    assert not h.is_hot("k", 0) and not h.is_hot("", 1)


def test_hot_max_records_caps_count() -> None:
    clock = Clock()
    h = HotStats(window=60, max_records=3, clock=clock)
    for _ in range(10):
        h.record("k")
    assert h.count("k") == 3
    assert not h.is_hot("k", 4)  # a threshold above max_records is never reached


def test_hot_max_keys_evicts_oldest_last_seen() -> None:
    clock = Clock()
    h = HotStats(window=600, max_records=10, max_keys=2, clock=clock)
    h.record("a")
    clock.t += 1
    h.record("b")
    clock.t += 1
    h.record("a")  # a last seen after b
    clock.t += 1
    h.record("c")  # over cap → evict b (oldest last-seen)
    assert h.count("b") == 0 and h.count("a") == 2 and h.count("c") == 1
    assert len(h) == 2 and h.evicted_keys == 1


def test_hot_sweep_cadence() -> None:
    assert sweep_interval(10) == 5
    assert sweep_interval(40) == 30
    assert sweep_interval(300) == 150
    clock = Clock()
    h = HotStats(window=10, max_records=10, clock=clock)
    h.record("old")
    assert h.sweeps == 1  # the first call always sweeps
    clock.t += 4
    h.record("x")
    assert h.sweeps == 1
    clock.t += 7  # "old" expired; 11 s since the first sweep ≥ 5 s
    h.record("y")
    assert h.sweeps == 2
    assert len(h) == 2  # "old" removed by the sweep without being read


def test_contains_honours_ttl_without_counting() -> None:
    from kvgate.filters.kvcache.tokens import TokenCache

    now = [0.0]
    c = TokenCache(max_size=4, ttl=10.0, clock=lambda: now[0])
    c.put("k", [1, 2])
    assert c.contains("k") and not c.contains("x")
    assert (c.hits, c.misses) == (0, 0)
    now[0] = 10.0
    assert not c.contains("k")
