"""Virtual-time benchmark runner: the engine model without HTTP (TEST AND BENCHMARK TOOL).

N :class:`~kvgate_sim.engine_model.EngineCore` instances share one virtual clock; a
:class:`~kvgate_sim.controller_index.ControllerIndex` is fed directly by their LMCache op sinks; a
discrete-event loop interleaves arrivals (open loop, or the closed-loop rules of
:class:`~kvgate_bench.workloads.ClosedLoop`), engine steps (driven by ``next_event_time()``) and completions.
Routing uses the SAME code as the gateway: the mode's balancer from :func:`make_balancer` over per-engine
in-flight counts (the load balancer picks first and its cursor always advances, as in the proxy), and for
kvcache modes the controller lookup + :func:`choose_prefix_endpoint`, whose choice replaces the pick.
``kvcache-seed`` only looks up a prompt identical to one submitted before (its token cache; the background
tokenize is modelled as complete at that earlier submission); ``kvcache-lookup`` looks up every prompt in the
controller index; ``kvcache`` (local routing) matches every prompt in a model of the gateway's KV-event index
fed by the engines' own events (:mod:`kvgate_bench.virtual_events`). Lookups cost nothing in virtual time.

Chunk and block hashes are computed once per request into a hash-only
:class:`~kvgate_sim.engine_model.Prompt` (:mod:`kvgate_bench.virtual_requests`), which the engines and the
lookup share; the routing replay is :mod:`kvgate_bench.virtual_router`.
Engine ops become visible to the index when the engine computes the step that stores them (the
real-time simulator does the same). Peer modes (external routers) have no virtual-time equivalent.

A mode whose kvcache config turns on cache management (``cache_strategy.signals: engine`` and/or
``replication.enabled``, e.g. ``kvcache-managed``) is replayed with the filter's own pure blocks
(:mod:`kvgate_bench.virtual_manage`): a management round every ``cache_strategy.interval`` of virtual time
pins hot prefixes on their holders' LMCache tiers, and routing may plan a replica warm-up, submitted as a
1-token request (kept out of the results and the hit rate, counted in ``info["replications"]``).
"""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kvgate_bench.modes import FleetSpec, Mode
from kvgate_bench.results import STATUS_OK, ModeRun, RequestResult
from kvgate_bench.virtual_events import HashEventIndex
from kvgate_bench.virtual_manage import PlannedWarm, VirtualManagement, management_enabled
from kvgate_bench.virtual_requests import GPU_BLOCK_SIZE, VRequest
from kvgate_bench.virtual_router import VEndpoint, VirtualRouter
from kvgate_bench.workloads import ClosedLoop
from kvgate_sim.controller_index import ControllerIndex
from kvgate_sim.engine_model import EngineCore
from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE


