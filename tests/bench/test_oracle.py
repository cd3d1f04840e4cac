"""Oracle bound on hand-built cases."""

from __future__ import annotations

import pytest

from kvgate_bench.oracle import (
    chained_block_hashes,
    oracle_bound,
    oracle_hit_rate,
    oracle_table,
    trace_block_reuse,
)
from kvgate_bench.workloads import Request
from kvgate_sim.protocol import lmcache_chunk_hashes


def test_hand_built_block_reuse() -> None:
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 + 1 token
    b = [1, 2, 3, 4, 50, 60, 70, 80]  # shares block 0 with a
    c = [1, 2, 3, 4, 5, 6, 7, 8]  # fully cached: both blocks of a
    d = [9, 1, 2, 3, 4]  # same tokens, different position: no hit
    e = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # identical to a
    res = oracle_bound([a, b, c, d, e], block_size=4, cap_last_token=False)
    assert res.per_request == (0, 4, 8, 0, 8)
    assert res.total_tokens == 9 + 8 + 8 + 5 + 9
    assert res.reusable_tokens == 20
    assert res.fraction == pytest.approx(20 / 39)
    # vLLM: at most num_tokens - 1 tokens hit → c recomputes its last block
    capped = oracle_bound([a, b, c, d, e], block_size=4)
    assert capped.per_request == (0, 4, 4, 0, 8)
    # trailing partial block keyed too: e matches a up to its last token (then capped to n - 1 → 8)
    part = oracle_bound([a, b, c, d, e], block_size=4, cap_last_token=False, partial_last_block=True)
    assert part.per_request == (0, 4, 8, 0, 9)
    assert oracle_hit_rate([a, e], 4, cap_last_token=False) == pytest.approx(8 / 18)


def test_requests_and_granularity() -> None:
    base = list(range(1000, 1600))
    reqs = [
        Request("r0", "completion", [*base, 1], 1, prompt="x"),
        Request("r1", "completion", [*base, 2, 3], 1, prompt="y"),
    ]
    table = oracle_table(reqs, (16, 256))
    assert table[16].reusable_tokens == 592  # 37 full blocks of 16 within the 600 shared tokens
    assert table[256].reusable_tokens == 512
    assert table[16].requests == 2 and table[16].to_dict()["fraction"] == pytest.approx(592 / 1203)
    assert oracle_bound([], 16).fraction == 0.0
    with pytest.raises(ValueError):
        oracle_bound(reqs, 0)


def test_hashes_match_lmcache_chunk_keys() -> None:
    ids = list(range(700))
    assert chained_block_hashes(ids, 256) == lmcache_chunk_hashes(ids, 256)
    assert chained_block_hashes(ids, 256, partial=True) == lmcache_chunk_hashes(ids, 256, save_unfull_chunk=True)


def test_trace_block_reuse() -> None:
    recs = [{"hash_ids": [0, 1, 2]}, {"hash_ids": [0, 1, 3]}, {"hash_ids": [4]}]
    assert trace_block_reuse(recs) == pytest.approx(2 / 7)
    assert trace_block_reuse([]) == 0.0
