"""Requests for the virtual-time runner, hashed once (TEST AND BENCHMARK TOOL).

:class:`VRequest` keeps a hash-only :class:`~kvgate_sim.engine_model.Prompt` (GPU block and LMCache chunk
hash chains, no token ids) that the engines and the routing lookups share. :func:`prepare` hashes a token
:class:`~kvgate_bench.workloads.Workload`; :func:`mooncake_vrequests` builds the Mooncake replay straight from
the trace's hash ids (:func:`hash_id_prompt`), :func:`tiled_mooncake_records` repeats the trace as independent
tenants for 10^5-request runs, and :func:`oracle_from_prepared` is the oracle hit rate from the hashes. Pure.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvgate_bench.workloads import Workload
from kvgate_sim.engine_model import Prompt
from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE

GPU_BLOCK_SIZE = 16


@dataclass(slots=True)
class VRequest:
    """One request as the virtual runner sees it (no token ids kept, only hashes)."""

    req_id: str
    prompt: Prompt
    max_tokens: int
    arrival_s: float
    key: int  # identity of the exact prompt (the kvcache token-cache key)
    session: str | None = None
    round_idx: int = 0
    phase: str = "main"

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens."""
        return self.prompt.num_tokens


def prompt_hashes(
    tokens: Sequence[int], block_size: int = GPU_BLOCK_SIZE, chunk_size: int = LMCACHE_CHUNK_SIZE
) -> tuple[list[int], list[int], int]:
    """(GPU block hashes, LMCache chunk hashes, exact-prompt key) of ``tokens``.

    Same values as :func:`kvgate_sim.engine_model.gpu_block_hashes` and
    :func:`kvgate_sim.protocol.lmcache_chunk_hashes` (for int token ids), computed without per-token
    conversion.
    """
    n = len(tokens)
    blocks: list[int] = []
    parent = 0
    for s in range(0, n - n % block_size, block_size):
        parent = hash((parent, tuple(tokens[s : s + block_size])))
        blocks.append(parent)
    chunks: list[int] = []
    prev = 0
    for s in range(0, n - n % chunk_size, chunk_size):
        prev = hash((prev, tuple(tokens[s : s + chunk_size]), ()))
        chunks.append(prev)
    key = hash((parent, tuple(tokens[n - n % block_size :]), n))
    return blocks, chunks, key


def prepare(workload: Workload, chunk_size: int = LMCACHE_CHUNK_SIZE) -> list[VRequest]:
    """Hash every request of ``workload`` once (GC paused: millions of small ints and tuples)."""
    out: list[VRequest] = []
    gc_on = gc.isenabled()
    gc.disable()
    try:
        for r in workload.requests:
            blocks, chunks, key = prompt_hashes(r.prompt_token_ids, GPU_BLOCK_SIZE, chunk_size)
            p = Prompt.from_hashes(len(r.prompt_token_ids), blocks, chunks, block_size=GPU_BLOCK_SIZE,
                                   chunk_size=chunk_size)  # fmt: skip
            out.append(VRequest(r.req_id, p, r.max_tokens, r.arrival_s, key, r.session_id, r.round_idx, r.phase))
    finally:
        if gc_on:
            gc.enable()
    return out


