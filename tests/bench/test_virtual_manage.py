"""Virtual-time replay of cache management (issue 13): pins on the holder, replica warm-ups (deterministic)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kvgate.filters.kvcache.hot_prefixes import HotPrefixes
from kvgate_bench.modes import MODES, FleetSpec, Mode
from kvgate_bench.results import ModeRun
from kvgate_bench.virtual import run_virtual
from kvgate_bench.virtual_manage import VirtualManagement, management_enabled
from kvgate_bench.virtual_requests import prepare
from kvgate_bench.virtual_router import VEndpoint
from kvgate_bench.workloads import Workload, get_workload
from kvgate_sim.engine_model import EngineCore

SMALL = FleetSpec(engines=2, num_gpu_blocks=200, lmcache_capacity_chunks=24)
CHURN = {"num_hot_prefixes": 1, "hot_prefix_len": 768, "num_rounds": 3, "one_offs_per_gap": 12,
         "one_off_len": 1024, "period_s": 10.0, "hot_requests_per_visit": 2, "visit_spacing_s": 0.05}  # fmt: skip
OVERLOAD = {"num_prefixes": 2, "hot_share": 0.9, "num_requests": 60, "request_rate": 40.0, "prefix_len": 1024}


def managed(name: str = "kvcache-managed", **sections: dict[str, Any]) -> Mode:
    """``kvcache`` plus the management keys of MANAGED_SPEC (each section merged over these defaults)."""
    kv = dict(MODES["kvcache"].kvcache or {})
    defaults: dict[str, dict[str, Any]] = {
        "cache_strategy": {"signals": "engine", "enable_pinning": True, "hot_content_threshold": 2,
                           "pin_ttl": "300s", "max_pinned_share": 0.2, "interval": "1s", "hot_prefix_tokens": 256},
        "engine_metrics": {"lmcache_capacity_chunks": 0},
        "replication": {"enabled": True},
    }  # fmt: skip
    for key, section in defaults.items():
        kv[key] = {**section, **sections.get(key, {})}
    return dataclasses.replace(MODES["kvcache"], name=name, kvcache=kv)


def hot_hit(run: ModeRun, wl: Workload) -> float:
    hot = {r.req_id for r in wl.requests if r.phase == "hot"}
    rs = [r for r in run.results if r.req_id in hot]
    return sum(r.cached_tokens for r in rs) / sum(r.prompt_tokens for r in rs)


@pytest.fixture(scope="module")
def churn() -> Workload:
    return get_workload("hot_prefix_churn", **CHURN)


def test_management_detected_from_the_kvcache_config() -> None:
    assert not management_enabled(MODES["kvcache"].kvcache)
    assert not management_enabled(None)
    assert management_enabled(managed().kvcache)
    assert management_enabled({"replication": {"enabled": True}})
    assert not management_enabled({"cache_strategy": {"signals": "process", "enable_pinning": True}})


def test_chunk_hash_hotness_equals_the_filters_token_hotness(churn: Workload) -> None:
    """The replay counts chunk-hash chains; keys, counts and shared prefix equal the filter's on token ids."""
    cores = [EngineCore(SMALL.engine_config(f"sim-{i}", i)) for i in range(2)]
    vm = VirtualManagement(managed().kvcache or {}, [VEndpoint(i, c) for i, c in enumerate(cores)], lambda p: {})
    tokens = HotPrefixes(300.0, key_tokens=256, chunk_tokens=256)
    for r, v in zip(churn.requests, prepare(churn), strict=True):
        tokens.record(r.prompt_token_ids)
        vm.observe(v.prompt)
    by_tokens = sorted((h.count, len(h.tokens) // 256) for h in tokens.hot(1, 1000))
    by_chunks = sorted((h.count, len(h.tokens)) for h in vm.hot.hot(1, 1000))
    assert by_tokens == by_chunks
    assert max(by_chunks) == (6, 3)  # the hot prefix: 2 requests x 3 visits, 3 shared chunks


def test_pins_on_the_holder_raise_the_hot_hit_rate(churn: Workload) -> None:
    vreqs = prepare(churn)
    mode = managed(replication={"enabled": False})
    base = run_virtual(MODES["kvcache"], vreqs, SMALL)
    run = run_virtual(mode, vreqs, SMALL)
    again = run_virtual(mode, prepare(churn), SMALL)
    mg = run.info["management"]
    assert mg["decisions"].get("pin:hot_content", 0) >= 1
    holder = next(r.instance for r in base.results if r.req_id.startswith("hpc-hot-000"))
    assert mg["tier_chunks"].get(f"pin:{holder}", 0) == 3  # the 3 shared chunks, pinned in the holder's tier
    assert mg["pinned_chunks"][holder] == 3
    assert "replications" not in run.info
    assert hot_hit(base, churn) < 0.5  # churn evicts the hot prefix between visits ...
    assert hot_hit(run, churn) > hot_hit(base, churn) + 0.2  # ... unless it is pinned
    assert [(r.req_id, r.instance, r.cached_tokens, r.ttft_s) for r in run.results] == [
        (r.req_id, r.instance, r.cached_tokens, r.ttft_s) for r in again.results
    ]


def test_pin_cap_below_the_prefix_size_pins_nothing(churn: Workload) -> None:
    vreqs = prepare(churn)
    base = run_virtual(MODES["kvcache"], vreqs, SMALL)
    capped = managed(cache_strategy={"max_pinned_share": 0.1}, replication={"enabled": False})  # 2 of 24 < 3
    run = run_virtual(capped, vreqs, SMALL)
    mg = run.info["management"]
    assert "pin:hot_content" not in mg["decisions"]
    assert mg["decisions"].get("skip_pin:pin_cap", 0) >= 1
    assert hot_hit(run, churn) == hot_hit(base, churn)


def test_pins_stop_when_pinning_is_off(churn: Workload) -> None:
    run = run_virtual(managed(cache_strategy={"enable_pinning": False}), prepare(churn), SMALL)
    assert run.info["management"]["rounds"] > 0
    assert not run.info["management"]["tier_chunks"]


def test_replica_warm_up_then_routing_to_the_replica() -> None:
    wl = get_workload("hot_prefix_overload", **OVERLOAD)
    spec = FleetSpec(engines=3, num_gpu_blocks=800, lmcache_capacity_chunks=64)
    run = run_virtual(managed(cache_strategy={"enable_pinning": False}), prepare(wl), spec)
    reps = run.info["replications"]
    assert reps["planned"] >= 1 and reps["ok"] >= 1
    warm = run.info["warmups"][0]
    assert warm["ok"] and warm["instance"] != warm["source"] and warm["done_s"] >= warm["planned_s"]
    assert run.info["routing_lookups"].get("routed_replica", 0) >= 1
    # a later hot request is served by the replica from its cache
    hot = {r.req_id for r in wl.requests if r.phase == "hot"}
    later = [r for r in run.results if r.req_id in hot and r.start_s is not None and r.start_s > warm["done_s"]]
    assert any(r.instance == warm["instance"] and r.cached_tokens >= 256 for r in later)
    # warm-ups are not workload results: one result per request, and the hit rate is theirs alone
    assert sorted(r.req_id for r in run.results) == sorted(r.req_id for r in wl.requests)
    assert run.info["unfinished"] == 0
    total = sum(r.prompt_tokens for r in run.results)
    assert run.hit_rate == pytest.approx(sum(r.cached_tokens for r in run.results) / total, abs=1e-12)


def test_unmanaged_modes_have_no_management_metadata(churn: Workload) -> None:
    run = run_virtual(MODES["kvcache"], prepare(churn), SMALL)
    assert "management" not in run.info and "replications" not in run.info
    assert "routed_replica" not in run.info["routing_lookups"]
