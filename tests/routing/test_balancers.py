"""Unit tests for every load-balancing policy in kvgate/routing/balancers.py (pure: no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from kvgate.routing.balancers import (
    LeastRequest,
    RandomPick,
    RingHash,
    RoundRobin,
    WeightedRandom,
    make_balancer,
)


@dataclass
class Ep:
    id: str
    in_flight: int = 0
    weight: int = 1


def fleet(n: int) -> list[Ep]:
    return [Ep(f"e{i}") for i in range(n)]


# -- round robin --------------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_candidate_order() -> None:
    eps = fleet(3)
    rr = RoundRobin()
    assert [rr.pick(eps).id for _ in range(7)] == ["e0", "e1", "e2", "e0", "e1", "e2", "e0"]  # type: ignore[union-attr]


def test_round_robin_cursor_advances_on_every_pick_even_when_the_set_shrinks() -> None:
    eps = fleet(3)
    rr = RoundRobin()
    assert rr.pick(eps) is eps[0]
    assert rr.pick(eps[:2]) is eps[1]  # cursor 1 over two candidates
    assert rr.pick(eps[:2]) is eps[0]  # cursor 2 % 2
    assert rr.pick(eps) is eps[0]  # cursor 3 % 3


def test_empty_candidates_give_none_for_every_policy() -> None:
    for policy in ("round_robin", "random", "weighted_random", "least_request", "ring_hash", "maglev"):
        b = make_balancer(policy, random.Random(0))
        assert b.pick([]) is None
        assert b.pick([], key="k") is None


# -- random / weighted random -------------------------------------------------------------------------------------


def test_random_pick_is_seedable_and_reaches_every_endpoint() -> None:
    eps = fleet(4)
    ra, rb = RandomPick(random.Random(7)), RandomPick(random.Random(7))
    assert [ra.pick(eps) for _ in range(50)] == [rb.pick(eps) for _ in range(50)]
    picker = RandomPick(random.Random(1))
    assert {picker.pick(eps).id for _ in range(200)} == {"e0", "e1", "e2", "e3"}  # type: ignore[union-attr]


def test_weighted_random_never_picks_a_zero_weight_endpoint() -> None:
    eps = [Ep("a", weight=0), Ep("b", weight=3), Ep("c", weight=1), Ep("d", weight=-2)]
    wr = WeightedRandom(random.Random(3))
    counts = Counter(wr.pick(eps).id for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"b", "c"}  # zero and negative weights are never chosen
    assert 2.4 < counts["b"] / counts["c"] < 3.8  # about 3:1


def test_weighted_random_all_zero_weights_falls_back_to_uniform() -> None:
    eps = [Ep("a", weight=0), Ep("b", weight=0), Ep("c", weight=0)]
    wr = WeightedRandom(random.Random(5))
    counts = Counter(wr.pick(eps).id for _ in range(3000))  # type: ignore[union-attr]
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 800  # uniform, not herded onto one endpoint


# -- least request ------------------------------------------------------------------------------------------------


def test_least_request_picks_the_fewest_in_flight() -> None:
    eps = [Ep("a", in_flight=5), Ep("b", in_flight=1), Ep("c", in_flight=3)]
    lr = LeastRequest()
    assert [lr.pick(eps).id for _ in range(3)] == ["b", "b", "b"]  # type: ignore[union-attr]


def test_least_request_ties_rotate_instead_of_herding() -> None:
    eps = [Ep("a", in_flight=2), Ep("b", in_flight=0), Ep("c", in_flight=0), Ep("d", in_flight=0)]
    lr = LeastRequest()
    picks = [lr.pick(eps).id for _ in range(6)]  # type: ignore[union-attr]
    assert picks == ["b", "c", "d", "b", "c", "d"]
    idle = fleet(3)
    assert [LeastRequest().pick(idle).id for _ in range(3)] == ["e0", "e0", "e0"]  # type: ignore[union-attr]
    shared = LeastRequest()
    assert [shared.pick(idle).id for _ in range(3)] == ["e0", "e1", "e2"]  # type: ignore[union-attr]


def test_least_request_follows_load_changes() -> None:
    eps = fleet(2)
    lr = LeastRequest()
    first = lr.pick(eps)
    assert first is not None
    first.in_flight += 1
    second = lr.pick(eps)
    assert second is not None and second is not first
    second.in_flight += 2
    assert lr.pick(eps) is first


# -- ring hash ----------------------------------------------------------------------------------------------------


def _assign(ring: RingHash, all_ids: list[str], candidates: list[Ep], keys: list[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        ep = ring.pick_from(all_ids, candidates, k)
        assert ep is not None
        out[k] = ep.id
    return out


def test_ring_hash_is_stable_per_key_and_spreads_keys() -> None:
    eps = fleet(4)
    ids = [e.id for e in eps]
    keys = [f"session-{i}" for i in range(2000)]
    a = _assign(RingHash(), ids, eps, keys)
    assert a == _assign(RingHash(), ids, eps, keys)  # deterministic across instances
    counts = Counter(a.values())
    assert set(counts) == set(ids)
    assert min(counts.values()) > 2000 / 4 * 0.6  # 160 virtual nodes keep the spread even


def test_ring_hash_moves_only_a_failed_endpoints_keys() -> None:
    eps = fleet(5)
    ids = [e.id for e in eps]
    keys = [f"user-{i}" for i in range(3000)]
    ring = RingHash()
    before = _assign(ring, ids, eps, keys)
    failed = "e2"
    healthy = [e for e in eps if e.id != failed]
    after = _assign(ring, ids, healthy, keys)  # same ring (all ids), one endpoint unusable
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == failed}  # exactly the failed endpoint's keys, nothing else
    assert moved and all(after[k] != failed for k in moved)
    assert len({after[k] for k in moved}) > 1  # spread over the survivors, not dumped on one neighbour
    # the endpoint recovers: every key goes back where it was
    assert _assign(ring, ids, eps, keys) == before


def test_ring_hash_without_key_falls_back_to_round_robin() -> None:
    eps = fleet(3)
    ring = RingHash()
    assert [ring.pick(eps).id for _ in range(4)] == ["e0", "e1", "e2", "e0"]  # type: ignore[union-attr]
    assert [ring.pick(eps, key="").id for _ in range(2)] == ["e1", "e2"]  # type: ignore[union-attr]


def test_ring_hash_given_the_cluster_members_keeps_its_ring_through_failures() -> None:
    # The same ring as pick_from over every id, through the plain pick(candidates, key) every balancer has.
    eps = fleet(5)
    ids = [e.id for e in eps]
    keys = [f"user-{i}" for i in range(1000)]
    ring = make_balancer("ring_hash", members=ids)
    before = {k: ring.pick(eps, k).id for k in keys}  # type: ignore[union-attr]
    assert before == _assign(RingHash(), ids, eps, keys)
    healthy = [e for e in eps if e.id != "e3"]
    after = {k: ring.pick(healthy, k).id for k in keys}  # type: ignore[union-attr]
    assert {k for k in keys if before[k] != after[k]} == {k for k in keys if before[k] == "e3"}


def test_cluster_picks_pass_the_key_to_every_policy_without_knowing_the_policy() -> None:
    from kvgate.cluster import ClusterState
    from kvgate.config import Cluster
    from kvgate.metrics import Metrics

    def cluster(lb: str) -> ClusterState:
        eps = [{"id": f"e{i}", "socket_address": {"address": "127.0.0.1", "port": 8000 + i}} for i in range(4)]
        return ClusterState(Cluster.model_validate({"name": "c", "lb_policy": lb, "endpoints": eps}), Metrics())

    ring = cluster("RingHashing")
    keys = [f"s{i}" for i in range(400)]
    before = {k: ring.pick(k).id for k in keys}  # type: ignore[union-attr]
    assert len(set(before.values())) == 4 and before == {k: ring.pick(k).id for k in keys}  # type: ignore[union-attr]
    failed = ring.get("e1")
    assert failed is not None
    ring.mark_failed(failed)  # passive cooldown: e1 is skipped, only its keys move
    after = {k: ring.pick(k).id for k in keys}  # type: ignore[union-attr]
    assert {k for k in keys if before[k] != after[k]} == {k for k in keys if before[k] == "e1"}
    rr = cluster("RoundRobin")
    assert [rr.pick("same-key").id for _ in range(5)] == ["e0", "e1", "e2", "e3", "e0"]  # type: ignore[union-attr]
    lr = cluster("least_request")
    first = lr.pick("k")
    assert first is not None
    lr.acquire(first)
    assert all(lr.pick("k") is not first for _ in range(3))


def test_make_balancer_names_and_unknown_policy() -> None:
    assert isinstance(make_balancer("maglev"), RingHash)  # same contract as ring hash
    assert make_balancer("least_request").name == "least_request"
    with pytest.raises(ValueError, match="unknown load-balancing policy 'fastest'"):
        make_balancer("fastest")
