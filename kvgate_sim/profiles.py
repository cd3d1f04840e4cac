"""SIMULATOR: engine hardware profiles (step-time model) and the per-engine configuration."""

from __future__ import annotations

from dataclasses import dataclass

from kvgate_sim.protocol import DEFAULT_LOCATION, LMCACHE_CHUNK_SIZE

KV_BYTES_PER_TOKEN_LLAMA3_8B = 2 * 32 * 8 * 128 * 2  # K+V × layers × KV heads × head dim × bf16 = 128 KiB


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
    kv_events: bool = False  # record vLLM KV-cache events for the core's kv_event_sink (kvgate_sim.kv_events)
    lmcache_removal_events: bool = False  # also announce CPU-tier evictions (real LMCache 0.5.6 in-process: no)

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
