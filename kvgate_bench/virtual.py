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
:class:`~kvgate_sim.engine_model.Prompt` (:func:`prepare`), which the engines and the lookup share.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvgate.routing.balancers import make_balancer
from kvgate.routing.prefix import ColdPlacement, choose_prefix_endpoint
from kvgate_bench.modes import FleetSpec, Mode
from kvgate_bench.results import STATUS_OK, ModeRun, RequestResult
from kvgate_bench.virtual_events import HashEventIndex
from kvgate_bench.virtual_manage import PlannedWarm, VirtualManagement, management_enabled
from kvgate_bench.workloads import ClosedLoop, Workload
from kvgate_sim.controller_index import ControllerIndex
from kvgate_sim.engine_model import EngineCore, Prompt
from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE

GPU_BLOCK_SIZE = 16


# --------------------------------------------------------------------------------------------------
# request preparation (hashes once per request)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# routing (same code as the gateway)
# --------------------------------------------------------------------------------------------------


class VEndpoint:
    """Endpoint view for the balancers and the prefix chooser: id, in-flight, weight, health."""

    __slots__ = ("core", "id", "in_flight", "index", "weight")

    def __init__(self, index: int, core: EngineCore) -> None:
        self.index = index
        self.id = core.instance_id
        self.core = core
        self.in_flight = 0
        self.weight = 1

    def healthy(self) -> bool:
        """Simulated engines never fail."""
        return True


class VirtualRouter:
    """The routing decision of one gateway mode, replayed without HTTP."""

    def __init__(
        self,
        mode: Mode,
        endpoints: list[VEndpoint],
        index: ControllerIndex,
        min_match_tokens: int = 0,
        events: HashEventIndex | None = None,
    ):
        if not mode.virtual_supported:
            raise ValueError(f"{mode.name} has no virtual-time equivalent")
        self.mode = mode
        self.endpoints = endpoints
        self.by_id = {e.id: e for e in endpoints}
        self.index = index
        self.events = events
        if mode.prefix == "events" and events is None:
            raise ValueError(f"{mode.name} needs the KV-event index")
        self.balancer = make_balancer(mode.balancer)
        kv = dict(mode.kvcache or {})
        self.min_match_tokens = int(kv.get("min_match_tokens", min_match_tokens))
        self.max_imbalance_abs = int(kv.get("max_imbalance_abs", 0))
        self.max_imbalance_rel = float(kv.get("max_imbalance_rel", 1.5))
        self.min_match_ratio = float(kv.get("min_match_ratio", 0.0))
        self.cold = ColdPlacement() if kv.get("cold_placement") == "lru" else None
        # the filter's holder spread: the event index's smallest block size unless kv_events.spread_tokens
        # is set; none with /lookup
        spread = int((kv.get("kv_events") or {}).get("spread_tokens", 0) or 0)
        self.spread_tokens = (spread or GPU_BLOCK_SIZE) if mode.prefix == "events" else 0
        self.seen: set[int] = set()
        self.outcomes: dict[str, int] = {}
        self.manage: VirtualManagement | None = None
        self.warms: list[PlannedWarm] = []  # planned by the last route(), for the runner to submit

    def matches(self, prompt: Prompt) -> dict[str, int]:
        """Each instance's held prefix of ``prompt`` in the mode's routing index (events model or controller)."""
        if self.mode.prefix == "events":
            assert self.events is not None
            return self.events.match(prompt)
        layout = self.index.lookup_hashes(prompt.chunk_hashes(self.index.chunk_size), prompt.num_tokens)
        return {iid: end for iid, (_loc, end) in layout.items()}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def route(self, v: VRequest) -> VEndpoint:
        """Balancer pick, replaced by the longest-prefix holder when the mode looks the prompt up."""
        picked = self.balancer.pick(self.endpoints)
        assert isinstance(picked, VEndpoint)
        prefix = self.mode.prefix
        if prefix == "none":
            return picked
        if prefix == "seed" and v.key not in self.seen:
            self.seen.add(v.key)
            self._count("no_tokens")
            return self._cold(picked)
        matches: Mapping[str, int] = self.matches(v.prompt)
        if not matches:
            self._count("empty")
            return self._cold(picked)
        mgmt = self.manage
        if mgmt is not None and mgmt.planner is not None:  # the filter's RouteChoice.apply
            matches = mgmt.add_replicas(v.prompt, matches)
            warm = mgmt.consider_replica(v.prompt, matches, self.spread_tokens)
            if warm is not None:
                self.warms.append(warm)
        choice = choose_prefix_endpoint(
            matches,
            self.endpoints,
            min_match_tokens=self.min_match_tokens,
            max_imbalance_abs=self.max_imbalance_abs,
            max_imbalance_rel=self.max_imbalance_rel,
            min_match_ratio=self.min_match_ratio,
            num_tokens=v.num_tokens,
            spread_tokens=self.spread_tokens,
        )
        if choice.endpoint_id is None:
            self._count("no_match")
            return self._cold(picked)
        self._count("routed")
        if mgmt is not None and choice.endpoint_id in mgmt.replicas_of(v.prompt):
            self._count("routed_replica")
        return self.by_id[choice.endpoint_id]

    def _cold(self, picked: VEndpoint) -> VEndpoint:
        """The kvcache filter's ``cold_placement: lru`` (same :class:`ColdPlacement` code), else the LB pick."""
        if self.cold is None:
            return picked
        target = self.cold.pick(self.endpoints)
        return self.by_id[target] if target is not None else picked


# --------------------------------------------------------------------------------------------------
# the discrete-event loop
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# scaled Mooncake replay (for the 10^5-request scale run)
# --------------------------------------------------------------------------------------------------


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
