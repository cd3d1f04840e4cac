"""Virtual-time model of the KV-event index: equals the engines' caches; the ``kvcache`` mode routes with it."""

from __future__ import annotations

import functools
import random

from kvgate_bench.modes import MODES, FleetSpec
from kvgate_bench.virtual import run_virtual
from kvgate_bench.virtual_events import HashEventIndex
from kvgate_bench.virtual_requests import prepare
from kvgate_bench.workloads import get_workload
from kvgate_sim.engine_model import EngineConfig, EngineCore, Prompt


def test_hash_event_index_equals_engine_caches() -> None:
    """Fed by the engines' events (removal events on), the model answers each engine's real hit per tier."""
    index = HashEventIndex()
    cores = [
        EngineCore(
            EngineConfig(instance_id=f"sim-{i}", kv_events=True, lmcache_removal_events=True, num_gpu_blocks=100,
                         lmcache_capacity_chunks=5),
            kv_event_sink=functools.partial(index.apply, f"sim-{i}"),
        )
        for i in range(2)
    ]  # fmt: skip
    rng = random.Random(2)
    bases = [[rng.randrange(50_000) for _ in range(900)] for _ in range(3)]
    prompts = [[*rng.choice(bases)[: rng.randrange(200, 900)], rng.randrange(50_000)] for _ in range(30)]
    for k, p in enumerate(prompts):
        cores[k % 2].submit(f"r{k}", p, 3)
        cores[k % 2].run_until_idle()
    assert sum(c.gpu.evictions for c in cores) > 0 and sum(c.tier.evictions for c in cores if c.tier) > 0
    nonzero = 0
    for p in prompts:
        pr = Prompt(p)
        got = index.match(pr)
        for c in cores:
            assert c.tier is not None
            n = len(p)
            gpu = len(c.gpu.match(pr.block_hashes(16), (n - 1) // 16)) * 16
            cpu = c.tier.lookup(pr.chunk_hashes(256)[: (n - 1) // 256]) * 256
            assert got.get(c.instance_id, 0) == max(gpu, cpu)
            nonzero += max(gpu, cpu) > 0
    assert nonzero


def test_events_mode_routes_and_beats_round_robin() -> None:
    wl = get_workload("multi_round_qa", num_users=6, num_rounds=3, qps=50.0)
    vreqs = prepare(wl)
    spec = FleetSpec(engines=3)
    rr = run_virtual(MODES["round_robin"], vreqs, spec, wl.closed_loop)
    ev = run_virtual(MODES["kvcache"], vreqs, spec, wl.closed_loop)
    assert MODES["kvcache"].prefix == "events" and MODES["kvcache-lookup"].prefix == "always"
    assert ev.info["unfinished"] == 0
    assert ev.info["routing_lookups"]["routed"] > 0
    assert ev.hit_rate > rr.hit_rate