@dataclass(slots=True)
class _Pacer:
    """Closed-loop bookkeeping: what becomes sendable when a request finishes."""

    closed: ClosedLoop | None
    vreqs: list[VRequest]
    next_of: dict[str, VRequest] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    phase_lists: list[list[VRequest]] = field(default_factory=list)
    phase_pos: int = 0
    phase_next: int = 0
    phase_outstanding: int = 0

    def initial(self) -> list[tuple[float, VRequest]]:
        cl = self.closed
        if cl is None:
            return [(v.arrival_s, v) for v in self.vreqs]
        if cl.kind == "sessions":
            sessions: dict[str, list[VRequest]] = {}
            for v in self.vreqs:
                sessions.setdefault(v.session or v.req_id, []).append(v)
            for lst in sessions.values():
                lst.sort(key=lambda q: q.round_idx)
                for a, b in itertools.pairwise(lst):
                    self.next_of[a.req_id] = b
            return [(lst[0].arrival_s, lst[0]) for lst in sessions.values()]
        phases = list(cl.phases) or sorted({v.phase for v in self.vreqs})
        self.phase_lists = [[v for v in self.vreqs if v.phase == p] for p in phases]
        self.phase_lists = [p for p in self.phase_lists if p]
        return self._start_phase(0.0)

    def _start_phase(self, t: float) -> list[tuple[float, VRequest]]:
        if self.phase_pos >= len(self.phase_lists):
            return []
        lst = self.phase_lists[self.phase_pos]
        k = min(len(lst), max(1, (self.closed.max_inflight if self.closed else 1) or 1))
        self.phase_next = k
        self.phase_outstanding = len(lst)
        return [(t, v) for v in lst[:k]]

    def on_send(self, v: VRequest, t: float) -> None:
        self.sent_at[v.req_id] = t

    def on_finish(self, v: VRequest, t: float) -> list[tuple[float, VRequest]]:
        cl = self.closed
        if cl is None:
            return []
        if cl.kind == "sessions":
            nxt = self.next_of.get(v.req_id)
            if nxt is None:
                return []
            return [(max(self.sent_at[v.req_id] + (cl.per_user_gap_s or 0.0), t), nxt)]
        lst = self.phase_lists[self.phase_pos]
        self.phase_outstanding -= 1
        out: list[tuple[float, VRequest]] = []
        if self.phase_next < len(lst):
            out.append((t, lst[self.phase_next]))
            self.phase_next += 1
        if self.phase_outstanding == 0:
            name = lst[0].phase
            self.phase_pos += 1
            out += self._start_phase(t + (cl.sleep_after_warmup_s if name == "warmup" else 0.0))
        return out


