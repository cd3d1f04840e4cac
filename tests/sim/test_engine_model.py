"""Tests for the simulated vLLM engine model (kvgate_sim.engine_model, a simulator)."""

from __future__ import annotations

import random

import pytest

from kvgate_sim.engine_model import (
    PROFILES,
    EngineConfig,
    EngineCore,
    GPUPrefixCache,
    LMCacheTier,
    Prompt,
    gpu_block_hashes,
)
from kvgate_sim.protocol import KVOp, WorkerControl, lmcache_chunk_hashes

MS = 1e-3


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 150_000) for _ in range(n)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class OpLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, list[KVOp]]] = []

    def __call__(self, instance_id: str, worker_id: int, location: str, ops: list[KVOp]) -> None:
        self.calls.append((instance_id, worker_id, location, list(ops)))

    def ops(self, kind: str | None = None) -> list[int]:
        return [op.key for _i, _w, _l, batch in self.calls for op in batch if kind is None or op.op_type == kind]


def small_core(**kw: object) -> EngineCore:
    cfg = dict(profile="h100", num_gpu_blocks=257, lmcache_capacity_chunks=64)
    cfg.update(kw)
    return EngineCore(EngineConfig(**cfg))  # type: ignore[arg-type]


def run_one(core: EngineCore, req_id: str, prompt: list[int] | Prompt, max_tokens: int = 4):
    start = core.now
    rec = core.submit(req_id, prompt, max_tokens, arrival_time=start)
    core.run_until_idle()
    assert rec.finish_time is not None
    return rec


# ----------------------------------------------------------------------------------------- GPU prefix cache


def test_block_hash_chain() -> None:
    t = toks(40)
    hs = gpu_block_hashes(t, 16)
    assert len(hs) == 2  # only full blocks
    assert hs[0] == hash((0, tuple(t[:16])))
    assert hs[1] == hash((hs[0], tuple(t[16:32])))
    changed_first = list(t)
    changed_first[3] += 1
    h2 = gpu_block_hashes(changed_first, 16)
    assert h2[0] != hs[0] and h2[1] != hs[1]  # a change propagates down the chain
    changed_second = list(t)
    changed_second[20] += 1
    h3 = gpu_block_hashes(changed_second, 16)
    assert h3[0] == hs[0] and h3[1] != hs[1]
    assert Prompt(t).block_hashes(16) == hs
    assert Prompt(t).chunk_hashes(256) == []


def test_free_queue_lru_eviction_order_and_capacity() -> None:
    pool = GPUPrefixCache(num_blocks=9, block_size=4)  # 8 usable blocks; block 0 is the null block
    assert pool.num_free == 8 and pool.usage() == 0.0
    a = pool.allocate(3)
    assert a == [1, 2, 3]
    for i, b in enumerate(a):
        pool.cache(b, 100 + i)
    assert pool.usage() == pytest.approx(3 / 8)
    pool.free(a)
    # freed in reverse order and appended: the chain tail (hash 102) is evicted before its head
    assert pool.eviction_order() == [4, 5, 6, 7, 8, 3, 2, 1]
    b = pool.allocate(6)  # 5 never-used blocks, then the LRU cached one: block 3 (tail, hash 102)
    assert b == [4, 5, 6, 7, 8, 3]
    assert pool.evictions == 1
    assert pool.match([100, 101, 102], 3) == [1, 2]
    with pytest.raises(RuntimeError):
        pool.allocate(3)  # only 2 free blocks left: capacity is enforced
    # a hit refreshes recency: touch block 1 (hash 100) and free it again -> block 2 is now older
    pool.touch([1])
    pool.free([1])
    assert pool.eviction_order() == [2, 1]
    pool.free(b)
    pool.allocate(1)
    assert pool.lookup(101) is None and pool.lookup(100) == 1


def test_engine_evicts_least_recently_used_prompt() -> None:
    # 16 + 1 blocks of 16 tokens: each 96-token prompt + 4 outputs reserves 7 blocks
    core = small_core(num_gpu_blocks=17, lmcache_enabled=False)
    pa, pb, pc = toks(96, 1), toks(96, 2), toks(96, 3)
    run_one(core, "a", pa)
    run_one(core, "b", pb)
    run_one(core, "a2", pa)  # refreshes a: b is now least recently used
    assert core.request("a2") is None  # finished records are not retained
    run_one(core, "c", pc)  # needs 7 blocks: 2 unused + 5 cached ones of b (LRU)
    assert run_one(core, "a3", pa).gpu_hit_tokens == 80  # a survived (5 blocks, last-token rule)
    assert run_one(core, "b2", pb).gpu_hit_tokens < 80


