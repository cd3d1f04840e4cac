"""CacheManager: per-instance pin / compress / evict decisions in virtual time."""

from __future__ import annotations

import pytest

from kvgate.filters.kvcache.engine_signals import EngineSnapshot
from kvgate.filters.kvcache.management import CacheManager, ManagementPolicy, memory_ratio


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def snap(inst: str, kv: float = 0.1, running: float = 0, waiting: float = 0, at: float = 1000.0) -> EngineSnapshot:
    return EngineSnapshot(inst, kv_usage=kv, running=running, waiting=waiting, at=at)


POLICY = ManagementPolicy(
    enable_pinning=True,
    enable_compression=True,
    enable_eviction=True,
    memory_threshold=0.8,
    load_threshold=0.9,
    hot_content_threshold=3,
    pin_ttl=60.0,
    max_pinned_share=0.2,
)


def kinds(d: object) -> list[tuple[str, str, str]]:
    return [(a.kind, a.instance, a.reason) for a in d.actions]  # type: ignore[attr-defined]


def test_pin_hot_prefix_on_holders_not_under_pressure() -> None:
    clock = Clock()
    m = CacheManager(POLICY, capacity_chunks={"a": 100, "b": 100}, clock=clock)
    sig = {"a": snap("a", kv=0.3), "b": snap("b", kv=0.85), "c": snap("c")}
    d = m.decide("k1", ["a", "b"], sig, hot_count=3, prefix_chunks=8)
    assert kinds(d) == [("pin", "a", "hot_content")]  # c holds nothing; b is under memory pressure
    assert ("pin", "b", "memory_pressure") in [(s.action, s.instance, s.reason) for s in d.skipped]
    # b is under pressure but the prefix is hot: never evicted
    assert ("evict", "b", "hot") in [(s.action, s.instance, s.reason) for s in d.skipped]
    assert m.is_pinned("a", "k1") and not m.is_pinned("b", "k1") and m.pinned_chunks("a") == 8
    # not hot yet: nothing pinned
    assert kinds(m.decide("k2", ["a"], sig, hot_count=2, prefix_chunks=4)) == []


def test_pinned_share_cap_and_unknown_capacity() -> None:
    m = CacheManager(POLICY, capacity_chunks={"a": 50}, clock=Clock())  # cap: floor(0.2 × 50) = 10 chunks
    sig = {"a": snap("a"), "z": snap("z")}
    assert kinds(m.decide("k1", ["a"], sig, 5, 6)) == [("pin", "a", "hot_content")]
    d = m.decide("k2", ["a"], sig, 5, 5)  # 6 + 5 > 10
    assert kinds(d) == [] and d.skipped[0].reason == "pin_cap"
    assert kinds(m.decide("k3", ["a"], sig, 5, 4)) == [("pin", "a", "hot_content")]  # 6 + 4 = 10
    assert m.pinned_share("a") == pytest.approx(0.2)
    d = m.decide("k4", ["z"], sig, 5, 1)
    assert kinds(d) == [] and d.skipped[0].reason == "capacity_unknown"


def test_pins_renew_when_hot_lapse_on_ttl_and_unpin_when_cooled() -> None:
    clock = Clock()
    m = CacheManager(POLICY, capacity_chunks={"a": 100}, clock=clock)
    sig = {"a": snap("a")}
    assert kinds(m.decide("k", ["a"], sig, 3, 4)) == [("pin", "a", "hot_content")]
    clock.t += 10
    sig = {"a": snap("a", at=clock.t)}
    assert kinds(m.decide("k", ["a"], sig, 4, 4)) == []  # renewed only after half the TTL
    clock.t += 25
    sig = {"a": snap("a", at=clock.t)}
    assert kinds(m.decide("k", ["a"], sig, 4, 4)) == [("pin", "a", "renew")]
    clock.t += 59
    assert m.expire() == [] and m.is_pinned("a", "k")
    clock.t += 2
    lapsed = m.expire()
    assert [(a.kind, a.key, a.chunks) for a in lapsed] == [("lapse", "k", 4)] and m.pinned_chunks("a") == 0
    sig = {"a": snap("a", at=clock.t)}
    m.decide("k", ["a"], sig, 3, 4)
    assert m.is_pinned("a", "k")
    clock.t += 1
    d = m.decide("k", ["a"], {"a": snap("a", at=clock.t)}, 1, 4)  # cooled
    assert kinds(d) == [("unpin", "a", "cooled")] and m.pinned_chunks("a") == 0