def run_virtual(
    mode: Mode,
    vreqs: list[VRequest],
    spec: FleetSpec,
    closed_loop: ClosedLoop | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
) -> ModeRun:
    """Replay ``vreqs`` through ``mode`` on ``spec.engines`` virtual engines; results in virtual seconds."""
    wall0 = time.perf_counter()
    index = ControllerIndex(LMCACHE_CHUNK_SIZE)
    events = HashEventIndex(GPU_BLOCK_SIZE, LMCACHE_CHUNK_SIZE) if mode.prefix == "events" else None
    cores: list[EngineCore] = []
    for i in range(spec.engines):
        cfg = spec.engine_config(f"sim-{i}", i)
        index.register(cfg.instance_id, 0, now=0.0)
        if events is None:
            cores.append(EngineCore(cfg, sink=index.apply_ops))
        else:
            cfg = replace(cfg, kv_events=True)
            sink = functools.partial(events.apply, cfg.instance_id)
            cores.append(EngineCore(cfg, sink=index.apply_ops, kv_event_sink=sink))
    endpoints = [VEndpoint(i, c) for i, c in enumerate(cores)]
    router = VirtualRouter(mode, endpoints, index, events=events)
    manage = None
    if mode.prefix != "none" and management_enabled(mode.kvcache):
        assert mode.kvcache is not None
        manage = router.manage = VirtualManagement(
            mode.kvcache, endpoints, router.matches, events=mode.prefix == "events"
        )
    next_tick = manage.interval if manage is not None and manage.managed else math.inf
    warm_owner: dict[str, tuple[PlannedWarm, VEndpoint]] = {}
    warm_hits = warm_queries = 0
    pacer = _Pacer(closed_loop, vreqs)

    seq = 0
    arrivals: list[tuple[float, int, VRequest]] = []
    for t, v in pacer.initial():
        seq += 1
        arrivals.append((t, seq, v))
    heapq.heapify(arrivals)
    version = [0] * len(cores)
    eheap: list[tuple[float, int, int]] = []  # (next_event_time, version, engine index)
    finished: list[tuple[float, int, int, Any]] = []  # (time, seq, engine index, record) not yet applied
    owner: dict[str, tuple[VRequest, VEndpoint]] = {}
    results: list[RequestResult] = []
    inf = math.inf
    done = 0
    n_total = len(vreqs)

    def reschedule(i: int) -> None:
        version[i] += 1
        nt = cores[i].next_event_time()
        if nt is not None:
            heapq.heappush(eheap, (nt, version[i], i))

    gc_on = gc.isenabled()
    gc.disable()
    try:
        while True:
            ta = arrivals[0][0] if arrivals else inf
            te = finished[0][0] if finished else inf
            while eheap and eheap[0][1] != version[eheap[0][2]]:
                heapq.heappop(eheap)
            tn = eheap[0][0] if eheap else inf
            tm = next_tick if min(ta, te, tn) < inf else inf  # management rounds while work remains
            if te <= ta and te <= tn and te <= tm:
                if te == inf:
                    break
                t, _s, i, rec = heapq.heappop(finished)
                warm = warm_owner.pop(rec.req_id, None)
                if warm is not None:  # a replication warm-up: not a workload result
                    assert manage is not None
                    warm[1].in_flight -= 1
                    warm_queries += rec.prompt_tokens
                    warm_hits += rec.cached_tokens
                    manage.now = t
                    manage.warm_done(warm[0])
                    continue
                v, ep = owner.pop(rec.req_id)
                ep.in_flight -= 1
                results.append(
                    RequestResult(
                        v.req_id, mode.name, ep.id, STATUS_OK, rec.ttft, rec.e2e, rec.prompt_tokens,
                        rec.cached_tokens, output_tokens=rec.output_tokens, start_s=rec.arrival_time,
                    )
                )  # fmt: skip
                done += 1
                if progress is not None and done % progress_every == 0:
                    progress(progress_every)
                for tt, nv in pacer.on_finish(v, t):
                    seq += 1
                    heapq.heappush(arrivals, (tt, seq, nv))
            elif tn <= ta and tn <= tm:
                _nt, _ver, i = heapq.heappop(eheap)
                for ev in cores[i].advance(tn):
                    if ev.kind == "finished":
                        seq += 1
                        heapq.heappush(finished, (ev.time, seq, i, ev.record))
                reschedule(i)
            elif tm <= ta:
                assert manage is not None
                manage.now = tm
                manage.run_round()
                next_tick += manage.interval
            else:
                t, _s, v = heapq.heappop(arrivals)
                if manage is not None:
                    manage.now = t
                ep = router.route(v)
                ep.in_flight += 1
                owner[v.req_id] = (v, ep)
                pacer.on_send(v, t)
                ep.core.submit(v.req_id, v.prompt, v.max_tokens, arrival_time=t)
                reschedule(ep.index)
                if manage is not None:
                    manage.observe(v.prompt)
                    for k, pw in enumerate(router.warms):  # the filter's background warm-up: same prompt, 1 token
                        wep = router.by_id[pw.warm.instance]
                        wid = f"{v.req_id}~warm{k}"
                        wep.in_flight += 1
                        warm_owner[wid] = (pw, wep)
                        wep.core.submit(wid, pw.prompt, 1, arrival_time=t)
                        reschedule(wep.index)
                    router.warms.clear()
    finally:
        if gc_on:
            gc.enable()
    if progress is not None and done % progress_every:
        progress(done % progress_every)
    stats = [c.stats() for c in cores]
    queries = sum(s.prefix_cache_queries for s in stats) - warm_queries  # warm-ups are not workload requests
    hits = sum(s.prefix_cache_hits + s.external_prefix_cache_hits for s in stats) - warm_hits
    end = max((r.start_s + r.e2e_s for r in results if r.e2e_s is not None and r.start_s is not None), default=0.0)
    start = min((r.start_s for r in results if r.start_s is not None), default=0.0)
    info: dict[str, Any] = {
        "runner": "virtual",
        "wall_clock_s": time.perf_counter() - wall0,
        "unfinished": n_total - len(results),
        "gpu_evictions": sum(s.gpu_evictions for s in stats),
        "lmcache_evictions": sum(s.lmcache_evictions for s in stats),
    }
    if router.outcomes:
        info["routing_lookups"] = dict(sorted(router.outcomes.items()))
    if manage is not None:
        info.update(manage.info())
    order = {v.req_id: i for i, v in enumerate(vreqs)}
    results.sort(key=lambda r: order[r.req_id])
    return ModeRun(mode.name, results, hits / queries if queries else 0.0, end - start, [c.instance_id for c in cores],
                   info)  # fmt: skip