def test_last_token_recompute_rule() -> None:
    core = small_core(lmcache_enabled=False)
    p32 = toks(32, 7)
    run_one(core, "x", p32)
    rec = run_one(core, "y", p32)
    assert rec.gpu_hit_tokens == 16  # capped at num_tokens - 1 = 31 -> one block
    p33 = toks(33, 8)
    run_one(core, "x2", p33)
    assert run_one(core, "y2", p33).gpu_hit_tokens == 32


def test_kv_cache_usage_formula() -> None:
    core = small_core(num_gpu_blocks=101, lmcache_enabled=False)
    core.submit("r", toks(150), 10, arrival_time=0.0)  # ceil(160 / 16) = 10 blocks reserved
    core.step()
    assert core.kv_cache_usage_perc == pytest.approx(1 - 90 / 100)
    core.run_until_idle()
    assert core.kv_cache_usage_perc == 0.0  # cached-but-free blocks count as free
    assert core.stats().gpu_cached_blocks == 9


def test_abort_frees_blocks() -> None:
    core = small_core(lmcache_enabled=False)
    core.submit("r", toks(500), 50)
    core.step()
    assert core.num_running == 1 and core.kv_cache_usage_perc > 0
    assert core.abort("r") and not core.abort("r")
    assert core.num_running == 0 and core.kv_cache_usage_perc == 0.0
    assert core.step() is None


# ----------------------------------------------------------------------------------------- LMCache tier


def make_tier(capacity: int, clock: Clock, sink: OpLog | None = None) -> LMCacheTier:
    return LMCacheTier("inst", capacity, clock=clock, sink=sink, pin_timeout_s=300.0)


def test_pin_protects_until_timeout() -> None:
    clock = Clock()
    tier = make_tier(2, clock)
    t = toks(3 * 256 + 10)
    k = lmcache_chunk_hashes(t)
    tier.store(k[:2])
    assert tier.pin(t[:700], "LocalCPUBackend") == 512  # like LMCache: 700 tokens -> 2 full chunks
    assert tier.pin(t, "OtherBackend") == 0
    tier.store(k[2:3])  # full, both pinned: nothing can be evicted, store is skipped
    assert tier.keys() == k[:2]
    clock.t = 299.0
    tier.unpin_keys(k[1:2])
    tier.store(k[2:3])
    assert tier.keys() == [k[0], k[2]]  # k0 is LRU but pinned; k1 went
    clock.t = 300.5  # pin expired
    tier.store([12345])
    assert tier.keys() == [k[2], 12345]


def test_clear_keeps_pinned_chunks() -> None:
    clock = Clock()
    log = OpLog()
    tier = make_tier(8, clock, log)
    t = toks(3 * 256)
    k = lmcache_chunk_hashes(t)
    tier.store(k)
    tier.pin_keys(k[:1])
    assert tier.clear("LocalCPUBackend") == 512
    assert tier.keys() == k[:1]
    assert log.ops("evict") == k[1:]
    assert tier.clear("LocalDiskBackend") == 0
    clock.t = 301.0
    assert tier.clear("LocalCPUBackend") == 256
    assert len(tier) == 0 and tier.used_bytes == 0


def test_compress_accounting() -> None:
    clock = Clock()
    tier = make_tier(2, clock)
    t = toks(2 * 256)
    k = lmcache_chunk_hashes(t)
    tier.store(k)
    assert tier.used_bytes == 2 * tier.chunk_bytes
    assert tier.compress(t, "LocalCPUBackend", "cachegen") == 512
    assert tier.compress(t, "LocalCPUBackend", "cachegen") == 0  # already compressed
    assert tier.used_bytes == 2 * tier.compressed_bytes == tier.chunk_bytes
    assert tier.is_compressed(k[0]) and k[0] in tier  # location unchanged, still present
    tier.store([1])  # fits next to two half-size chunks: no eviction
    assert len(tier) == 3
    tier.store([2])  # needs a full chunk: evicts LRU k0 (half) and k1 (half)
    assert tier.keys() == [1, 2]
    assert tier.decompress(t, "LocalCPUBackend", "cachegen") == 0


