"""SIMULATOR: the engine core: the scheduler driven in virtual time, plus the LMCache worker commands.

:class:`EngineCore` is :class:`~kvgate_sim.engine_scheduler.EngineScheduler` (FCFS scheduler with chunked
prefill and step timing) plus ``advance`` / ``run_until_idle`` / ``next_event_time``, which fast-forward
over runs of identical decode steps, and the :class:`~kvgate_sim.protocol.WorkerControl` face of its
LMCache tier.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from kvgate_sim.engine_scheduler import EngineScheduler
from kvgate_sim.engine_state import DECODE
from kvgate_sim.protocol import lmcache_chunk_hashes
from kvgate_sim.records import EngineEvent


class EngineCore(EngineScheduler):
    """SIMULATOR: one vLLM engine (scheduler + GPU prefix cache + LMCache tier) in virtual or injected time.

    Virtual time (``clock=None``): ``submit`` (optionally with a future ``arrival_time``), then ``advance(until)``
    / ``run_until_idle()``; events are ``first_token`` and ``finished``. Real time (``clock`` given): call
    ``step()`` repeatedly; each step starts at ``max(now, clock())``. Also a :class:`WorkerControl`.

    With ``config.kv_events``, ``kv_event_sink(events)`` receives vLLM's KV-cache events (:mod:`kvgate_sim.kv_events`):
    once per scheduler step that changed a cache, and once per out-of-step change (``reset_prefix_cache``, a
    controller command that stored or evicted chunks).
    """

    def _can_fast_forward(self) -> bool:
        if self._prefilling or not self._decoding:
            return False
        return not self._waiting or self._head_blocked or len(self._decoding) >= self.max_num_seqs

    def _next_finish_g(self) -> int:
        heap = self._heap
        while heap and heap[0][2].state != DECODE:
            heapq.heappop(heap)
        return heap[0][0]

    def _fast_forward(self, limit: float, events: list[EngineEvent]) -> None:
        """Run identical decode steps starting before ``limit`` up to the next completion, in O(steps) floats."""
        n_dec = len(self._decoding)
        k_fin = self._next_finish_g() - self._g
        d = self.step_duration(n_dec, 0, 0)
        t = self._now
        k = 0
        if self.timing.jitter:
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
        base_min = self.timing.base * (1.0 - self.timing.jitter)
        if not (self._prefilling or self._decoding or self._waiting):
            return self._future[0][0] + base_min if self._future else None
        t = self._now + base_min
        if self._can_fast_forward() and not self.timing.jitter:
            d = self.step_duration(len(self._decoding), 0, 0)
            t = self._now
            for _ in range(self._next_finish_g() - self._g):
                t += d
        if self._future:
            t = min(t, max(self._now, self._future[0][0]) + base_min)
        return t

    def reset_prefix_cache(self) -> bool:
        ok = self.gpu.reset()
        if ok and self.kv_events is not None:
            self.kv_events.cleared()
            self._flush_kv_events()
        return ok

    # -- WorkerControl (LMCache worker 0 of this instance); commands that change the tier flush their events
    def clear(self, location: str) -> int:
        n = self.tier.clear(location) if self.tier else 0
        self._flush_kv_events()
        return n

    def pin(self, tokens: Sequence[int], location: str) -> int:
        return self.tier.pin(tokens, location) if self.tier else 0

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.tier.compress(tokens, location, method) if self.tier else 0

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int:
        n = self.tier.decompress(tokens, location, method) if self.tier else 0
        self._flush_kv_events()
        return n

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int:
        n = self.tier.evict(tokens, location) if self.tier else 0
        self._flush_kv_events()
        return n

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        return self.tier.export_chunks(tokens, location) if self.tier else []

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        if self.tier is None:
            return 0
        n = self.tier.import_chunks(tokens, location)
        if self.kv_events is not None:
            self.kv_events.cpu_stored(lmcache_chunk_hashes(tokens, self.tier.chunk_size), tokens)
            self._flush_kv_events()
        return n

    def health(self) -> int:
        return 0
