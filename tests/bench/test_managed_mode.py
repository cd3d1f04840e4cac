"""The ``kvcache-managed`` benchmark mode (issue 13): its gateway config and the fleet's management keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvgate.config import parse_config
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.registry import check_config
from kvgate_bench import cli as bench_cli
from kvgate_bench.modes import DEFAULT_MODES, MODES, FleetSpec, gateway_config
from kvgate_sim.engine_model import EngineConfig, EngineCore
from kvgate_sim.fleet import Fleet, FleetEngine, start_fleet

MANAGEMENT_KEYS = ("cache_strategy", "engine_metrics", "replication")


def _kv(cfg: dict) -> dict:  # type: ignore[type-arg]
    filters = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    assert filters[0]["name"] == "dgp.filter.ai.kvcache"
    return filters[0]["config"]  # type: ignore[no-any-return]


def _core_fleet(*configs: EngineConfig) -> Fleet:
    """A :class:`Fleet` of pure engine cores (no servers): enough for ``management_config``."""
    engines = [FleetEngine(c.instance_id, SimpleNamespace(core=EngineCore(c)), None)  # type: ignore[arg-type]
               for c in configs]  # fmt: skip
    return Fleet(engines, None)


def test_management_config_reports_the_engines_capacities() -> None:
    base = EngineConfig(lmcache_capacity_chunks=64, max_num_seqs=8)
    fleet = _core_fleet(
        replace(base, instance_id="sim-0"),
        replace(base, instance_id="sim-1"),
        replace(base, instance_id="sim-2", lmcache_capacity_chunks=32),
        replace(base, instance_id="sim-3", lmcache_enabled=False, max_num_seqs=4),
    )
    em = fleet.management_config()["engine_metrics"]
    chunk_bytes = 256 * 2 * 32 * 8 * 128 * 2  # 256-token chunks × 128 KiB per token (the simulated model)
    assert em["lmcache_capacity_chunks"] == 64 and em["lmcache_capacity_bytes"] == 64 * chunk_bytes
    assert em["max_num_seqs"] == 8
    assert em["endpoints"] == [
        {"instance": "sim-2", "lmcache_capacity_chunks": 32, "lmcache_capacity_bytes": 32 * chunk_bytes,
         "max_num_seqs": 8},
        {"instance": "sim-3", "lmcache_capacity_chunks": 0, "lmcache_capacity_bytes": 0, "max_num_seqs": 4},
    ]  # fmt: skip
    # the bytes are what the engine's lmcache:local_cache_usage reaches when its CPU tier is full
    tier = fleet.engines[0].engine.core.tier
    assert tier is not None
    tier.store(list(range(1, 200)))
    assert tier.used_bytes == em["lmcache_capacity_bytes"]
    # identical engines: no per-instance overrides
    same = _core_fleet(replace(base, instance_id="sim-0"), replace(base, instance_id="sim-1"))
    assert "endpoints" not in same.management_config()["engine_metrics"]


async def test_kvcache_managed_config_is_kvcache_plus_management() -> None:
    spec = FleetSpec(engines=2, lmcache_capacity_chunks=64, max_num_seqs=16)
    fleet = await start_fleet(2, engine_config=spec.base_engine_config())
    try:
        managed = gateway_config(MODES["kvcache-managed"], fleet)
        plain = gateway_config(MODES["kvcache"], fleet)
    finally:
        await fleet.stop()
    kv, kv_plain = _kv(managed), _kv(plain)
    # the routing is exactly the kvcache mode's
    assert {k: v for k, v in kv.items() if k not in MANAGEMENT_KEYS} == kv_plain
    assert managed["clusters"] == plain["clusters"]
    cs = kv["cache_strategy"]
    assert cs == {"enable_pinning": True, "hot_content_threshold": 2, "signals": "engine", "pin_ttl": "300s",
                  "max_pinned_share": 0.2, "interval": "1s", "hot_prefix_tokens": 256}  # fmt: skip
    assert kv["replication"] == {"enabled": True}
    em = kv["engine_metrics"]
    assert em["interval"] == "1s" and em["timeout"] == "500ms"
    assert em["lmcache_capacity_chunks"] == 64 and em["max_num_seqs"] == 16
    assert em["lmcache_capacity_bytes"] == 64 * 256 * 131072
    # the gateway's config check accepts it; once the filter knows the keys, none of them is "unknown"
    checked = check_config(parse_config(managed))
    if "engine_metrics" in KVCacheConfig.model_fields:
        assert not [w for w in checked.warnings if any(k in w for k in MANAGEMENT_KEYS)], checked.warnings


def test_kvcache_managed_runs_in_virtual_time_and_is_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mode = MODES["kvcache-managed"]
    assert mode.managed and mode.virtual_supported
    assert "kvcache-managed" not in DEFAULT_MODES
    code = bench_cli.main(["--workload", "hot_prefix_overload", "--virtual", "--engines", "2", "--modes",
                           "kvcache,kvcache-managed", "--param", "num_requests=12", "--param", "prefix_len=300",
                           "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "kvcache-managed: skipped" not in out and "kvcache-managed" in out
    assert "by workload phase" in out  # the hot / other breakdown of the kvcache run


async def test_kvcache_managed_runs_in_real_time_and_rows_carry_phases() -> None:
    """The mode's config starts a real gateway in front of a simulated fleet and serves every request; each result
    row carries its workload phase (what the per-phase breakdown groups by)."""
    from kvgate_bench.realtime import run_mode
    from kvgate_bench.results import phase_summaries
    from kvgate_bench.workloads import get_workload

    wl = get_workload("hot_prefix_churn", num_hot_prefixes=2, hot_prefix_len=300, question_len=8,
                      hot_requests_per_visit=2, num_rounds=2, period_s=1.0, one_off_len=200, one_offs_per_gap=4,
                      output_len=4)  # fmt: skip
    run = await run_mode(MODES["kvcache-managed"], wl, FleetSpec(engines=2, time_scale=0.5))
    assert all(r.ok for r in run.results), [r.error for r in run.results if not r.ok]
    assert sorted(r.req_id for r in run.results) == sorted(r.req_id for r in wl.requests)
    phase_of = {r.req_id: r.phase for r in wl.requests}
    assert all(r.phase == phase_of[r.req_id] for r in run.results)
    phases = phase_summaries(run.results, run.instances)
    assert [(p.phase, p.requests) for p in phases] == [("hot", 8), ("churn", 4)]
    # the second request of a visit follows the first to its holder: the hot phase has cache hits
    assert phases[0].cached_tokens > 0
