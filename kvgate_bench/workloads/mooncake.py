"""Mooncake FAST'25 trace replay: each 512-token hash id becomes a deterministic block of token ids."""

from __future__ import annotations

import gc
import gzip
import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvgate_bench.workloads.model import Request, RequestKind, Workload
from kvgate_bench.workloads.text import word_indices, word_pool
from kvgate_sim.tokenizer import get_tokenizer

#: The Mooncake trace vendored as package data (gzip; licence note in ``kvgate_bench/data/README.md``).
BUNDLED_TRACE_PATH = Path(__file__).resolve().parents[1] / "data" / "mooncake_conversation_trace.jsonl.gz"


def _default_trace_path() -> Path:
    """The Mooncake trace: ``$KVGATE_TRACE``, else the copy shipped inside this package."""
    env = os.environ.get("KVGATE_TRACE")
    return Path(env) if env else BUNDLED_TRACE_PATH


DEFAULT_TRACE_PATH = _default_trace_path()
MOONCAKE_BLOCK_TOKENS = 512


def load_mooncake_trace(path: str | Path = DEFAULT_TRACE_PATH, max_requests: int | None = None) -> list[dict[str, Any]]:
    """Read a Mooncake JSONL trace, plain or ``.gz``.

    Fields: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``."""
    records: list[dict[str, Any]] = []
    file = Path(path)
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as fh:
        for line in fh:
            if max_requests is not None and len(records) >= max_requests:
                break
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def scaled_block_tokens(block_tokens_scale: float) -> int:
    """Tokens per replayed block: ``max(1, round(512 × block_tokens_scale))``."""
    return max(1, round(MOONCAKE_BLOCK_TOKENS * block_tokens_scale))


def mooncake_trace(
    path: str | Path = DEFAULT_TRACE_PATH,
    max_requests: int | None = 400,
    block_tokens_scale: float = 1 / 16,
    time_scale: float = 0.1,
    seed: int = 0,
    *,
    output_scale: float = 1 / 16,
    max_output_tokens: int | None = 64,
    kind: RequestKind = "completion",
) -> Workload:
    """Replay a Mooncake trace (open loop): hash id h → a deterministic block of pool-word token ids.

    Block size ``B = scaled_block_tokens(block_tokens_scale)`` (512 at scale 1; 32 at the default 1/16).
    Token j of block h comes from a counter-based PRNG seeded by ``(seed, h)``, so equal hash ids give equal
    blocks and different ones (almost surely) different blocks; every id is a ``" word"`` token, so the
    prompt text re-encodes to exactly these ids. The last block keeps the trace's truncation:
    ``ceil((input_length − 512·(n−1)) × B / 512)`` tokens (at least 1). ``arrival_s = (timestamp −
    first timestamp) / 1000 × time_scale``; ``max_tokens = max(1, round(output_length × output_scale))``,
    capped by ``max_output_tokens``. Completions by default so blocks align with token positions;
    ``kind="chat"`` wraps the text in one user message (the template shifts alignment but keeps sharing).

    The defaults (first 400 requests, lengths × 1/16, 10× faster, outputs ≤ 64 tokens) suit a 2-core CPU
    box; ``max_requests=None, block_tokens_scale=1, time_scale=1, output_scale=1, max_output_tokens=None``
    replays the trace faithfully. Reuse builds up over the hour: the first 400 requests repeat ~13% of
    their blocks, the whole trace 36.6%.
    """
    records = load_mooncake_trace(path, max_requests)
    return mooncake_from_records(
        records,
        block_tokens_scale=block_tokens_scale,
        time_scale=time_scale,
        seed=seed,
        output_scale=output_scale,
        max_output_tokens=max_output_tokens,
        kind=kind,
        params={"path": str(path), "max_requests": max_requests},
    )


def mooncake_from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    block_tokens_scale: float = 1 / 16,
    time_scale: float = 0.1,
    seed: int = 0,
    output_scale: float = 1 / 16,
    max_output_tokens: int | None = None,
    kind: RequestKind = "completion",
    params: Mapping[str, Any] | None = None,
) -> Workload:
    """:func:`mooncake_trace` on already-loaded (or hand-built) trace records."""
    pool_ids, pool_strs = word_pool()
    bt = scaled_block_tokens(block_tokens_scale)
    unique = sorted({int(h) for rec in records for h in rec["hash_ids"]})
    block_ids: dict[int, list[int]] = {}
    block_text: dict[int, str] = {}
    step = 4096
    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of small lists: skip needless generational collections
    try:
        for s in range(0, len(unique), step):
            keys = unique[s : s + step]
            for h, row in zip(keys, word_indices(keys, bt, seed).tolist(), strict=True):
                pick = operator.itemgetter(*row) if bt > 1 else (lambda seq, _i=row[0]: (seq[_i],))
                block_ids[h] = list(pick(pool_ids))
                block_text[h] = "".join(pick(pool_strs))
        requests = _mooncake_requests(
            records, block_ids, block_text, bt, time_scale, output_scale, max_output_tokens, kind
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    requests.sort(key=lambda q: q.arrival_s)
    all_params: dict[str, Any] = dict(params or {})
    all_params.update(
        {
            "block_tokens_scale": block_tokens_scale,
            "block_tokens": bt,
            "time_scale": time_scale,
            "seed": seed,
            "output_scale": output_scale,
            "max_output_tokens": max_output_tokens,
            "kind": kind,
        }
    )
    return Workload(
        name="mooncake",
        params=all_params,
        requests=requests,
        description="Mooncake FAST'25 conversation trace replay (hash-id blocks → token blocks)",
    )


def _mooncake_requests(
    records: Sequence[Mapping[str, Any]],
    block_ids: Mapping[int, list[int]],
    block_text: Mapping[int, str],
    bt: int,
    time_scale: float,
    output_scale: float,
    max_output_tokens: int | None,
    kind: RequestKind,
) -> list[Request]:
    """Assemble one request per trace record from the per-hash-id blocks."""
    pool_ids, pool_strs = word_pool()
    text_of = dict(zip(pool_ids, pool_strs, strict=True))
    tok = get_tokenizer() if kind == "chat" else None
    t0 = float(records[0]["timestamp"]) if records else 0.0
    requests: list[Request] = []
    for i, rec in enumerate(records):
        hashes = [int(h) for h in rec["hash_ids"]]
        if not hashes:
            continue
        last_full = int(rec["input_length"]) - MOONCAKE_BLOCK_TOKENS * (len(hashes) - 1)
        last_len = max(1, min(bt, math.ceil(last_full * bt / MOONCAKE_BLOCK_TOKENS)))
        ids: list[int] = []
        for h in hashes[:-1]:
            ids.extend(block_ids[h])
        tail = block_ids[hashes[-1]][:last_len]
        ids.extend(tail)
        tail_text = block_text[hashes[-1]] if last_len == bt else "".join(map(text_of.__getitem__, tail))
        text = "".join([block_text[h] for h in hashes[:-1]]) + tail_text
        out = max(1, round(int(rec["output_length"]) * output_scale))
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        arrival = (float(rec["timestamp"]) - t0) / 1000.0 * time_scale
        if kind == "chat":
            requests.append(Request.single_turn(f"mc-{i:05d}", "chat", text, out, arrival, tokenizer=tok))
        else:
            requests.append(Request(f"mc-{i:05d}", "completion", ids, out, arrival, prompt=text))
    return requests