def test_admit_evict_ops_with_lmcache_chunk_keys() -> None:
    log = OpLog()
    core = EngineCore(EngineConfig(instance_id="engA", num_gpu_blocks=400, lmcache_capacity_chunks=3), sink=log)
    p1 = toks(600, 1)
    run_one(core, "a", p1)
    keys1 = lmcache_chunk_hashes(p1)
    assert len(keys1) == 2
    assert [(i, w, loc) for i, w, loc, _ in log.calls] == [("engA", 0, "LocalCPUBackend")]
    assert log.ops("admit") == keys1
    p2 = toks(520, 2)
    run_one(core, "b", p2)
    keys2 = lmcache_chunk_hashes(p2)
    assert log.ops("admit") == keys1 + keys2
    assert log.ops("evict") == keys1[:1]  # LRU first
    seqs = [op.seq_num for _i, _w, _l, batch in log.calls for op in batch]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # WorkerControl surface of the engine
    wc: WorkerControl = core
    assert wc.export_chunks(p2, "LocalCPUBackend") == [(k, 256) for k in keys2]
    assert wc.evict(p2[:256]) == 256
    assert log.ops("evict")[-1] == keys2[0]
    assert wc.import_chunks(p1, "LocalCPUBackend") == 512
    assert wc.health() == 0


# ----------------------------------------------------------------------------------------- timing


def test_ttft_gpu_and_lmcache_hits_match_model() -> None:
    prof = PROFILES["h100"]
    load_ms = prof.lmcache_load_ms_per_token
    assert load_ms == pytest.approx(0.0032768)  # 128 KiB / 40 GB/s
    p = toks(2048, 5)
    # GPU prefix cache only
    gpu_only = EngineCore(EngineConfig(profile="h100", num_gpu_blocks=1000, lmcache_enabled=False))
    cold = run_one(gpu_only, "cold", p, max_tokens=4)
    assert cold.ttft == pytest.approx((6.5 + 2048 / 30) * MS)  # 74.77 ms
    assert cold.e2e == pytest.approx(cold.ttft + 3 * 6.5 * MS)
    warm = run_one(gpu_only, "warm", p, max_tokens=4)
    assert warm.gpu_hit_tokens == 2032 and warm.cached_tokens == 2032  # 127 blocks: last block recomputed
    assert warm.ttft == pytest.approx((6.5 + 16 / 30) * MS)  # 7.03 ms
    # with the LMCache tier: the 8 stored chunks cover 2047 tokens, so 15 more tokens are loaded
    core = EngineCore(EngineConfig(profile="h100", num_gpu_blocks=1000))
    assert run_one(core, "cold", p, max_tokens=4).ttft == pytest.approx(cold.ttft)
    warm2 = run_one(core, "warm", p, max_tokens=4)
    assert (warm2.gpu_hit_tokens, warm2.external_hit_tokens) == (2032, 15)
    assert warm2.ttft == pytest.approx((6.5 + 1 / 30 + 15 * load_ms) * MS)
    assert core.reset_prefix_cache()  # GPU cache dropped, LMCache tier kept
    ext = run_one(core, "ext", p, max_tokens=4)
    assert ext.gpu_hit_tokens == 0 and ext.external_hit_tokens == 2047 and ext.cached_tokens == 2047
    assert ext.ttft == pytest.approx((6.5 + 1 / 30 + 2047 * load_ms) * MS)  # 13.24 ms vs 74.77 ms cold
    st = core.stats()
    assert st.prefix_cache_queries == 3 * 2048 and st.prefix_cache_hits == 2032
    assert st.external_prefix_cache_queries == 3 * 2048 - 2032 and st.external_prefix_cache_hits == 15 + 2047
    assert st.prompt_tokens_cached == 2047 * 2 and st.generation_tokens == 12 and st.num_preemptions == 0


def test_chunked_prefill_mixes_decode_and_budget() -> None:
    core = EngineCore(EngineConfig(profile="a100", num_gpu_blocks=1000, lmcache_enabled=False))
    a = core.submit("a", toks(100, 1), 10, arrival_time=0.0)
    b = core.submit("b", toks(3000, 2), 2, arrival_time=0.0)
    core.run_until_idle()
    s1 = (13 + 0.1 + 2048 / 12) * MS  # a's 100 tokens + b's first 1948 tokens (budget 2048)
    s2 = (13 + 0.1 + 1052 / 12) * MS  # a decodes 1 token, b prefills the other 1052
    assert a.first_token_time == pytest.approx(s1)
    assert b.first_token_time == pytest.approx(s1 + s2)
    # then both decode together (2 seqs) until b finishes after one more step
    assert b.finish_time == pytest.approx(s1 + s2 + 13.1 * MS)
    assert a.finish_time == pytest.approx(s1 + s2 + 13.1 * MS + 7 * 13.0 * MS)


def test_max_num_seqs_queues_fcfs() -> None:
    core = small_core(max_num_seqs=2, lmcache_enabled=False)
    r = [core.submit(f"r{i}", toks(40, i), 5 + i, arrival_time=0.0) for i in range(3)]
    core.run_until_idle()
    assert r[0].scheduled_time == r[1].scheduled_time == 0.0
    assert r[2].scheduled_time == pytest.approx(r[0].finish_time)


