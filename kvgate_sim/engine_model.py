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
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kvgate_sim.protocol import DEFAULT_LOCATION, LMCACHE_CHUNK_SIZE, KVOp, OpSink, lmcache_chunk_hashes

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

KV_BYTES_PER_TOKEN_LLAMA3_8B = 2 * 32 * 8 * 128 * 2  # K+V × layers × KV heads × head dim × bf16 = 128 KiB
GPU_NONE_HASH = 0


# --------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """Timing and capacity constants in ms/token units (reference: vllm-and-workloads.md §3, Llama-3-8B bf16).

    Step time = ``decode_base_ms + decode_ms_per_seq × (seqs_in_step − 1) + prefill_ms_per_token × computed
    prompt tokens + lmcache_load_ms_per_token × tokens loaded from the LMCache tier``.
    """

    name: str
    prefill_ms_per_token: float
    decode_base_ms: float
    decode_ms_per_seq: float
    lmcache_load_ms_per_token: float
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_cache_bytes: int
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN_LLAMA3_8B


PROFILES: dict[str, EngineProfile] = {
    # H100-80GB: prefill 30k tok/s; decode 6.5 ms + 0.3 ms per extra running seq; LMCache load over
    # PCIe Gen5 at ~40 GB/s effective: 128 KiB / 40 GB/s = 3.3 µs/token (≈1/10 of prefill).
    # KV space: 80 GB × 0.9 − 16.1 GB weights − activations ≈ 54 GB ≈ 412k tokens.
    "h100": EngineProfile(
        name="h100",
        prefill_ms_per_token=1000.0 / 30_000,
        decode_base_ms=6.5,
        decode_ms_per_seq=0.3,
        lmcache_load_ms_per_token=KV_BYTES_PER_TOKEN_LLAMA3_8B / 40e9 * 1000.0,
        max_num_batched_tokens=8192,
        max_num_seqs=1024,
        kv_cache_bytes=54 * 10**9,
    ),
    # A100-80GB: prefill 12k tok/s; decode ≈13 ms nearly flat (+0.1 ms per extra seq); LMCache load over
    # PCIe Gen4 at ~22 GB/s effective: 6.0 µs/token (≈1/14 of prefill). Same KV space as above.
    "a100": EngineProfile(
        name="a100",
        prefill_ms_per_token=1000.0 / 12_000,
        decode_base_ms=13.0,
        decode_ms_per_seq=0.1,
        lmcache_load_ms_per_token=KV_BYTES_PER_TOKEN_LLAMA3_8B / 22e9 * 1000.0,
        max_num_batched_tokens=2048,
        max_num_seqs=256,
        kv_cache_bytes=54 * 10**9,
    ),
}


@dataclass(frozen=True)
class EngineConfig:
    """One simulated engine. ``time_scale`` multiplies every modelled duration (0.001 = 1000× faster)."""

    instance_id: str = "sim-0"
    model_name: str = "qwen2.5-7b-instruct"
    profile: str | EngineProfile = "h100"
    time_scale: float = 1.0
    block_size: int = 16
    num_gpu_blocks: int | None = None  # default: profile.kv_cache_bytes // (kv_bytes_per_token × block_size)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int = 32_768
    lmcache_enabled: bool = True
    lmcache_chunk_size: int = LMCACHE_CHUNK_SIZE
    lmcache_capacity_chunks: int = 2048  # 2048 × 32 MiB = 64 GiB of host DRAM
    lmcache_location: str = DEFAULT_LOCATION
    pin_timeout_s: float = 300.0  # not scaled by time_scale
    compression_ratio: float = 0.5
    seed: int = 0
    jitter: float = 0.0  # each step's duration × U(1 − jitter, 1 + jitter), seeded

    def resolved_profile(self) -> EngineProfile:
        if isinstance(self.profile, EngineProfile):
            return self.profile
        try:
            return PROFILES[self.profile]
        except KeyError:
            raise ValueError(f"unknown engine profile {self.profile!r}; known: {sorted(PROFILES)}") from None

    def resolved_num_gpu_blocks(self) -> int:
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        p = self.resolved_profile()
        return p.kv_cache_bytes // (p.kv_bytes_per_token * self.block_size)


# --------------------------------------------------------------------------------------------- prompts


def gpu_block_hashes(tokens: Sequence[int], block_size: int = 16, parent: int = GPU_NONE_HASH) -> list[int]:
    """Chained GPU block hashes over full blocks: ``h_i = hash((h_{i-1}, tuple(block_i)))``."""
    out: list[int] = []
    n_full = len(tokens) - len(tokens) % block_size
    for start in range(0, n_full, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        out.append(parent)
    return out


def _synthetic_chain(hash_ids: Sequence[int], num_tokens: int, segment_tokens: int, unit: int, tag: int) -> list[int]:
    out: list[int] = []
    parent = GPU_NONE_HASH
    for start in range(0, num_tokens - num_tokens % unit, unit):
        ids = tuple(hash_ids[start // segment_tokens : (start + unit - 1) // segment_tokens + 1])
        parent = hash((parent, (tag, ids, start)))
        out.append(parent)
    return out


class Prompt:
    """A prompt given by token ids and/or precomputed hash chains (so huge traces are hashed once, not per engine).

    ``Prompt(tokens)`` hashes lazily and caches per block/chunk size; ``Prompt.from_hashes`` carries only
    lengths and hash lists (``tokens_factory`` optional); ``Prompt.from_hash_ids`` derives both chains from
    Mooncake-style per-segment hash ids (shared id prefix ⇒ shared block and chunk prefix).
    """

    __slots__ = ("_block_hashes", "_chunk_hashes", "_tokens", "_tokens_factory", "num_tokens")

    def __init__(self, tokens: Sequence[int]):
        self._tokens: Sequence[int] | None = tokens
        self._tokens_factory: Callable[[], Sequence[int]] | None = None
        self.num_tokens = len(tokens)
        self._block_hashes: dict[int, list[int]] = {}
        self._chunk_hashes: dict[int, list[int]] = {}

    @classmethod
    def from_hashes(
        cls,
        num_tokens: int,
        block_hashes: Sequence[int],
        chunk_hashes: Sequence[int] = (),
        *,
        block_size: int = 16,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
        tokens_factory: Callable[[], Sequence[int]] | None = None,
    ) -> Prompt:
        if len(block_hashes) != num_tokens // block_size:
            raise ValueError(f"need {num_tokens // block_size} block hashes, got {len(block_hashes)}")
        if chunk_hashes and len(chunk_hashes) != num_tokens // chunk_size:
            raise ValueError(f"need {num_tokens // chunk_size} chunk hashes, got {len(chunk_hashes)}")
        p = cls.__new__(cls)
        p._tokens = None
        p._tokens_factory = tokens_factory
        p.num_tokens = num_tokens
        p._block_hashes = {block_size: list(block_hashes)}
        p._chunk_hashes = {chunk_size: list(chunk_hashes)} if chunk_hashes or num_tokens < chunk_size else {}
        return p

    @classmethod
    def from_hash_ids(
        cls,
        hash_ids: Sequence[int],
        num_tokens: int,
        *,
        segment_tokens: int = 512,
        block_size: int = 16,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
    ) -> Prompt:
        """Synthetic chains for trace replay: unit starting at token ``s`` keys on the ids of the segments it spans."""
        if num_tokens > len(hash_ids) * segment_tokens:
            raise ValueError("num_tokens exceeds len(hash_ids) × segment_tokens")
        return cls.from_hashes(
            num_tokens,
            _synthetic_chain(hash_ids, num_tokens, segment_tokens, block_size, 1),
            _synthetic_chain(hash_ids, num_tokens, segment_tokens, chunk_size, 2),
            block_size=block_size,
            chunk_size=chunk_size,
        )

    @property
    def tokens(self) -> Sequence[int] | None:
        if self._tokens is None and self._tokens_factory is not None:
            self._tokens = self._tokens_factory()
        return self._tokens

    def block_hashes(self, block_size: int) -> list[int]:
        cached = self._block_hashes.get(block_size)
        if cached is None:
            tokens = self.tokens
            if tokens is None:
                raise ValueError(f"hash-only prompt has no block hashes for block_size={block_size}")
            cached = self._block_hashes[block_size] = gpu_block_hashes(tokens, block_size)
        return cached

    def chunk_hashes(self, chunk_size: int = LMCACHE_CHUNK_SIZE) -> list[int]:
        cached = self._chunk_hashes.get(chunk_size)
        if cached is None:
            tokens = self.tokens
            if tokens is None:
                raise ValueError(f"hash-only prompt has no chunk hashes for chunk_size={chunk_size}")
            cached = self._chunk_hashes[chunk_size] = lmcache_chunk_hashes(tokens, chunk_size)
        return cached


# --------------------------------------------------------------------------------------------- GPU cache


class GPUPrefixCache:
    """vLLM v1 block pool with prefix caching (simulated; block ids only, no tensors)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._hash: list[int | None] = [None] * num_blocks
        self._ref: list[int] = [0] * num_blocks
        self._cached: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def match(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes`` (at most ``max_blocks``); no side effects."""
        out: list[int] = []
        cached = self._cached
        for i in range(min(max_blocks, len(hashes))):
            b = cached.get(hashes[i])
            if b is None:
                break
            out.append(b)
        return out

    def num_free_in(self, blocks: Sequence[int]) -> int:
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Sequence[int]) -> None:
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out: list[int] = []
        free, hashes, cached, ref = self._free, self._hash, self._cached, self._ref
        for _ in range(n):
            b, _v = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                hashes[b] = None
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def cache(self, block: int, block_hash: int) -> None:
        if block_hash not in self._cached and self._hash[block] is None:
            self._cached[block_hash] = block
            self._hash[block] = block_hash

    def free(self, blocks: Sequence[int]) -> None:
        """Release a request's blocks, tail first, so chain tails sit nearer the eviction end."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def eviction_order(self) -> list[int]:
        """Free blocks, next to be reallocated first (for tests and debugging)."""
        return list(self._free)

    def block_hash(self, block: int) -> int | None:
        return self._hash[block]

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def reset(self) -> bool:
        """vLLM's reset_prefix_cache: only when no block is in use."""
        if len(self._free) != self.num_blocks - 1:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        return True


# --------------------------------------------------------------------------------------------- LMCache tier


@dataclass(slots=True)
class _Chunk:
    compressed: bool = False
    method: str | None = None
    pinned_until: float = -math.inf


class LMCacheTier:
    """Simulated LMCache ``LocalCPUBackend`` of one worker: LRU chunks, pins, compression, admit/evict ops."""

    def __init__(
        self,
        instance_id: str,
        capacity_chunks: int,
        *,
        clock: Callable[[], float],
        sink: OpSink | None = None,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
        kv_bytes_per_token: int = KV_BYTES_PER_TOKEN_LLAMA3_8B,
        location: str = DEFAULT_LOCATION,
        pin_timeout_s: float = 300.0,
        compression_ratio: float = 0.5,
        worker_id: int = 0,
    ):
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.location = location
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_size * kv_bytes_per_token
        self.compressed_bytes = int(self.chunk_bytes * compression_ratio)
        self.capacity_bytes = capacity_chunks * self.chunk_bytes
        self.used_bytes = 0
        self.pin_timeout_s = pin_timeout_s
        self.sink = sink
        self._clock = clock
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._seq = 0
        self.admits = 0
        self.evictions = 0

    # -- introspection
    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: int) -> bool:
        return key in self._chunks

    def keys(self) -> list[int]:
        """Stored chunk keys, least recently used first."""
        return list(self._chunks)

    def is_pinned(self, key: int) -> bool:
        c = self._chunks.get(key)
        return c is not None and c.pinned_until > self._clock()

    def is_compressed(self, key: int) -> bool:
        c = self._chunks.get(key)
        return c is not None and c.compressed

    # -- internals
    def _size(self, c: _Chunk) -> int:
        return self.compressed_bytes if c.compressed else self.chunk_bytes

    def _emit(self, ops: list[KVOp]) -> None:
        if ops and self.sink is not None:
            self.sink(self.instance_id, self.worker_id, self.location, ops)

    def _op(self, op_type: Literal["admit", "evict"], key: int) -> KVOp:
        self._seq += 1
        return KVOp(op_type, key, self._seq)

    def _remove(self, key: int, ops: list[KVOp]) -> None:
        c = self._chunks.pop(key)
        self.used_bytes -= self._size(c)
        self.evictions += 1
        ops.append(self._op("evict", key))

    def _make_room(self, needed: int, ops: list[KVOp], protect: set[int] | frozenset[int] = frozenset()) -> bool:
        if self.used_bytes + needed <= self.capacity_bytes:
            return True
        now = self._clock()
        victims: list[int] = []
        freed = 0
        for key, c in self._chunks.items():
            if c.pinned_until > now or key in protect:
                continue
            victims.append(key)
            freed += self._size(c)
            if self.used_bytes - freed + needed <= self.capacity_bytes:
                break
        if self.used_bytes - freed + needed > self.capacity_bytes:
            return False
        for key in victims:
            self._remove(key, ops)
        return True

    # -- key-level API (used by the engine and by hash-only benchmarks)
    def lookup(self, keys: Sequence[int]) -> int:
        """Number of leading ``keys`` stored (LMCache's prefix lookup); no LRU update."""
        n = 0
        for k in keys:
            if k not in self._chunks:
                break
            n += 1
        return n

    def touch(self, keys: Sequence[int]) -> None:
        for k in keys:
            if k in self._chunks:
                self._chunks.move_to_end(k)

    def store(self, keys: Sequence[int]) -> int:
        """Store full chunks; returns the number newly admitted (stops when nothing more can be evicted)."""
        ops: list[KVOp] = []
        admitted = 0
        protect = set(keys)
        for k in keys:
            if k in self._chunks:
                continue
            if not self._make_room(self.chunk_bytes, ops, protect):
                break
            self._chunks[k] = _Chunk()
            self.used_bytes += self.chunk_bytes
            self.admits += 1
            admitted += 1
            ops.append(self._op("admit", k))
        self._emit(ops)
        return admitted

    def pin_keys(self, keys: Sequence[int], timeout_s: float | None = None) -> int:
        until = self._clock() + (self.pin_timeout_s if timeout_s is None else timeout_s)
        n = self.lookup(keys)
        for k in keys[:n]:
            c = self._chunks[k]
            c.pinned_until = max(c.pinned_until, until)
        return n

    def unpin_keys(self, keys: Sequence[int]) -> int:
        n = 0
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and c.pinned_until > -math.inf:
                c.pinned_until = -math.inf
                n += 1
        return n

    def compress_keys(self, keys: Sequence[int], method: str) -> int:
        n = 0
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and not c.compressed:
                self.used_bytes -= self.chunk_bytes - self.compressed_bytes
                c.compressed, c.method = True, method
                n += 1
        return n

    def decompress_keys(self, keys: Sequence[int], method: str) -> int:
        ops: list[KVOp] = []
        n = 0
        protect = set(keys)
        for k in keys:
            c = self._chunks.get(k)
            if c is None or not c.compressed:
                continue
            if not self._make_room(self.chunk_bytes - self.compressed_bytes, ops, protect):
                break
            self.used_bytes += self.chunk_bytes - self.compressed_bytes
            c.compressed, c.method = False, None
            n += 1
        self._emit(ops)
        return n

    def evict_keys(self, keys: Sequence[int]) -> int:
        """Drop the given chunks unless pinned; returns chunks evicted."""
        ops: list[KVOp] = []
        now = self._clock()
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and c.pinned_until <= now:
                self._remove(k, ops)
        self._emit(ops)
        return len(ops)

    def clear_all(self) -> int:
        """Drop every unpinned chunk (pinned chunks survive until their pin expires, like LMCache)."""
        now = self._clock()
        ops: list[KVOp] = []
        for k in [k for k, c in self._chunks.items() if c.pinned_until <= now]:
            self._remove(k, ops)
        self._emit(ops)
        return len(ops)

    # -- token-level WorkerControl operations
    def _keys(self, tokens: Sequence[int]) -> list[int]:
        return lmcache_chunk_hashes(tokens, self.chunk_size)

    def _loc_ok(self, location: str | None) -> bool:
        return location is None or location == self.location

    def clear(self, location: str) -> int:
        return self.clear_all() * self.chunk_size if self._loc_ok(location) else 0

    def pin(self, tokens: Sequence[int], location: str) -> int:
        return self.pin_keys(self._keys(tokens)) * self.chunk_size if self._loc_ok(location) else 0

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.compress_keys(self._keys(tokens), method) * self.chunk_size if self._loc_ok(location) else 0

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.decompress_keys(self._keys(tokens), method) * self.chunk_size if self._loc_ok(location) else 0

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int:
        return self.evict_keys(self._keys(tokens)) * self.chunk_size if self._loc_ok(location) else 0

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        if not self._loc_ok(location):
            return []
        keys = self._keys(tokens)
        return [(k, self.chunk_size) for k in keys[: self.lookup(keys)]]

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        if not self._loc_ok(location):
            return 0
        keys = self._keys(tokens)
        self.store(keys)
        return self.lookup(keys) * self.chunk_size

    def health(self) -> int:
        return 0


