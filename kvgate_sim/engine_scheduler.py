"""SIMULATOR: the engine scheduler: FCFS admission, chunked prefill, caching and one step at a time.

:class:`EngineScheduler` owns the queues, the GPU prefix cache and the LMCache tier of one simulated vLLM
engine and runs single scheduler steps (:meth:`~EngineScheduler.step`) at the current time (in real time
read from an injected clock). :class:`~kvgate_sim.engine_core.EngineCore` adds virtual-time driving and
the LMCache worker commands. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence

from kvgate.kvevents.wire import KVEvent
from kvgate_sim.engine_state import DECODE, DONE, PREFILL, WAITING, Counters, SchedRequest, StepTiming
from kvgate_sim.gpu_cache import GPUPrefixCache
from kvgate_sim.kv_events import KVEventRecorder
from kvgate_sim.lmcache_tier import LMCacheTier
from kvgate_sim.profiles import EngineConfig
from kvgate_sim.prompts import Prompt
from kvgate_sim.protocol import OpSink
from kvgate_sim.records import EngineEvent, EngineStats, RequestRecord, StepResult


class EngineScheduler:
    """SIMULATOR: the scheduler of one vLLM engine (GPU prefix cache + LMCache tier) at an owned or injected time.

    ``step()`` runs one scheduler step starting at ``max(now, clock())`` (real time, ``clock`` given) or at
    ``now`` (virtual time, driven by :class:`~kvgate_sim.engine_core.EngineCore`). With ``config.kv_events``,
    ``kv_event_sink(events)`` receives vLLM's KV-cache events (:mod:`kvgate_sim.kv_events`) once per step
    that changed a cache.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        sink: OpSink | None = None,
        clock: Callable[[], float] | None = None,
        kv_event_sink: Callable[[list[KVEvent]], object] | None = None,
    ):
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
        self.timing = StepTiming(
            decode_base_ms=prof.decode_base_ms,
            decode_ms_per_seq=prof.decode_ms_per_seq,
            prefill_ms_per_token=prof.prefill_ms_per_token,
            load_ms_per_token=prof.lmcache_load_ms_per_token,
            time_scale=cfg.time_scale,
            jitter=cfg.jitter,
            seed=cfg.seed,
        )
        self._jittered = self.timing.jittered
        self._clock = clock
        self._now = clock() if clock is not None else 0.0
        self.gpu = GPUPrefixCache(cfg.resolved_num_gpu_blocks(), cfg.block_size)
        self.tier: LMCacheTier | None = None
        if cfg.lmcache_enabled:
            self.tier = LMCacheTier(
                cfg.instance_id,
                cfg.lmcache_capacity_chunks,
                clock=clock or self._virtual_now,
                sink=sink,
                chunk_size=cfg.lmcache_chunk_size,
                kv_bytes_per_token=prof.kv_bytes_per_token,
                location=cfg.lmcache_location,
                pin_timeout_s=cfg.pin_timeout_s,
                compression_ratio=cfg.compression_ratio,
            )
        self.kv_event_sink = kv_event_sink
        self.kv_events: KVEventRecorder | None = None
        if cfg.kv_events:
            rec = self.kv_events = KVEventRecorder(
                cfg.block_size, cfg.lmcache_chunk_size, cpu_removal_events=cfg.lmcache_removal_events
            )
            self.gpu.evicted_log = rec.gpu_evicted
            if self.tier is not None:
                self.tier.admitted_log = rec.cpu_admitted
                self.tier.removed_log = rec.cpu_removed
        self._future: list[tuple[float, int, SchedRequest]] = []
        self._waiting: deque[SchedRequest] = deque()
        self._prefilling: list[SchedRequest] = []
        self._decoding: dict[str, SchedRequest] = {}
        self._heap: list[tuple[int, int, SchedRequest]] = []
        self._reqs: dict[str, SchedRequest] = {}
        self._head_blocked = False
        self._g = 0  # number of steps that ran decodes so far
        self._seq = 0
        self._c = Counters()

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
            prefix_cache_queries=c.queries,
            prefix_cache_hits=c.hits,
            external_prefix_cache_queries=c.ext_queries,
            external_prefix_cache_hits=c.ext_hits,
            prompt_tokens=c.prompt_tokens,
            prompt_tokens_cached=c.prompt_cached,
            generation_tokens=c.gen_tokens,
            num_preemptions=0,
            num_requests_finished=c.finished,
            num_requests_aborted=c.aborted,
            num_steps=c.steps,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage_perc=self.gpu.usage(),
            gpu_cached_blocks=self.gpu.num_cached,
            gpu_evictions=self.gpu.evictions,
            lmcache_chunks=len(tier) if tier else 0,
            lmcache_used_bytes=tier.used_bytes if tier else 0,
            lmcache_capacity_bytes=tier.capacity_bytes if tier else 0,
            lmcache_evictions=tier.evictions if tier else 0,
        )

    def request(self, req_id: str) -> RequestRecord | None:
        r = self._reqs.get(req_id)
        return r.rec if r is not None else None

    # -- durations
    def step_duration(self, num_seqs: int, prefill_tokens: int, loaded_tokens: int) -> float:
        """Un-jittered modelled duration (seconds, time_scale applied) of one step."""
        return self.timing.duration(num_seqs, prefill_tokens, loaded_tokens)

    # -- submission
    def submit(
        self, req_id: str, prompt: Prompt | Sequence[int], max_tokens: int, *, arrival_time: float | None = None
    ) -> RequestRecord:
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
            raise ValueError(
                f"prompt ({n}) + max_tokens ({max_tokens}) exceeds max_model_len {self.config.max_model_len}"
            )
        if -(-(n + max_tokens) // self.block_size) > self.gpu.num_blocks - 1:
            raise ValueError("request does not fit in the simulated GPU KV cache")
        p.block_hashes(self.block_size)  # hash now (once), so admission never fails half-way
        if self.tier is not None:
            p.chunk_hashes(self.tier.chunk_size)
        if arrival_time is None:
            arrival_time = self._clock() if self._clock is not None else self._now
        rec = RequestRecord(req_id, n, max_tokens, arrival_time)
        self._seq += 1
        r = SchedRequest(rec, p, self._seq)
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
        if r.state == WAITING:
            if r in self._waiting:
                self._waiting.remove(r)
            else:
                self._future = [e for e in self._future if e[2] is not r]
                heapq.heapify(self._future)
        elif r.state == PREFILL:
            self._prefilling.remove(r)
            self.gpu.free(r.blocks)
        elif r.state == DECODE:
            del self._decoding[req_id]
            self.gpu.free(r.blocks)
        r.state = DONE
        r.rec.aborted = True
        self._c.aborted += 1
        self._head_blocked = False
        return True

    def _release_arrivals(self) -> None:
        fut = self._future
        while fut and fut[0][0] <= self._now:
            self._waiting.append(heapq.heappop(fut)[2])

    # -- admission
    def _try_admit(self, r: SchedRequest) -> bool:
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
        r.state = PREFILL
        return True

    def _cache_blocks(self, r: SchedRequest) -> None:
        upto = min(r.computed, r.prompt.num_tokens) // self.block_size
        if upto > r.cached_blocks:
            hashes = r.prompt.block_hashes(self.block_size)
            blocks = r.blocks
            rec = self.kv_events
            if rec is None:
                for i in range(r.cached_blocks, upto):
                    self.gpu.cache(blocks[i], hashes[i])
            else:
                new = [i for i in range(r.cached_blocks, upto) if self.gpu.cache(blocks[i], hashes[i])]
                if new:
                    rec.gpu_stored(hashes, r.prompt.tokens, new)
            r.cached_blocks = upto

    def _store_chunks(self, r: SchedRequest) -> None:
        tier = self.tier
        if tier is None:
            return
        upto = r.computed // tier.chunk_size
        if upto > r.stored_chunks:
            keys = r.prompt.chunk_hashes(tier.chunk_size)
            tier.store(keys[r.stored_chunks : upto])
            if self.kv_events is not None:
                self.kv_events.cpu_stored(keys, r.prompt.tokens, r.stored_chunks)
            r.stored_chunks = upto

    def _finish(self, r: SchedRequest, t: float, events: list[EngineEvent]) -> None:
        r.state = DONE
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
            if r.state == DECODE:
                self._finish(r, t, events)

    # -- stepping
    def _step(self, collect: bool) -> StepResult | None:
        now = self._now
        budget = self.max_num_batched_tokens
        n_dec = len(self._decoding)
        budget -= n_dec
        chunks: list[tuple[SchedRequest, int]] = []
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
            self._flush_kv_events()  # admission attempts may have evicted blocks
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
                r.state = DECODE
                r.g_fin = self._g + rec.max_tokens - 1
                self._decoding[rec.req_id] = r
                heapq.heappush(self._heap, (r.g_fin, r.seq, r))
        if any_done:
            self._prefilling = [r for r in self._prefilling if r.state == PREFILL]
        self._flush_kv_events()
        return StepResult(now, end, n_dec, prefill_tokens, loaded, admitted, emitted, events)

    def step(self, *, collect_tokens: bool = True) -> StepResult | None:
        """Run one scheduler step starting now (real-time mode: at ``max(now, clock())``); None when idle."""
        if self._clock is not None:
            self._now = max(self._now, self._clock())
        elif self._future and not (self._prefilling or self._decoding or self._waiting):
            self._now = max(self._now, self._future[0][0])
        self._release_arrivals()
        return self._step(collect_tokens)

    def _flush_kv_events(self) -> None:
        rec = self.kv_events
        if rec is None:
            return
        events = rec.flush()
        if events and self.kv_event_sink is not None:
            self.kv_event_sink(events)
