"""Cache management (issue 13) replayed in virtual time (TEST AND BENCHMARK TOOL).

The virtual runner (:mod:`kvgate_bench.virtual`) replays a mode whose kvcache config carries
``cache_strategy.signals: engine`` (pins) and/or ``replication.enabled`` with the SAME pure blocks the
filter's I/O glue (:mod:`kvgate.filters.kvcache.managed`) drives:

* :class:`~kvgate.filters.kvcache.hot_prefixes.HotPrefixes` counts every routed request by prefix. The
  runner keeps hashes, not token ids, so the counted sequence is the prompt's LMCache chunk-hash chain
  (one element per 256-token chunk, ``chunk_tokens=1``, key = the first ``ceil(hot_prefix_tokens / 256)``
  chunks): chained hashes make an equal chunk prefix an equal token prefix, so keys, counts and the
  shared (chunk-aligned) prefix are those of the filter (exact when ``hot_prefix_tokens`` is a multiple of
  256, the default);
* every ``cache_strategy.interval`` of virtual time, a round as ``CacheManagement.run_round``: lapse the
  expired pins, and for each hot prefix find its holders (the runner's own routing index: the KV-event
  model or the controller index, as the filter uses its event index or ``/lookup``), build one
  :class:`~kvgate.filters.kvcache.engine_signals.EngineSnapshot` per holder from the simulated engine's
  state (a fresh scrape: kv usage, running / waiting, LMCache CPU bytes), ask
  :class:`~kvgate.filters.kvcache.management.CacheManager` and run ``pin`` / ``compress`` / ``evict`` on the
  simulated LMCache tier (its key-level API: what ``EngineCore.pin(tokens, location)`` does with the
  tokens' chunk keys; a pin holds for the tier's ``pin_timeout_s``). ``unpin`` / ``lapse`` only drop the
  record (LMCache 0.5.6 has no unpin route);
* on the routing path, as ``CacheManagement.on_route``: the planner's replicas
  join the matches, and :class:`~kvgate.filters.kvcache.replication.ReplicaPlanner` may plan a warm-up,
  which the runner submits to the target engine as the same prompt with ``max_tokens`` 1 (counted in the
  run's ``replications`` metadata, never in its results); its completion confirms the replica.

Capacities the filter reads from ``engine_metrics`` (``lmcache_capacity_chunks`` / ``_bytes``,
``max_num_seqs``): the mode's value, or when it is 0 the simulated engine's own (what a fleet config
would write).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.engine_signals import EngineSnapshot
from kvgate.filters.kvcache.hot_prefixes import HotPrefix, HotPrefixes
from kvgate.filters.kvcache.managed import (
    DEFAULT_LOCATION,
    DEFAULT_REPLICATION_HOT,
    EVENTS_REPLICA_GRACE,
    MAX_HOT_PER_ROUND,
    management_policy,
    replica_planner,
)
from kvgate.filters.kvcache.management import Action, CacheManager
from kvgate.filters.kvcache.replication import Warm, credit_replicas, plan_for_matches
from kvgate_sim.engine_model import EngineCore, Prompt

#: 65,536 tokens, the filter's longest shared prefix (HotPrefixes' default), in 256-token chunks
MAX_PREFIX_TOKENS = 65536


class ManagedEndpoint(Protocol):
    """What management needs of a virtual endpoint (:class:`kvgate_bench.virtual_router.VEndpoint`)."""

    id: str
    core: EngineCore
    in_flight: int

    def healthy(self) -> bool: ...


#: holders of a prompt: instance -> matched tokens (the runner's routing index)
Matcher = Callable[[Prompt], Mapping[str, int]]


def management_enabled(kvcache: Mapping[str, Any] | None) -> bool:
    """Whether a mode's kvcache overrides turn on engine-signal management or replication."""
    if not kvcache:
        return False
    cs = kvcache.get("cache_strategy") or {}
    rep = kvcache.get("replication") or {}
    return cs.get("signals") == "engine" or bool(rep.get("enabled"))


@dataclass(slots=True)
class PlannedWarm:
    """A warm-up the runner must submit: ``prompt`` with ``max_tokens`` 1 to ``warm.instance``."""

    warm: Warm
    prompt: Prompt
    planned_at: float
    deadline: float  # virtual time after which the warm-up counts as failed (``replication.timeout``)


