"""Virtual-time runner: hashing, oracle, routing parity, pacing, scale helpers (no timing assertions)."""

from __future__ import annotations

import itertools

from kvgate_bench.modes import MODES, FleetSpec, resolve_modes
from kvgate_bench.oracle import oracle_hit_rate
from kvgate_bench.virtual import run_virtual
from kvgate_bench.virtual_requests import (
    mooncake_vrequests,
    oracle_from_prepared,
    prepare,
    prompt_hashes,
    tiled_mooncake_records,
)
from kvgate_bench.workloads import get_workload, mooncake_from_records
from kvgate_sim.engine_model import gpu_block_hashes
from kvgate_sim.protocol import lmcache_chunk_hashes


def _records() -> list[dict]:
    recs = []
    for i in range(40):
        shared = [0, 1, 2] if i % 2 == 0 else [0, 7]
        recs.append({"timestamp": i * 200, "input_length": 512 * (len(shared) + 2) - 100, "output_length": 160,
                     "hash_ids": [*shared, 100 + i, 200 + i]})  # fmt: skip
    return recs


def test_prompt_hashes_match_engine_and_lmcache() -> None:
    tokens = list(range(1000, 1000 + 700))
    blocks, chunks, key = prompt_hashes(tokens)
    assert blocks == gpu_block_hashes(tokens, 16)
    assert chunks == lmcache_chunk_hashes(tokens, 256)
    assert key != prompt_hashes(tokens[:-1])[2]


def test_oracle_from_prepared_equals_oracle_bound() -> None:
    wl = get_workload("multi_round_qa", num_users=3, num_rounds=3)
    assert abs(oracle_from_prepared(prepare(wl)) - oracle_hit_rate(wl.requests)) < 1e-12


def test_every_request_finishes_once_and_kvcache_beats_round_robin() -> None:
    wl = get_workload("multi_round_qa", num_users=6, num_rounds=3, qps=50.0)
    vreqs = prepare(wl)
    spec = FleetSpec(engines=3)
    runs = {m.name: run_virtual(m, vreqs, spec, wl.closed_loop) for m in resolve_modes(["round_robin", "kvcache"])}
    for run in runs.values():
        assert [r.req_id for r in run.results] == [r.req_id for r in wl.requests]
        assert all(r.ok and r.ttft_s is not None and r.e2e_s >= r.ttft_s for r in run.results)
        assert run.info["unfinished"] == 0
    assert runs["kvcache"].hit_rate > runs["round_robin"].hit_rate
    assert runs["kvcache"].info["routing_lookups"]["routed"] > 0


def test_sessions_respect_round_order() -> None:
    wl = get_workload("multi_round_qa", num_users=2, num_rounds=3, qps=100.0)
    run = run_virtual(MODES["round_robin"], prepare(wl), FleetSpec(engines=2), wl.closed_loop)
    by = {r.req_id: r for r in run.results}
    for u in ("1", "2"):
        rounds = [by[f"mrqa-u{u}-r{k}"] for k in range(3)]
        for a, b in itertools.pairwise(rounds):
            assert b.start_s >= a.start_s + a.e2e_s - 1e-9  # next round only after the previous finished


def test_phased_long_doc_qa_runs_all_phases() -> None:
    wl = get_workload("long_doc_qa", num_documents=3, document_length=300, pre_warmup_count=1, pre_warmup_len=50)
    run = run_virtual(MODES["kvcache"], prepare(wl), FleetSpec(engines=2), wl.closed_loop)
    assert len(run.results) == len(wl.requests)


def test_seed_mode_routes_only_repeated_prompts() -> None:
    wl = get_workload("long_doc_qa", num_documents=3, document_length=600, repeat_count=2, pre_warmup_count=0)
    run = run_virtual(MODES["kvcache-seed"], prepare(wl), FleetSpec(engines=3), wl.closed_loop)
    lookups = run.info["routing_lookups"]
    assert lookups["no_tokens"] == 3  # each document's first occurrence is never routed
    repeats = len(wl.requests) - 3  # warm-up round (first occurrences) + query round (2 repeats each)
    assert lookups.get("routed", 0) + lookups.get("empty", 0) + lookups.get("no_match", 0) == repeats


def test_hash_only_mooncake_matches_token_path() -> None:
    recs = _records()
    wl = mooncake_from_records(recs, time_scale=0.01, max_output_tokens=8)
    via_tokens = prepare(wl)
    hash_only = mooncake_vrequests(recs, time_scale=0.01, max_output_tokens=8)
    assert [v.num_tokens for v in via_tokens] == [v.num_tokens for v in hash_only]
    assert abs(oracle_from_prepared(via_tokens) - oracle_from_prepared(hash_only)) < 1e-12
    spec = FleetSpec(engines=2)
    for name in ("round_robin", "kvcache"):
        a = run_virtual(MODES[name], via_tokens, spec)
        b = run_virtual(MODES[name], hash_only, spec)
        assert abs(a.hit_rate - b.hit_rate) < 1e-9


def test_tiled_records_are_independent_tenants() -> None:
    recs = _records()
    tiled = tiled_mooncake_records(recs, 100)
    assert len(tiled) == 100
    ids = [tuple(r["hash_ids"]) for r in tiled]
    assert len(set(ids)) == 100  # copies share no full prompt
    assert [r["timestamp"] for r in tiled] == sorted(r["timestamp"] for r in tiled)
