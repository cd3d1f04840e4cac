"""Cache-management workloads: hot_prefix_churn and hot_prefix_overload (shape, determinism, registry)."""

from __future__ import annotations

from collections import Counter

import pytest

from kvgate_bench import workloads as wl
from kvgate_sim.tokenizer import get_tokenizer
from tests.bench.test_workloads import _common_prefix


def _round_trip(w: wl.Workload) -> None:
    tok = get_tokenizer()
    for r in w.requests:
        assert r.kind == "chat" and r.messages is not None
        assert tok.encode_chat(r.messages) == r.prompt_token_ids


SMALL_CHURN = {
    "num_hot_prefixes": 2,
    "hot_prefix_len": 300,
    "question_len": 8,
    "hot_requests_per_visit": 2,
    "num_rounds": 3,
    "period_s": 10.0,
    "one_off_len": 200,
    "one_offs_per_gap": 5,
    "output_len": 4,
}


def test_hot_prefix_churn_shape() -> None:
    w = wl.hot_prefix_churn(**SMALL_CHURN)  # type: ignore[arg-type]
    _round_trip(w)
    hot = [r for r in w.requests if r.phase == "hot"]
    churn = [r for r in w.requests if r.phase == "churn"]
    assert len(hot) == 3 * 2 * 2 and len(churn) == 2 * 5 and len(w) == 22
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    # every visit r starts at r × period and carries each prefix hot_requests_per_visit times
    for r in range(3):
        visit = [q for q in hot if q.round_idx == r]
        assert Counter(q.group for q in visit) == {0: 2, 1: 2}
        assert min(q.arrival_s for q in visit) == pytest.approx(10.0 * r)
        assert max(q.arrival_s for q in visit) < 10.0 * r + 1.0
    # between two visits of the same prefix, the full churn volume arrives (and nothing after the last visit)
    for r in range(2):
        last_hot = max(q.arrival_s for q in hot if q.round_idx == r)
        next_hot = min(q.arrival_s for q in hot if q.round_idx == r + 1)
        gap = [q for q in churn if last_hot < q.arrival_s < next_hot]
        assert len(gap) == 5 and all(q.num_prompt_tokens >= 190 for q in gap)
    assert max(q.arrival_s for q in churn) < min(q.arrival_s for q in hot if q.round_idx == 2)
    # hot requests of one prefix share the system prompt (≥ its length); churn prompts share nothing useful
    g0 = [q for q in hot if q.group == 0]
    g1 = [q for q in hot if q.group == 1]
    assert all(_common_prefix(g0[0].prompt_token_ids, q.prompt_token_ids) >= 290 for q in g0[1:])
    assert _common_prefix(g0[0].prompt_token_ids, g1[0].prompt_token_ids) < 10
    assert all(q.messages[0]["role"] == "system" for q in hot)  # type: ignore[index]
    assert max(_common_prefix(churn[0].prompt_token_ids, q.prompt_token_ids) for q in churn[1:]) < 10
    assert len({q.req_id for q in w.requests}) == len(w)


