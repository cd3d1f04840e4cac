"""SIMULATOR: the engine scheduler's bookkeeping: request states, per-request state, counters, step timing.

Pure data and arithmetic used by :mod:`kvgate_sim.engine_scheduler` and :mod:`kvgate_sim.engine_core`:
:class:`SchedRequest` (one request as the scheduler tracks it), :class:`Counters` (what
:meth:`~kvgate_sim.engine_scheduler.EngineScheduler.stats` reports) and :class:`StepTiming` (the modelled
duration of one scheduler step, with optional seeded jitter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvgate_sim.prompts import Prompt
from kvgate_sim.records import RequestRecord

WAITING, PREFILL, DECODE, DONE = 0, 1, 2, 3


class SchedRequest:
    """One request in the scheduler: its record, prompt, state, GPU blocks and prefill progress."""

    __slots__ = ("blocks", "cached_blocks", "computed", "g_fin", "prompt", "rec", "seq", "state", "stored_chunks")

    def __init__(self, rec: RequestRecord, prompt: Prompt, seq: int):
        self.rec = rec
        self.prompt = prompt
        self.seq = seq
        self.state = WAITING
        self.blocks: list[int] = []
        self.computed = 0
        self.cached_blocks = 0
        self.stored_chunks = 0
        self.g_fin = 0


@dataclass
class Counters:
    """Cumulative engine counters (prefix-cache queries/hits, tokens, finished/aborted requests, steps)."""

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


class StepTiming:
    """Step durations in seconds (``time_scale`` applied) from a profile's per-step costs, optionally jittered.

    ``jitter`` j multiplies each jittered duration by a uniform factor in ``[1 - j, 1 + j]`` drawn from a
    ``random.Random(seed)``.
    """

    __slots__ = ("base", "jitter", "load", "per_seq", "prefill", "rng")

    def __init__(
        self,
        *,
        decode_base_ms: float,
        decode_ms_per_seq: float,
        prefill_ms_per_token: float,
        load_ms_per_token: float,
        time_scale: float,
        jitter: float,
        seed: int,
    ):
        if decode_base_ms <= 0 or time_scale <= 0:
            raise ValueError("decode_base_ms and time_scale must be > 0")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        s = 1e-3 * time_scale
        self.base = decode_base_ms * s
        self.per_seq = decode_ms_per_seq * s
        self.prefill = prefill_ms_per_token * s
        self.load = load_ms_per_token * s
        self.jitter = jitter
        self.rng = random.Random(seed)

    def duration(self, num_seqs: int, prefill_tokens: int, loaded_tokens: int) -> float:
        """Un-jittered duration of one step running ``num_seqs`` sequences."""
        return self.base + self.per_seq * (num_seqs - 1) + self.prefill * prefill_tokens + self.load * loaded_tokens

    def jittered(self, d: float) -> float:
        """``d`` with this step's jitter applied (``d`` itself without jitter)."""
        if self.jitter:
            return d * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
        return d
