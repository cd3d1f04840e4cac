"""SIMULATOR: a pure, event-driven model of one vLLM engine with an LMCache CPU tier (test and benchmark tool).

Nothing here does I/O or asyncio; time is a float (seconds) owned by :class:`EngineCore` (virtual time)
or read from an injected clock (real-time server). The model reproduces the parts of vLLM 0.32 that a
KV-cache-aware router can observe:

* **GPU prefix cache** (:class:`GPUPrefixCache`): 16-token blocks, chained block hashes, vLLM's
  ``FreeKVCacheBlockQueue`` LRU (blocks freed in reverse order, cached blocks with ``ref_cnt == 0`` stay
  in the free queue until reallocated), hit capped at ``num_tokens - 1`` (last-token recompute),
  ``kv_cache_usage_perc = 1 - free / (num_blocks - 1)`` (block 0 is vLLM's null block).
* **LMCache CPU tier** (:class:`LMCacheTier`): 256-token chunks keyed by :func:`lmcache_chunk_hashes`,
  LRU with pins, compression accounting, admit/evict :class:`KVOp` batches to an :data:`OpSink`.
* **Scheduler + timing** (:class:`EngineCore`): FCFS, ``max_num_seqs``, ``max_num_batched_tokens``,
  chunked prefill mixing decodes and prefill chunks; step time from a named :class:`EngineProfile`;
  fast-forward over runs of identical decode steps so 10^5-request traces run in seconds.

Known divergences from vLLM/LMCache are listed in :data:`DIVERGENCES`.

One concept per module: :mod:`kvgate_sim.profiles` (profiles, :class:`EngineConfig`), :mod:`kvgate_sim.prompts`
(:class:`Prompt`, block hashes), :mod:`kvgate_sim.gpu_cache`, :mod:`kvgate_sim.lmcache_tier`,
:mod:`kvgate_sim.records` (what the model reports), :mod:`kvgate_sim.engine_state` (scheduler bookkeeping, step
timing), :mod:`kvgate_sim.engine_scheduler` (the scheduler, one step at a time) and :mod:`kvgate_sim.engine_core`
(virtual-time driving, worker commands). This module is their public face.
"""

from __future__ import annotations

from kvgate_sim.engine_core import EngineCore
from kvgate_sim.gpu_cache import GPUPrefixCache
from kvgate_sim.lmcache_tier import LMCacheTier
from kvgate_sim.profiles import KV_BYTES_PER_TOKEN_LLAMA3_8B, PROFILES, EngineConfig, EngineProfile
from kvgate_sim.prompts import GPU_NONE_HASH, Prompt, gpu_block_hashes
from kvgate_sim.records import EngineEvent, EngineStats, RequestRecord, StepResult

DIVERGENCES = (
    "KV blocks for prompt + max_tokens are reserved at admission (vLLM allocates per step and preempts); "
    "the simulator never preempts, so num_preemptions stays 0.",
    "Output tokens are never cached in the GPU prefix cache or the LMCache tier (only prompt blocks/chunks).",
    "Every request generates exactly max_tokens tokens (no EOS; finish_reason is always 'length').",
    "Block hashes use Python's builtin hash of (parent, tuple(block)) instead of sha256; no cache_salt/LoRA keys.",
    "Scheduling order is decodes first, then running prefills, then waiting (vLLM walks its running list in order).",
    "LMCache chunks are touched (LRU) only when loaded; stores of already-present chunks do not refresh them.",
    "Compression halves the stored bytes for any method (no CacheGen model lookup).",
)

__all__ = [
    "DIVERGENCES", "GPU_NONE_HASH", "KV_BYTES_PER_TOKEN_LLAMA3_8B", "PROFILES", "EngineConfig", "EngineCore",
    "EngineEvent", "EngineProfile", "EngineStats", "GPUPrefixCache", "LMCacheTier", "Prompt", "RequestRecord",
    "StepResult", "gpu_block_hashes",
]  # fmt: skip
