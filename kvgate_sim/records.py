"""SIMULATOR: what the engine model reports: per-request records, step results, events and statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