def test_time_scale_shrinks_durations() -> None:
    fast = EngineCore(EngineConfig(time_scale=0.001, num_gpu_blocks=300))
    rec = run_one(fast, "a", toks(1000), max_tokens=3)
    assert rec.ttft == pytest.approx((6.5 + 1000 / 30) * MS * 0.001)


# ----------------------------------------------------------------------------------------- event-driven core


def scenario(core: EngineCore, *, upfront: bool, fast_forward: bool) -> list[tuple[str, str, float]]:
    rng = random.Random(42)
    shared = toks(600, 99)
    arrivals = []
    t = 0.0
    for i in range(40):
        t += rng.expovariate(20.0)
        body = shared + toks(rng.randrange(10, 400), i) if i % 2 else toks(rng.randrange(50, 900), 1000 + i)
        arrivals.append((t, f"q{i}", body, rng.randrange(1, 60)))
    out = []
    if upfront:
        for t, rid, body, mt in arrivals:
            core.submit(rid, body, mt, arrival_time=t)
    else:
        for t, rid, body, mt in arrivals:
            out += core.advance(t, fast_forward=fast_forward)
            core.submit(rid, body, mt, arrival_time=t)
    out += core.run_until_idle(fast_forward=fast_forward)
    return [(e.kind, e.req_id, e.time) for e in out]


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_fast_forward_equals_step_by_step(jitter: float) -> None:
    def mk() -> EngineCore:
        return EngineCore(
            EngineConfig(
                profile="a100",
                num_gpu_blocks=600,
                lmcache_capacity_chunks=4,
                max_num_seqs=8,
                max_num_batched_tokens=512,
                jitter=jitter,
                seed=3,
            )
        )

    slow_core, fast_core, upfront_core = mk(), mk(), mk()
    slow = scenario(slow_core, upfront=False, fast_forward=False)
    fast = scenario(fast_core, upfront=False, fast_forward=True)
    upfront = scenario(upfront_core, upfront=True, fast_forward=True)
    assert len(slow) == 80
    assert fast == slow  # exact: same float operations in the same order
    assert upfront == slow
    assert fast_core.stats() == slow_core.stats() == upfront_core.stats()
    assert fast_core.stats().num_steps == slow_core.stats().num_steps


def test_determinism_with_seed() -> None:
    def run(seed: int) -> list[tuple[str, str, float]]:
        core = EngineCore(EngineConfig(num_gpu_blocks=600, jitter=0.3, seed=seed))
        return scenario(core, upfront=True, fast_forward=True)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_next_event_time_is_exact_in_uniform_decode() -> None:
    core = small_core()
    core.submit("a", toks(64), 20, arrival_time=0.0)
    (ev,) = core.advance(1e-9)  # first step: prefill -> first token
    assert ev.kind == "first_token"
    t_next = core.next_event_time()
    assert t_next == pytest.approx(ev.time + 19 * 6.5 * MS)
    (fin,) = core.advance(t_next)
    assert fin.kind == "finished" and fin.time == t_next
    assert core.next_event_time() is None and core.is_idle()


def test_hash_only_prompts_share_prefixes() -> None:
    core = small_core(num_gpu_blocks=2000)
    a = Prompt.from_hash_ids([1, 2, 3], 1500)
    b = Prompt.from_hash_ids([1, 2, 9], 1400)
    assert a.tokens is None and len(a.block_hashes(16)) == 93 and len(a.chunk_hashes(256)) == 5
    assert a.block_hashes(16)[:64] == b.block_hashes(16)[:64] and a.block_hashes(16)[64] != b.block_hashes(16)[64]
    run_one(core, "a", a)
    assert run_one(core, "b", b).gpu_hit_tokens == 1024
    assert core.reset_prefix_cache()
    c = run_one(core, "c", Prompt.from_hash_ids([1, 2, 7], 1300))
    assert (c.gpu_hit_tokens, c.external_hit_tokens) == (0, 1024)  # chunks 0-3 shared through the LMCache tier
    with pytest.raises(ValueError):
        Prompt.from_hashes(100, [1, 2])


def test_rejects_oversized_requests() -> None:
    core = small_core(num_gpu_blocks=10, max_model_len=4096)
    with pytest.raises(ValueError):
        core.submit("big", toks(200), 10)  # 14 blocks > 9 usable
    with pytest.raises(ValueError):
        core.submit("x", [], 10)
    core2 = small_core(max_model_len=100)
    with pytest.raises(ValueError):
        core2.submit("y", toks(90), 20)