# --------------------------------------------------------------------------------------------- requests


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in the engine's clock, seconds)."""

    req_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    gpu_hit_tokens: int = 0
    external_hit_tokens: int = 0
    output_tokens: int = 0  # final count; not updated token by token during decode
    aborted: bool = False

    @property
    def cached_tokens(self) -> int:
        return self.gpu_hit_tokens + self.external_hit_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: Literal["first_token", "finished"]
    req_id: str
    time: float
    record: RequestRecord


@dataclass(slots=True)
class StepResult:
    start: float
    end: float
    num_decode_seqs: int
    prefill_tokens: int
    loaded_tokens: int
    num_admitted: int
    emitted: list[str]  # requests that produced one output token this step (only with collect_tokens)
    events: list[EngineEvent]

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class EngineStats:
    prefix_cache_queries: int
    prefix_cache_hits: int
    external_prefix_cache_queries: int
    external_prefix_cache_hits: int
    prompt_tokens: int
    prompt_tokens_cached: int
    generation_tokens: int
    num_preemptions: int
    num_requests_finished: int
    num_requests_aborted: int
    num_steps: int
    num_running: int
    num_waiting: int
    kv_cache_usage_perc: float
    gpu_cached_blocks: int
    gpu_evictions: int
    lmcache_chunks: int
    lmcache_used_bytes: int
    lmcache_capacity_bytes: int
    lmcache_evictions: int