def test_hot_prefix_churn_determinism_and_validation() -> None:
    a = wl.hot_prefix_churn(**SMALL_CHURN, seed=3)  # type: ignore[arg-type]
    b = wl.hot_prefix_churn(**SMALL_CHURN, seed=3)  # type: ignore[arg-type]
    c = wl.hot_prefix_churn(**SMALL_CHURN, seed=4)  # type: ignore[arg-type]
    key = [(r.req_id, r.arrival_s, r.prompt_token_ids) for r in a.requests]
    assert key == [(r.req_id, r.arrival_s, r.prompt_token_ids) for r in b.requests]
    assert key != [(r.req_id, r.arrival_s, r.prompt_token_ids) for r in c.requests]
    with pytest.raises(ValueError):
        wl.hot_prefix_churn(**{**SMALL_CHURN, "period_s": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wl.hot_prefix_churn(**{**SMALL_CHURN, "hot_prefix_len": 0})  # type: ignore[arg-type]


def test_hot_prefix_overload_shape_and_determinism() -> None:
    w = wl.hot_prefix_overload(num_prefixes=4, hot_share=0.75, prefix_len=300, question_len=8, num_requests=40)
    _round_trip(w)
    groups = Counter(r.group for r in w.requests)
    assert groups == {0: 30, 1: 4, 2: 3, 3: 3}
    assert {r.phase for r in w.requests if r.group == 0} == {"hot"}
    assert {r.phase for r in w.requests if r.group != 0} == {"other"}
    hot = [r for r in w.requests if r.group == 0]
    assert all(_common_prefix(hot[0].prompt_token_ids, r.prompt_token_ids) >= 290 for r in hot[1:])
    assert len({tuple(r.prompt_token_ids) for r in hot}) == len(hot)  # each its own question
    arr = [r.arrival_s for r in w.requests]
    assert arr == sorted(arr) and arr[0] == 0.0 and arr[-1] > 0
    again = wl.hot_prefix_overload(num_prefixes=4, hot_share=0.75, prefix_len=300, question_len=8, num_requests=40)
    assert [r.prompt_token_ids for r in again.requests] == [r.prompt_token_ids for r in w.requests]
    one = wl.hot_prefix_overload(num_prefixes=1, prefix_len=50, question_len=4, num_requests=5, request_rate=0)
    assert {r.group for r in one.requests} == {0} and {r.arrival_s for r in one.requests} == {0.0}
    with pytest.raises(ValueError):
        wl.hot_prefix_overload(hot_share=1.5)


def test_registered_as_management_workloads() -> None:
    assert set(wl.MANAGEMENT_WORKLOADS) == {"hot_prefix_churn", "hot_prefix_overload"}
    assert not set(wl.MANAGEMENT_WORKLOADS) & set(wl.WORKLOADS)  # `--workload all` is unchanged
    w = wl.get_workload("hot_prefix_churn", **SMALL_CHURN)
    assert w.name == "hot_prefix_churn" and w.params["one_offs_per_gap"] == 5
    o = wl.get_workload("hot_prefix_overload", num_requests=6, prefix_len=40, question_len=4)
    assert o.name == "hot_prefix_overload" and len(o) == 6 and o.params["hot_share"] == 0.8
    with pytest.raises(TypeError):
        wl.get_workload("hot_prefix_overload", bogus=1)
    text = wl.describe(management=True)
    assert "hot_prefix_churn" in text and "hot_prefix_overload" in text
    assert "hot_prefix_churn" not in wl.describe()


def test_churn_defaults_overflow_the_documented_fleet_and_fit_the_pin_cap() -> None:
    """The defaults are sized for ``--engines 4 --gpu-blocks 800 --lmcache-chunks 64`` (docs/benchmarks.md): one gap's
    one-off tokens per engine exceed each cache tier by half again (so LRU evicts the hot prompts between visits),
    a hot prompt fits the managed mode's pin cap (0.2 of the LMCache tier), and the misses that pinning cannot save
    (each prefix's first visit) stay below 5% of the hot requests (under the TTFT p95 rank)."""
    from inspect import signature

    from kvgate_bench.modes import KVCACHE_MANAGEMENT, FleetSpec

    d = wl.MANAGEMENT_WORKLOADS["hot_prefix_churn"].defaults
    fn = {k: p.default for k, p in signature(wl.hot_prefix_churn).parameters.items()}
    assert {k: fn[k] for k in d} == d  # registry and function defaults agree
    spec = FleetSpec(engines=4, num_gpu_blocks=800, lmcache_capacity_chunks=64)
    cfg = spec.engine_config()
    per_engine = d["one_offs_per_gap"] * d["one_off_len"] / spec.engines
    assert per_engine > 1.5 * cfg.resolved_num_gpu_blocks() * cfg.block_size
    assert per_engine > 1.5 * cfg.lmcache_capacity_chunks * cfg.lmcache_chunk_size
    share = KVCACHE_MANAGEMENT["cache_strategy"]["max_pinned_share"]
    assert d["hot_prefix_len"] // cfg.lmcache_chunk_size <= share * cfg.lmcache_capacity_chunks
    hot = d["num_hot_prefixes"] * d["num_rounds"] * d["hot_requests_per_visit"]
    assert d["num_hot_prefixes"] / hot < 0.05