class VirtualManagement:
    """The filter's management state for one virtual run (clock = the runner's virtual time, ``now``)."""

    def __init__(
        self,
        kvcache: Mapping[str, Any],
        endpoints: Sequence[ManagedEndpoint],
        matcher: Matcher,
        *,
        chunk_size: int = 256,
        block_size: int = 16,
        events: bool = False,
    ):
        cfg = KVCacheConfig.model_validate(dict(kvcache))  # not enabled: defaults applied, no endpoints needed
        self.cfg = cfg
        self.now = 0.0
        self.endpoints = list(endpoints)
        self.by_id = {e.id: e for e in self.endpoints}
        self.matcher = matcher
        self.chunk_size = chunk_size
        self.block_size = block_size
        # with an event index the filter credits only recently confirmed replicas (EVENTS_REPLICA_GRACE)
        self.replica_grace = EVENTS_REPLICA_GRACE if events else None
        cs, em = cfg.cache_strategy, cfg.engine_metrics
        self.managed = cfg.engine_managed
        self.interval = cs.interval
        self.threshold = cs.hot_content_threshold
        self.hot = HotPrefixes(
            cfg.hot_window,
            key_tokens=max(1, math.ceil(cs.hot_prefix_tokens / chunk_size)),
            chunk_tokens=1,
            max_keys=min(cfg.hot_key_cap(), 4096),
            max_records=cfg.hot_max_records,
            max_prefix_tokens=MAX_PREFIX_TOKENS // chunk_size,
            clock=self._clock,
        )
        self._prompts: dict[int, Prompt] = {}  # prefix key -> a prompt carrying it (its block hashes)
        overrides = {t.instance: t for t in em.endpoints}

        def pick(inst: str, key: str, sim: int) -> int:
            o = overrides.get(inst)
            return (getattr(o, key) if o is not None else 0) or getattr(em, key) or sim

        self.capacity_bytes: dict[str, int] = {}
        capacity: dict[str, int] = {}
        seqs: dict[str, int] = {}
        for e in self.endpoints:
            tier = e.core.tier
            capacity[e.id] = pick(
                e.id, "lmcache_capacity_chunks", tier.capacity_bytes // tier.chunk_bytes if tier is not None else 0
            )
            self.capacity_bytes[e.id] = pick(
                e.id, "lmcache_capacity_bytes", tier.capacity_bytes if tier is not None else 0
            )
            seqs[e.id] = pick(e.id, "max_num_seqs", e.core.max_num_seqs)
        self.manager = CacheManager(
            management_policy(cfg),
            capacity_chunks=capacity,
            max_num_seqs=seqs,
            clock=self._clock,
        )
        self.planner = replica_planner(cfg, self._clock)
        self.replication_threshold = self.threshold if self.threshold > 0 else DEFAULT_REPLICATION_HOT
        self.rounds = 0
        self.decisions: Counter[str] = Counter()  # "kind:reason" (skips as "skip_<action>:reason")
        self.tier_chunks: Counter[str] = Counter()  # "kind:instance" -> chunks the tier actually changed
        self.replications: Counter[str] = Counter()  # planned, ok, error, rate_limited, ... , routed
        self.pins_log: list[tuple[float, str, int, str]] = []  # (time, instance, prefix key, reason)
        self.warm_log: list[dict[str, Any]] = []  # one per finished warm-up (bounded by the planner's rate)

    def _clock(self) -> float:
        return self.now

    # ------------------------------------------------------------------ hotness

    def observe(self, prompt: Prompt) -> None:
        """Count one routed request by its prefix (the filter's background job does this after routing)."""
        key = self.hot.record(prompt.chunk_hashes(self.chunk_size))
        if key is not None:
            self._prompts[key] = prompt

    # ------------------------------------------------------------------ management rounds

    def run_round(self) -> int:
        """One round at ``now`` (``CacheManagement.run_round``); returns the actions run on the tiers."""
        self.rounds += 1
        sent = 0
        for lapse in self.manager.expire():
            self._count(lapse)
        for h in self.hot.hot(self.threshold, MAX_HOT_PER_ROUND):
            sent += self._manage_prefix(h)
        for key in [k for k in self._prompts if self.hot.tokens(k) is None]:
            del self._prompts[key]
        return sent

    def _prefix_prompt(self, key: int, chunks: Sequence[int]) -> Prompt | None:
        rep = self._prompts.get(key)
        if rep is None:
            return None
        n = len(chunks) * self.chunk_size
        blocks = rep.block_hashes(self.block_size)[: n // self.block_size]
        return Prompt.from_hashes(n, blocks, list(chunks), block_size=self.block_size, chunk_size=self.chunk_size)

    def snapshot(self, inst: str) -> EngineSnapshot | None:
        """The simulated engine's gauges now, as the scraper would read them from its ``/metrics``."""
        e = self.by_id.get(inst)
        if e is None:
            return None
        core, tier = e.core, e.core.tier
        used = float(tier.used_bytes) if tier is not None else None
        cap = self.capacity_bytes.get(inst, 0)
        usage = min(1.0, max(0.0, used / cap)) if used is not None and cap > 0 else None
        return EngineSnapshot(
            inst,
            kv_usage=core.kv_cache_usage_perc,
            running=float(core.num_running),
            waiting=float(core.num_waiting),
            lmcache_cpu_bytes=used,
            lmcache_cpu_usage=usage,
            at=self.now,
        )

    def _manage_prefix(self, h: HotPrefix) -> int:
        chunks = h.tokens  # chunk hashes of the shared prefix
        if not chunks:
            return 0
        prompt = self._prefix_prompt(h.key, chunks)
        if prompt is None:
            return 0
        matches = self.matcher(prompt)
        holders = [inst for inst, n in matches.items() if n >= self.chunk_size]
        if self.planner is not None:
            holders += [r for r in self.planner.holders(str(h.key), self.replica_grace) if r not in holders]
        signals = {inst: self.snapshot(inst) for inst in holders}
        decisions = self.manager.decide(str(h.key), holders, signals, h.count, len(chunks))
        for skip in decisions.skipped:
            self.decisions[f"skip_{skip.action}:{skip.reason}"] += 1
        sent = 0
        for action in decisions.actions:
            self._count(action)
            if action.kind in ("pin", "compress", "evict"):
                sent += 1
                if action.kind == "pin":
                    self.pins_log.append((self.now, action.instance, h.key, action.reason))
                self._execute(action, chunks)
        return sent

    def _count(self, action: Action) -> None:
        self.decisions[f"{action.kind}:{action.reason}"] += 1

    def _execute(self, action: Action, chunks: Sequence[int]) -> None:
        e = self.by_id.get(action.instance)
        tier = e.core.tier if e is not None else None
        cs = self.cfg.cache_strategy
        location = {"pin": cs.pin_location, "compress": cs.compress_location}.get(action.kind, "") or DEFAULT_LOCATION
        if tier is None or (action.kind != "evict" and location != tier.location):
            if action.kind == "pin":
                self.manager.pin_failed(action.instance, action.key)
            return
        if action.kind == "pin":
            # the tier's clock is its engine's, which may lag the runner's: pin until now + pin_timeout_s
            assert e is not None
            n = tier.pin_keys(chunks, timeout_s=tier.pin_timeout_s + max(0.0, self.now - e.core.now))
        elif action.kind == "compress":
            n = tier.compress_keys(chunks, cs.compress_method)
        else:
            n = tier.evict_keys(chunks)
        self.tier_chunks[f"{action.kind}:{action.instance}"] += n

    # ------------------------------------------------------------------ replication (routing path)

    def add_replicas(self, prompt: Prompt, matches: Mapping[str, int]) -> Mapping[str, int]:
        """``matches`` plus the planner's replicas of the prompt's prefix (as ``CacheManagement.on_route``)."""
        if self.planner is None or not matches:
            return matches
        key = self.hot.key_of(prompt.chunk_hashes(self.chunk_size))
        replicas = self.planner.holders(str(key), self.replica_grace) if key is not None else []
        if not replicas:
            return matches
        shared = self.hot.tokens(key) if key is not None else None
        return credit_replicas(matches, replicas, len(shared) * self.chunk_size if shared is not None else 0)

    def replicas_of(self, prompt: Prompt) -> list[str]:
        """The planner's confirmed replicas of the prompt's prefix."""
        if self.planner is None:
            return []
        key = self.hot.key_of(prompt.chunk_hashes(self.chunk_size))
        return self.planner.holders(str(key)) if key is not None else []

    def consider_replica(self, prompt: Prompt, matches: Mapping[str, int], spread_tokens: int) -> PlannedWarm | None:
        """A warm-up when the prompt's prefix is hot and all its holders are overloaded (``on_route``)."""
        planner = self.planner
        if planner is None or not matches:
            return None
        key = self.hot.key_of(prompt.chunk_hashes(self.chunk_size))
        if key is None:
            return None
        warm, reason = plan_for_matches(
            planner,
            str(key),
            hot=self.hot.count(key) >= self.replication_threshold,
            matches=matches,
            spread_tokens=spread_tokens,
            min_tokens=self.chunk_size,
            endpoints=self.endpoints,
        )
        if reason in ("not_hot", "not_overloaded", "no_holder"):
            return None
        self.replications[reason] += 1
        if warm is None:
            return None
        return PlannedWarm(warm, prompt, self.now, self.now + self.cfg.replication.timeout)

    def warm_done(self, planned: PlannedWarm) -> None:
        """The warm-up finished at ``now``: confirm the replica (a failure when past its timeout)."""
        assert self.planner is not None
        ok = self.now <= planned.deadline
        self.planner.confirm(planned.warm, ok)
        self.replications["ok" if ok else "error"] += 1
        w = planned.warm
        self.warm_log.append(
            {"instance": w.instance, "source": w.source, "planned_s": planned.planned_at, "done_s": self.now, "ok": ok}
        )

    # ------------------------------------------------------------------ report

    def info(self) -> dict[str, Any]:
        """JSON-friendly counters for the run's metadata."""
        out: dict[str, Any] = {}
        if self.managed:
            out["management"] = {
                "rounds": self.rounds,
                "decisions": dict(sorted(self.decisions.items())),
                "tier_chunks": dict(sorted(self.tier_chunks.items())),
                "pinned_chunks": {e.id: self.manager.pinned_chunks(e.id) for e in self.endpoints},
            }
        if self.planner is not None:
            out["replications"] = dict(sorted(self.replications.items()))
            out["warmups"] = list(self.warm_log)
        return out