_WAITING, _PREFILL, _DECODE, _DONE = 0, 1, 2, 3


class _Req:
    __slots__ = ("blocks", "cached_blocks", "computed", "g_fin", "prompt", "rec", "seq", "state", "stored_chunks")

    def __init__(self, rec: RequestRecord, prompt: Prompt, seq: int):
        self.rec = rec
        self.prompt = prompt
        self.seq = seq
        self.state = _WAITING
        self.blocks: list[int] = []
        self.computed = 0
        self.cached_blocks = 0
        self.stored_chunks = 0
        self.g_fin = 0


# --------------------------------------------------------------------------------------------- engine core


@dataclass
class _Counters:
    queries: int = 0
    hits: int = 0
    ext_queries: int = 0
    ext_hits: int = 0
    prompt_tokens: int = 0
    prompt_cached: int = 0
    gen_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0


class EngineCore:
    """SIMULATOR: one vLLM engine (scheduler + GPU prefix cache + LMCache tier) in virtual or injected time.

    Virtual time (``clock=None``): ``submit`` (optionally with a future ``arrival_time``), then ``advance(until)``
    / ``run_until_idle()``; events are ``first_token`` and ``finished``. Real time (``clock`` given): call
    ``step()`` repeatedly; each step starts at ``max(now, clock())``. Also a :class:`WorkerControl`.
    """

    def __init__(self, config: EngineConfig | None = None, *, sink: OpSink | None = None,
                 clock: Callable[[], float] | None = None):
        cfg = config or EngineConfig()
        self.config = cfg
        self.profile = prof = cfg.resolved_profile()
        self.instance_id = cfg.instance_id
        self.worker_id = 0
        self.block_size = cfg.block_size
        self.max_num_seqs = cfg.max_num_seqs or prof.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens or prof.max_num_batched_tokens
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (as vLLM requires)")
        if prof.decode_base_ms <= 0 or cfg.time_scale <= 0:
            raise ValueError("decode_base_ms and time_scale must be > 0")
        if not 0.0 <= cfg.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        s = 1e-3 * cfg.time_scale
        self._base = prof.decode_base_ms * s
        self._per_seq = prof.decode_ms_per_seq * s
        self._prefill = prof.prefill_ms_per_token * s
        self._load = prof.lmcache_load_ms_per_token * s
        self._jitter = cfg.jitter
        self._rng = random.Random(cfg.seed)
        self._clock = clock
        self._now = clock() if clock is not None else 0.0
        self.gpu = GPUPrefixCache(cfg.resolved_num_gpu_blocks(), cfg.block_size)
        self.tier: LMCacheTier | None = None
        if cfg.lmcache_enabled:
            self.tier = LMCacheTier(
                cfg.instance_id, cfg.lmcache_capacity_chunks, clock=clock or self._virtual_now, sink=sink,
                chunk_size=cfg.lmcache_chunk_size, kv_bytes_per_token=prof.kv_bytes_per_token,
                location=cfg.lmcache_location, pin_timeout_s=cfg.pin_timeout_s,
                compression_ratio=cfg.compression_ratio,
            )
        self._future: list[tuple[float, int, _Req]] = []
        self._waiting: deque[_Req] = deque()
        self._prefilling: list[_Req] = []
        self._decoding: dict[str, _Req] = {}
        self._heap: list[tuple[int, int, _Req]] = []
        self._reqs: dict[str, _Req] = {}
        self._head_blocked = False
        self._g = 0  # number of steps that ran decodes so far
        self._seq = 0
        self._c = _Counters()

    # -- time & state
    def _virtual_now(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._future)

    @property
    def kv_cache_usage_perc(self) -> float:
        return self.gpu.usage()

    def is_idle(self) -> bool:
        return not (self._prefilling or self._decoding or self._waiting or self._future)

    def stats(self) -> EngineStats:
        c, tier = self._c, self.tier
        return EngineStats(
            prefix_cache_queries=c.queries, prefix_cache_hits=c.hits,
            external_prefix_cache_queries=c.ext_queries, external_prefix_cache_hits=c.ext_hits,
            prompt_tokens=c.prompt_tokens, prompt_tokens_cached=c.prompt_cached, generation_tokens=c.gen_tokens,
            num_preemptions=0, num_requests_finished=c.finished, num_requests_aborted=c.aborted,
            num_steps=c.steps, num_running=self.num_running, num_waiting=self.num_waiting,
            kv_cache_usage_perc=self.gpu.usage(), gpu_cached_blocks=self.gpu.num_cached,
            gpu_evictions=self.gpu.evictions,
            lmcache_chunks=len(tier) if tier else 0, lmcache_used_bytes=tier.used_bytes if tier else 0,
            lmcache_capacity_bytes=tier.capacity_bytes if tier else 0,
            lmcache_evictions=tier.evictions if tier else 0,
        )

    def request(self, req_id: str) -> RequestRecord | None:
        r = self._reqs.get(req_id)
        return r.rec if r is not None else None

    # -- durations
    def step_duration(self, num_seqs: int, prefill_tokens: int, loaded_tokens: int) -> float:
        """Un-jittered modelled duration (seconds, time_scale applied) of one step."""
        return (self._base + self._per_seq * (num_seqs - 1) + self._prefill * prefill_tokens
                + self._load * loaded_tokens)

    def _jittered(self, d: float) -> float:
        if self._jitter:
            return d * (1.0 + self._rng.uniform(-self._jitter, self._jitter))
        return d

    # -- submission
    def submit(self, req_id: str, prompt: Prompt | Sequence[int], max_tokens: int, *,
               arrival_time: float | None = None) -> RequestRecord:
        """Queue a request. ``arrival_time`` in the future (virtual time) defers it until then."""
        if req_id in self._reqs:
            raise ValueError(f"duplicate request id {req_id!r}")
        p = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
        n = p.num_tokens
        if n < 1:
            raise ValueError("prompt must have at least one token")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if n + max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({n}) + max_tokens ({max_tokens}) exceeds max_model_len "
                             f"{self.config.max_model_len}")
        if -(-(n + max_tokens) // self.block_size) > self.gpu.num_blocks - 1:
            raise ValueError("request does not fit in the simulated GPU KV cache")
        p.block_hashes(self.block_size)  # hash now (once), so admission never fails half-way
        if self.tier is not None:
            p.chunk_hashes(self.tier.chunk_size)
        if arrival_time is None:
            arrival_time = self._clock() if self._clock is not None else self._now
        rec = RequestRecord(req_id, n, max_tokens, arrival_time)
        self._seq += 1
        r = _Req(rec, p, self._seq)
        self._reqs[req_id] = r
        if arrival_time > self._now and self._clock is None:
            heapq.heappush(self._future, (arrival_time, r.seq, r))
        else:
            self._waiting.append(r)
        return rec

    def abort(self, req_id: str) -> bool:
        """Drop a request wherever it is; frees its blocks. No event is emitted."""
        r = self._reqs.pop(req_id, None)
        if r is None:
            return False
        if r.state == _WAITING:
            if r in self._waiting:
                self._waiting.remove(r)
            else:
                self._future = [e for e in self._future if e[2] is not r]
                heapq.heapify(self._future)
        elif r.state == _PREFILL:
            self._prefilling.remove(r)
            self.gpu.free(r.blocks)
        elif r.state == _DECODE:
            del self._decoding[req_id]
            self.gpu.free(r.blocks)
        r.state = _DONE
        r.rec.aborted = True
        self._c.aborted += 1
        self._head_blocked = False
        return True

    def _release_arrivals(self) -> None:
        fut = self._future
        while fut and fut[0][0] <= self._now:
            self._waiting.append(heapq.heappop(fut)[2])

    # -- admission
    def _try_admit(self, r: _Req) -> bool:
        bs = self.block_size
        p = r.prompt
        n = p.num_tokens
        hashes = p.block_hashes(bs)
        hit = self.gpu.match(hashes, (n - 1) // bs)
        need = -(-(n + r.rec.max_tokens) // bs) - len(hit)
        if need > self.gpu.num_free - self.gpu.num_free_in(hit):
            return False
        self.gpu.touch(hit)
        r.blocks = hit + self.gpu.allocate(need)
        gpu_hit = len(hit) * bs
        ext = 0
        c = self._c
        tier = self.tier
        if tier is not None:
            keys = p.chunk_hashes(tier.chunk_size)
            cs = tier.chunk_size
            lm_hit = min(tier.lookup(keys) * cs, n - 1)
            if lm_hit > gpu_hit:
                ext = lm_hit - gpu_hit
                tier.touch(keys[gpu_hit // cs : -(-lm_hit // cs)])
            c.ext_queries += n - gpu_hit  # vLLM: tokens the connector is asked about
            c.ext_hits += ext
        c.queries += n
        c.hits += gpu_hit
        c.prompt_tokens += n
        c.prompt_cached += gpu_hit + ext
        r.computed = gpu_hit + ext
        r.cached_blocks = len(hit)
        rec = r.rec
        rec.scheduled_time = self._now
        rec.gpu_hit_tokens = gpu_hit
        rec.external_hit_tokens = ext
        r.state = _PREFILL
        return True

    def _cache_blocks(self, r: _Req) -> None:
        upto = min(r.computed, r.prompt.num_tokens) // self.block_size
        if upto > r.cached_blocks:
            hashes = r.prompt.block_hashes(self.block_size)
            blocks = r.blocks
            for i in range(r.cached_blocks, upto):
                self.gpu.cache(blocks[i], hashes[i])
            r.cached_blocks = upto

    def _store_chunks(self, r: _Req) -> None:
        tier = self.tier
        if tier is None:
            return
        upto = r.computed // tier.chunk_size
        if upto > r.stored_chunks:
            keys = r.prompt.chunk_hashes(tier.chunk_size)
            tier.store(keys[r.stored_chunks : upto])
            r.stored_chunks = upto

    def _finish(self, r: _Req, t: float, events: list[EngineEvent]) -> None:
        r.state = _DONE
        self._decoding.pop(r.rec.req_id, None)
        self._reqs.pop(r.rec.req_id, None)
        self.gpu.free(r.blocks)
        rec = r.rec
        rec.finish_time = t
        rec.output_tokens = rec.max_tokens
        self._c.finished += 1
        self._head_blocked = False
        events.append(EngineEvent("finished", rec.req_id, t, rec))

    def _pop_finished(self, t: float, events: list[EngineEvent]) -> None:
        heap, g = self._heap, self._g
        while heap and heap[0][0] <= g:
            r = heapq.heappop(heap)[2]
            if r.state == _DECODE:
                self._finish(r, t, events)

    # -- stepping
    def _step(self, collect: bool) -> StepResult | None:
        now = self._now
        budget = self.max_num_batched_tokens
        n_dec = len(self._decoding)
        budget -= n_dec
        chunks: list[tuple[_Req, int]] = []
        for r in self._prefilling:
            if budget <= 0:
                break
            k = min(r.prompt.num_tokens - r.computed, budget)
            chunks.append((r, k))
            budget -= k
        admitted = 0
        loaded = 0
        waiting = self._waiting
        if waiting and not self._head_blocked:
            n_run = self.num_running
            while waiting and budget > 0 and n_run < self.max_num_seqs:
                r = waiting[0]
                if not self._try_admit(r):
                    self._head_blocked = True
                    break
                waiting.popleft()
                self._prefilling.append(r)
                n_run += 1
                admitted += 1
                loaded += r.rec.external_hit_tokens
                k = min(r.prompt.num_tokens - r.computed, budget)
                chunks.append((r, k))
                budget -= k
        if n_dec == 0 and not chunks:
            return None
        prefill_tokens = 0
        for r, k in chunks:
            r.computed += k
            prefill_tokens += k
            self._cache_blocks(r)  # vLLM caches full blocks when it schedules them
        end = now + self._jittered(self.step_duration(n_dec + len(chunks), prefill_tokens, loaded))
        self._now = end
        self._c.steps += 1
        events: list[EngineEvent] = []
        emitted: list[str] = list(self._decoding) if collect else []
        if n_dec:
            self._g += 1
            self._c.gen_tokens += n_dec
            self._pop_finished(end, events)
        any_done = False
        for r, _k in chunks:
            self._store_chunks(r)
            if r.computed < r.prompt.num_tokens:
                continue
            any_done = True
            rec = r.rec
            rec.first_token_time = end
            self._c.gen_tokens += 1
            if collect:
                emitted.append(rec.req_id)
            events.append(EngineEvent("first_token", rec.req_id, end, rec))
            if rec.max_tokens == 1:
                self._finish(r, end, events)
            else:
                r.state = _DECODE
                r.g_fin = self._g + rec.max_tokens - 1
                self._decoding[rec.req_id] = r
                heapq.heappush(self._heap, (r.g_fin, r.seq, r))
        if any_done:
            self._prefilling = [r for r in self._prefilling if r.state == _PREFILL]
        return StepResult(now, end, n_dec, prefill_tokens, loaded, admitted, emitted, events)

    def step(self, *, collect_tokens: bool = True) -> StepResult | None:
        """Run one scheduler step starting now (real-time mode: at ``max(now, clock())``); None when idle."""
        if self._clock is not None:
            self._now = max(self._now, self._clock())
        elif self._future and not (self._prefilling or self._decoding or self._waiting):
            self._now = max(self._now, self._future[0][0])
        self._release_arrivals()
        return self._step(collect_tokens)

    def _can_fast_forward(self) -> bool:
        if self._prefilling or not self._decoding:
            return False
        return not self._waiting or self._head_blocked or len(self._decoding) >= self.max_num_seqs

    def _next_finish_g(self) -> int:
        heap = self._heap
        while heap and heap[0][2].state != _DECODE:
            heapq.heappop(heap)
        return heap[0][0]

    def _fast_forward(self, limit: float, events: list[EngineEvent]) -> None:
        """Run identical decode steps starting before ``limit`` up to the next completion, in O(steps) floats."""
        n_dec = len(self._decoding)
        k_fin = self._next_finish_g() - self._g
        d = self.step_duration(n_dec, 0, 0)
        t = self._now
        k = 0
        if self._jitter:
            while k < k_fin and t < limit:
                t += self._jittered(d)
                k += 1
        else:
            while k < k_fin and t < limit:
                t += d
                k += 1
        self._now = t
        self._g += k
        self._c.steps += k
        self._c.gen_tokens += k * n_dec
        self._pop_finished(t, events)

    def advance(self, until: float, *, fast_forward: bool = True) -> list[EngineEvent]:
        """Run every step that starts before ``until`` (the last one may end after it); idle time jumps to ``until``."""
        events: list[EngineEvent] = []
        while True:
            self._release_arrivals()
            if not (self._prefilling or self._decoding or self._waiting):
                if self._future and self._future[0][0] < until:
                    self._now = max(self._now, self._future[0][0])
                    continue
                if until != math.inf:
                    self._now = max(self._now, until)
                break
            if self._now >= until:
                break
            if fast_forward and self._can_fast_forward():
                limit = min(until, self._future[0][0]) if self._future else until
                self._fast_forward(limit, events)
                continue
            res = self._step(False)
            if res is None:  # blocked with nothing running cannot happen (oversized requests are rejected)
                break
            events.extend(res.events)
        return events

    def run_until_idle(self, *, fast_forward: bool = True) -> list[EngineEvent]:
        return self.advance(math.inf, fast_forward=fast_forward)

    def next_event_time(self) -> float | None:
        """No first_token/finished event happens before this time unless new requests are submitted.

        Exact (the next completion) during uniform decode without jitter; otherwise a lower bound.
        ``advance(next_event_time())`` always makes progress. None when nothing is queued or running.
        """
        base_min = self._base * (1.0 - self._jitter)
        if not (self._prefilling or self._decoding or self._waiting):
            return self._future[0][0] + base_min if self._future else None
        t = self._now + base_min
        if self._can_fast_forward() and not self._jitter:
            d = self.step_duration(len(self._decoding), 0, 0)
            t = self._now
            for _ in range(self._next_finish_g() - self._g):
                t += d
        if self._future:
            t = min(t, max(self._now, self._future[0][0]) + base_min)
        return t

    def reset_prefix_cache(self) -> bool:
        return self.gpu.reset()

    # -- WorkerControl (LMCache worker 0 of this instance)
    def clear(self, location: str) -> int:
        return self.tier.clear(location) if self.tier else 0

    def pin(self, tokens: Sequence[int], location: str) -> int:
        return self.tier.pin(tokens, location) if self.tier else 0

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.tier.compress(tokens, location, method) if self.tier else 0

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.tier.decompress(tokens, location, method) if self.tier else 0

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int:
        return self.tier.evict(tokens, location) if self.tier else 0

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        return self.tier.export_chunks(tokens, location) if self.tier else []

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        return self.tier.import_chunks(tokens, location) if self.tier else 0

    def health(self) -> int:
        return 0
