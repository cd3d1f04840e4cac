"""ReplicaPlanner: when to warm a second holder of a hot prefix, rate limits, caps and the replica record."""

from __future__ import annotations

import pytest

from kvgate.filters.kvcache.replication import ReplicaPlanner, ReplicationPolicy, Warm, is_overloaded


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


CANDS = ["a", "b", "c"]


def test_is_overloaded_is_the_load_guard() -> None:
    assert is_overloaded(5, 1, 2, 1.5) and not is_overloaded(3, 2, 2, 1.5)  # gap 1 < 2
    assert not is_overloaded(6, 4, 2, 1.5)  # 6 <= 1.5 × 4
    assert is_overloaded(2, 0, 2, 1.5)


def test_plans_least_loaded_non_holder_only_when_hot_and_holder_overloaded() -> None:
    clock = Clock()
    p = ReplicaPlanner(ReplicationPolicy(max_replicas=1), clock=clock)
    load = {"a": 8.0, "b": 3.0, "c": 1.0}
    assert p.plan("k", hot=False, holders=["a"], candidates=CANDS, load=load) == (None, "not_hot")
    assert p.plan("k", hot=True, holders=[], candidates=CANDS, load=load) == (None, "no_holder")
    assert p.plan("k", hot=True, holders=["x"], candidates=CANDS, load=load) == (None, "no_holder")  # not healthy
    calm = {"a": 2.0, "b": 1.0, "c": 1.0}
    assert p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=calm) == (None, "not_overloaded")
    warm, why = p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=load)
    assert why == "planned" and warm == Warm("k", "c", "a")
    # one warm-up in flight per prefix
    assert p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=load) == (None, "pending")
    p.confirm(warm, ok=True)
    assert p.holders("k") == ["c"]
    # the replica counts as a holder: with c lightly loaded nothing more is needed, and the cap is 1
    assert p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=load) == (None, "not_overloaded")
    busy = {"a": 8.0, "b": 0.0, "c": 9.0}
    assert p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=busy) == (None, "max_replicas")


def test_rate_limit_and_failed_warm_up() -> None:
    clock = Clock()
    p = ReplicaPlanner(ReplicationPolicy(rate=0.5, burst=2, max_replicas=3), clock=clock)
    load = {"a": 9.0, "b": 0.0, "c": 0.0}
    w1, _ = p.plan("k1", hot=True, holders=["a"], candidates=CANDS, load=load)
    w2, _ = p.plan("k2", hot=True, holders=["a"], candidates=CANDS, load=load)
    assert w1 is not None and w2 is not None and w1.instance == "b"
    assert p.plan("k3", hot=True, holders=["a"], candidates=CANDS, load=load) == (None, "rate_limited")
    clock.t += 2.0  # one token back
    w3, why = p.plan("k3", hot=True, holders=["a"], candidates=CANDS, load=load)
    assert why == "planned" and w3 is not None
    p.confirm(w1, ok=False)
    assert p.holders("k1") == []
    clock.t += 2.0
    assert p.plan("k1", hot=True, holders=["a"], candidates=CANDS, load=load)[1] == "planned"  # retried


def test_pending_times_out_and_replicas_age_out() -> None:
    clock = Clock()
    p = ReplicaPlanner(ReplicationPolicy(pending_timeout=5, replica_ttl=10, rate=100), clock=clock)
    load = {"a": 9.0, "b": 0.0, "c": 0.0}
    w, _ = p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=load)
    assert w is not None
    clock.t += 6  # never confirmed: the slot frees
    w2, why = p.plan("k", hot=True, holders=["a"], candidates=CANDS, load=load)
    assert why == "planned" and w2 is not None
    p.confirm(w2, ok=True)
    assert p.holders("k") == [w2.instance]
    clock.t += 11
    assert p.holders("k") == []


def test_no_candidate_caps_and_forget() -> None:
    clock = Clock()
    p = ReplicaPlanner(ReplicationPolicy(max_keys=2, rate=100, burst=10), clock=clock)
    load = {"a": 9.0, "b": 9.0, "c": 0.0}
    assert p.plan("k", hot=True, holders=["a", "b", "c"], candidates=CANDS, load=load) == (None, "no_candidate")
    for k in ("k1", "k2", "k3"):
        w, _ = p.plan(k, hot=True, holders=["a"], candidates=["a", "c"], load=load)
        assert w is not None
        p.confirm(w, ok=True)
    assert len(p) == 2 and p.holders("k1") == []  # least recently planned forgotten
    p.forget_instance("c")
    assert p.holders("k3") == []
    assert ReplicaPlanner(ReplicationPolicy(max_replicas=0)).plan(
        "k", hot=True, holders=["a"], candidates=CANDS, load=load
    ) == (None, "max_replicas")
    with pytest.raises(ValueError):
        ReplicationPolicy(rate=0)


def test_recently_confirmed_replicas_only_when_an_event_index_knows_the_rest() -> None:
    clock = Clock()
    p = ReplicaPlanner(ReplicationPolicy(max_replicas=1), clock=clock)
    warm, why = p.plan("k", hot=True, holders=["a"], candidates=CANDS, load={"a": 8.0, "b": 1.0, "c": 1.0})
    assert warm is not None and why == "planned"
    p.confirm(warm, ok=True)
    clock.t += 4.0
    assert p.holders("k", confirmed_within=5.0) == [warm.instance]
    clock.t += 2.0  # 6 s after the warm-up: the index has (or has dropped) it; the record no longer vouches
    assert p.holders("k", confirmed_within=5.0) == []
    assert p.holders("k") == [warm.instance]  # still recorded: it counts against max_replicas