def oracle_from_prepared(vreqs: Iterable[VRequest], block_size: int = GPU_BLOCK_SIZE) -> float:
    """:func:`kvgate_bench.oracle.oracle_bound` (``cap_last_token``) from precomputed block hashes."""
    seen: set[int] = set()
    total = reusable = 0
    for v in vreqs:
        n = v.num_tokens
        keys = v.prompt.block_hashes(block_size)
        hit = 0
        for i, k in enumerate(keys):
            if k not in seen:
                break
            hit = (i + 1) * block_size
        if hit >= n:
            hit = ((n - 1) // block_size) * block_size if n > 0 else 0
        seen.update(keys)
        total += n
        reusable += hit
    return reusable / total if total else 0.0


def tiled_mooncake_records(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` trace records: the trace repeated as independent tenants (hash ids offset per copy).

    Copy k keeps the original timestamps (so the request rate is ``copies ×`` the trace's) and shifts every
    hash id by ``k × (max id + 1)``: copies share no prefix, each keeps the trace's internal reuse.
    """
    if not records:
        return []
    span = max(int(h) for r in records for h in r["hash_ids"]) + 1
    out: list[dict[str, Any]] = []
    k = 0
    while len(out) < n:
        off = k * span
        for r in records:
            if len(out) >= n:
                break
            out.append({**r, "hash_ids": [int(h) + off for h in r["hash_ids"]]})
        k += 1
    out.sort(key=lambda r: float(r["timestamp"]))
    return out


def mooncake_vrequests(
    records: Sequence[dict[str, Any]],
    *,
    block_tokens_scale: float = 1 / 16,
    time_scale: float = 0.1,
    output_scale: float = 1 / 16,
    max_output_tokens: int | None = 64,
    chunk_size: int = LMCACHE_CHUNK_SIZE,
) -> list[VRequest]:
    """Hash-only Mooncake replay: the shapes of :func:`~kvgate_bench.workloads.mooncake_from_records`.

    Same lengths, arrivals and ``max_tokens`` as the token path, but no token ids: each request's GPU-block
    and LMCache-chunk chains come from :func:`hash_id_prompt` (a unit keys on the hash ids of the segments it
    spans), so equal hash-id prefixes give equal block / chunk prefixes, as equal token blocks do. This is
    what makes 10^5-request replays take seconds instead of minutes.
    """
    from kvgate_bench.workloads import MOONCAKE_BLOCK_TOKENS, scaled_block_tokens

    bt = scaled_block_tokens(block_tokens_scale)
    t0 = float(records[0]["timestamp"]) if records else 0.0
    out: list[VRequest] = []
    gc_on = gc.isenabled()
    gc.disable()
    try:
        for i, rec in enumerate(records):
            ids = [int(h) for h in rec["hash_ids"]]
            if not ids:
                continue
            last_full = int(rec["input_length"]) - MOONCAKE_BLOCK_TOKENS * (len(ids) - 1)
            last_len = max(1, min(bt, math.ceil(last_full * bt / MOONCAKE_BLOCK_TOKENS)))
            n = bt * (len(ids) - 1) + last_len
            prompt = hash_id_prompt(ids, n, bt, chunk_size)
            mt = max(1, round(int(rec["output_length"]) * output_scale))
            if max_output_tokens is not None:
                mt = min(mt, max_output_tokens)
            arrival = (float(rec["timestamp"]) - t0) / 1000.0 * time_scale
            out.append(VRequest(f"mc-{i:06d}", prompt, mt, arrival, hash((tuple(ids), n))))
    finally:
        if gc_on:
            gc.enable()
    out.sort(key=lambda v: v.arrival_s)
    return out


def hash_id_prompt(
    ids: Sequence[int], num_tokens: int, segment_tokens: int, chunk_size: int = LMCACHE_CHUNK_SIZE
) -> Prompt:
    """A hash-only :class:`Prompt` whose chains key on per-segment hash ids (``segment_tokens`` per id).

    Fast path when blocks tile segments and segments tile chunks (e.g. 32-token segments, 16-token blocks,
    256-token chunks): block b of segment j keys on ``(parent, id_j, b)``, chunk c on the ids it spans.
    Otherwise :meth:`Prompt.from_hash_ids`. Either way a shared hash-id prefix gives a shared chain prefix.
    """
    bs = GPU_BLOCK_SIZE
    if segment_tokens % bs or chunk_size % segment_tokens:
        return Prompt.from_hash_ids(
            ids, num_tokens, segment_tokens=segment_tokens, block_size=bs, chunk_size=chunk_size
        )
    per_seg = segment_tokens // bs
    n_blocks = num_tokens // bs
    blocks: list[int] = []
    parent = 0
    for j, h in enumerate(ids):
        for b in range(per_seg):
            if j * per_seg + b >= n_blocks:
                break
            parent = hash((parent, h, b))
            blocks.append(parent)
    seg_per_chunk = chunk_size // segment_tokens
    chunks: list[int] = []
    prev = 0
    for c in range(num_tokens // chunk_size):
        prev = hash((prev, tuple(ids[c * seg_per_chunk : (c + 1) * seg_per_chunk]), ()))
        chunks.append(prev)
    return Prompt.from_hashes(num_tokens, blocks, chunks, block_size=bs, chunk_size=chunk_size)