def test_evict_and_compress_target_the_instance_under_pressure_only() -> None:
    m = CacheManager(POLICY, capacity_chunks={"a": 100, "b": 100}, max_num_seqs={"b": 10}, clock=Clock())
    sig = {"a": snap("a", kv=0.95), "b": snap("b", kv=0.2, running=9)}
    d = m.decide("cold", ["a", "b"], sig, hot_count=1, prefix_chunks=2)
    assert kinds(d) == [("evict", "a", "memory_threshold"), ("compress", "b", "high_load")]
    # LMCache CPU-tier usage counts as memory too
    s = EngineSnapshot("c", kv_usage=0.1, lmcache_cpu_usage=0.9, at=1000.0)
    assert memory_ratio(s) == 0.9
    assert kinds(m.decide("cold", ["c"], {"c": s}, 1, 2)) == [("evict", "c", "memory_threshold")]
    # waiting requests make an instance loaded even without max_num_seqs
    assert kinds(m.decide("cold", ["d"], {"d": snap("d", waiting=2)}, 1, 2)) == [("compress", "d", "high_load")]


def test_pinned_prefix_is_never_compressed_or_evicted_and_stale_signals_decide_nothing() -> None:
    clock = Clock()
    m = CacheManager(POLICY, capacity_chunks={"a": 100}, clock=clock)
    m.decide("k", ["a"], {"a": snap("a")}, 3, 4)
    d = m.decide("k", ["a"], {"a": snap("a", kv=0.1, waiting=5)}, 3, 4)
    assert kinds(d) == [] and [(s.action, s.reason) for s in d.skipped] == [("compress", "pinned")]
    clock.t += 100  # default max_age 5 s
    d = m.decide("x", ["a"], {"a": snap("a", kv=0.99, at=1000.0)}, 0, 4)
    assert [a.kind for a in d.actions] == ["lapse"] and d.skipped[0].reason == "no_signals"
    assert kinds(m.decide("x", ["q"], {}, 0, 4)) == []


def test_disabled_and_threshold_zero_mean_never() -> None:
    m = CacheManager(ManagementPolicy(), capacity_chunks={"a": 100}, clock=Clock())
    assert kinds(m.decide("k", ["a"], {"a": snap("a", kv=1.0, waiting=9)}, 100, 4)) == []
    m = CacheManager(ManagementPolicy(enable_pinning=True, enable_eviction=True), capacity_chunks={"a": 9})
    assert kinds(m.decide("k", ["a"], {"a": snap("a", kv=1.0, at=m._clock())}, 100, 1)) == []
    with pytest.raises(ValueError):
        ManagementPolicy(memory_threshold=1.5)
    with pytest.raises(ValueError):
        ManagementPolicy(pin_ttl=0)


def test_forget_instance_and_pin_failed_release_the_share() -> None:
    m = CacheManager(POLICY, capacity_chunks={"a": 100}, clock=Clock())
    m.decide("k", ["a"], {"a": snap("a")}, 3, 10)
    m.pin_failed("a", "k")
    assert m.pinned_chunks("a") == 0
    m.decide("k", ["a"], {"a": snap("a")}, 3, 10)
    assert m.pins() == {"a": ["k"]}
    m.forget_instance("a")
    assert m.pins() == {}


def test_pin_is_not_renewed_under_pressure_and_lapses() -> None:
    clock = Clock()
    m = CacheManager(POLICY, capacity_chunks={"a": 100}, clock=clock)
    m.decide("k", ["a"], {"a": snap("a")}, 3, 4)
    clock.t += 40  # past half the TTL, still hot, but now under memory pressure
    d = m.decide("k", ["a"], {"a": snap("a", kv=0.9, at=clock.t)}, 5, 4)
    assert kinds(d) == [] and ("pin", "memory_pressure") in [(s.action, s.reason) for s in d.skipped]
    clock.t += 21
    assert [a.kind for a in m.expire()] == ["lapse"]
