"""Engine-aware cache management of the kvcache filter (issue 13): the I/O around the pure decision blocks.

* :class:`~.engine_signals.EngineScraper` polls every cluster endpoint's ``/metrics`` (vLLM + LMCache gauges)
  in the background;
* :class:`~.hot_prefixes.HotPrefixes` counts requests per shared prefix (fed by the background jobs, which have
  every request's tokens);
* a management loop, every ``cache_strategy.interval``, takes the hot prefixes, finds their holders (the event
  index, else the controller's ``/lookup``), asks :class:`~.management.CacheManager` for per-instance actions
  and runs them against the controller (``/pin``, ``/compress``, ``/evict``) through the filter's retry +
  ``manage`` breaker and the executor's unsupported back-off;
* hot-prefix replication (``replication.enabled``): on the request path, when a hot prefix's every holder is
  overloaded, :class:`~.replication.ReplicaPlanner` names a target and a background task sends the request
  once to it with ``max_tokens: 1``; routing then counts the replica as a holder.

Nothing here runs on the request path except :meth:`CacheManagement.on_route` (one hash of the first
``hot_prefix_tokens`` tokens and dict work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from kvgate.chain import RequestContext
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.engine_signals import EngineScraper, ScrapeTarget
from kvgate.filters.kvcache.errors import CircuitOpenError, KVCacheError
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.hot_prefixes import HotPrefix, HotPrefixes
from kvgate.filters.kvcache.lmcache_client import LookupResult
from kvgate.filters.kvcache.management import Action, CacheManager, ManagementPolicy, memory_ratio
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.replication import (
    ReplicaPlanner,
    ReplicationPolicy,
    Warm,
    credit_replicas,
    plan_for_matches,
)
from kvgate.filters.kvcache.strategy import StrategyExecutor, Target, resolve_target
from kvgate.runtime import Runtime
from kvgate.tasks import cancel_and_wait

if TYPE_CHECKING:
    from kvgate.cluster import EndpointState
    from kvgate.filters.kvcache.event_index import EventIndex

log = logging.getLogger("kvgate.filters.kvcache.managed")

CHUNK_TOKENS = 256  # LMCache's chunk: pins and the pinned-share cap count whole chunks
DEFAULT_LOCATION = "LocalCPUBackend"  # LMCache's CPU tier (when neither config nor /lookup names one)
MAX_HOT_PER_ROUND = 64
DEFAULT_REPLICATION_HOT = 2  # replication's hotness threshold when hot_content_threshold is 0
# With an event index a replica's own KV events make it a holder within about a second; the gateway's record
# only bridges that gap, so that a replica whose copy was since evicted (the index saw it go) draws no requests.
EVENTS_REPLICA_GRACE = 5.0

Lookup = Callable[[Sequence[int], float], Awaitable[LookupResult]]


def scrape_targets(cfg: KVCacheConfig, runtime: Runtime) -> list[ScrapeTarget]:
    """One target per distinct endpoint id of the gateway's clusters (``engine_metrics.endpoints`` override)."""
    em = cfg.engine_metrics
    overrides = {t.instance: t for t in em.endpoints}
    out: dict[str, ScrapeTarget] = {}
    for cluster in runtime.clusters:
        for ep in cluster.endpoints:
            if ep.id in out:
                continue
            o = overrides.get(ep.id)
            out[ep.id] = ScrapeTarget(
                ep.id,
                (o.metrics_url if o is not None and o.metrics_url else ep.base_url.rstrip("/") + "/metrics"),
                lmcache_metrics_url=o.lmcache_metrics_url if o is not None else "",
                lmcache_capacity_bytes=(o.lmcache_capacity_bytes if o and o.lmcache_capacity_bytes else 0)
                or em.lmcache_capacity_bytes,
                max_num_seqs=(o.max_num_seqs if o and o.max_num_seqs else 0) or em.max_num_seqs,
            )
    return list(out.values())


def management_policy(cfg: KVCacheConfig) -> ManagementPolicy:
    """The pure decision policy of ``cache_strategy`` + ``engine_metrics`` (shared with the virtual replay)."""
    cs, em = cfg.cache_strategy, cfg.engine_metrics
    return ManagementPolicy(
        enable_pinning=cs.enable_pinning,
        enable_compression=cs.enable_compression,
        enable_eviction=cs.enable_eviction,
        memory_threshold=cs.memory_threshold,
        load_threshold=cs.load_threshold,
        hot_content_threshold=cs.hot_content_threshold,
        pin_ttl=cs.pin_ttl,
        max_pinned_share=cs.max_pinned_share,
        max_age=em.effective_max_age(),
        default_capacity_chunks=em.lmcache_capacity_chunks,
    )


def replica_planner(cfg: KVCacheConfig, clock: Callable[[], float]) -> ReplicaPlanner | None:
    """The replication planner of the ``replication`` keys (None when replication is off)."""
    rep = cfg.replication
    if not rep.enabled:
        return None
    policy = ReplicationPolicy(
        max_replicas=rep.max_replicas,
        rate=rep.rate,
        burst=rep.burst,
        replica_ttl=rep.replica_ttl,
        pending_timeout=rep.timeout,
        max_keys=rep.max_keys,
        max_imbalance_abs=rep.max_imbalance_abs,
        max_imbalance_rel=rep.max_imbalance_rel,
    )
    return ReplicaPlanner(policy, clock=clock)


class CacheManagement:
    """See the module docstring. Owned by the filter: ``start()`` with it, ``close()`` with it."""

    def __init__(
        self,
        cfg: KVCacheConfig,
        runtime: Runtime,
        *,
        executor: StrategyExecutor,
        lookup: Lookup,
        index: EventIndex | None,
        metrics: KVCacheMetrics,
        events: FilterEvents,
        session_factory: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.runtime = runtime
        self.executor = executor
        self._lookup = lookup
        self.index = index
        self.metrics = metrics
        self.events = events
        self._session = session_factory
        self._clock = clock
        cs, em = cfg.cache_strategy, cfg.engine_metrics
        self.managed = cfg.engine_managed
        self.threshold = cs.hot_content_threshold
        self.hot = HotPrefixes(
            cfg.hot_window,
            key_tokens=cs.hot_prefix_tokens,
            chunk_tokens=CHUNK_TOKENS,
            max_keys=min(cfg.hot_key_cap(), 4096),
            max_records=cfg.hot_max_records,
            clock=clock,
        )
        targets = scrape_targets(cfg, runtime)
        self.scraper = EngineScraper(
            targets,
            interval=em.interval,
            timeout=em.timeout,
            max_age=em.effective_max_age(),
            clock=clock,
            on_result=lambda inst, result: metrics.engine_scrapes.labels(inst, result).inc(),
        )
        overrides = {t.instance: t for t in em.endpoints}
        capacity = {
            t.instance: (overrides[t.instance].lmcache_capacity_chunks if t.instance in overrides else 0)
            or em.lmcache_capacity_chunks
            for t in targets
        }
        self.manager = CacheManager(
            management_policy(cfg),
            capacity_chunks=capacity,
            max_num_seqs={t.instance: t.max_num_seqs for t in targets},
            clock=clock,
        )
        self.planner = replica_planner(cfg, clock)
        self.replication_threshold = self.threshold if self.threshold > 0 else DEFAULT_REPLICATION_HOT
        self._loop_task: asyncio.Task[None] | None = None
        self._warmups: set[asyncio.Task[None]] = set()
        self._replica_children = {r: metrics.replications.labels(r) for r in ("planned", "ok", "error")}
        self.rounds = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.scraper.start()
        if self.managed and self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="kvcache-management")

    async def close(self) -> None:
        await cancel_and_wait([self._loop_task, *self._warmups])
        self._loop_task = None
        self._warmups.clear()
        await self.scraper.aclose()

    def snapshot(self) -> dict[str, Any]:
        """Debug view for ``/config``-style pages (no prompt text, no URLs)."""
        return {
            "signals": "engine" if self.managed else "process",
            "rounds": self.rounds,
            "hot_prefixes": len(self.hot),
            "pins": {inst: self.manager.pinned_chunks(inst) for inst in self.scraper.instances()},
            "replicas": {} if self.planner is None else {k: self.planner.holders(k) for k in self.planner.keys()},
            "stale": [i for i in self.scraper.instances() if self.scraper.fresh(i) is None],
        }

    # ------------------------------------------------------------------ hotness (background jobs)

    def observe(self, tokens: Sequence[int]) -> None:
        """Count one request's prefix (called by the background job, which always has the tokens)."""
        self.hot.record(tokens)
        self.metrics.hot_prefixes.set(len(self.hot))

    # ------------------------------------------------------------------ management loop

    async def _loop(self) -> None:
        interval = self.cfg.cache_strategy.interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop management; logged once per kind
                self.events.warn("manage_round", "[kvcache] management round failed: %s: %s", type(exc).__name__, exc)

    async def run_round(self) -> int:
        """One management round; returns the number of actions sent to the controller."""
        self.rounds += 1
        self._export_signals()
        sent = 0
        for lapse in self.manager.expire():
            self._count(lapse)
        for h in self.hot.hot(self.threshold, MAX_HOT_PER_ROUND):
            sent += await self._manage_prefix(h)
        for inst in self.scraper.instances():
            self.metrics.pinned_chunks.labels(inst).set(self.manager.pinned_chunks(inst))
        return sent

    def _export_signals(self) -> None:
        now = self._clock()
        m = self.metrics
        for inst in self.scraper.instances():
            s = self.scraper.snapshot(inst)
            if s is None:
                continue
            if s.at is not None:
                m.engine_signal_age.labels(inst).set(s.age(now))
            m.engine_kv_usage.labels(inst).set(memory_ratio(s))
            m.engine_load.labels(inst).set(s.load(self.manager.max_num_seqs.get(inst, 0)))

    async def _holders(self, tokens: list[int], deadline: float) -> tuple[dict[str, int], LookupResult | None]:
        if self.index is not None:
            return dict(self.index.match(tokens)), None
        lookup = await self._lookup(tokens, deadline)
        return dict(lookup.matches), lookup

    async def _manage_prefix(self, h: HotPrefix) -> int:
        chunks = len(h.tokens) // CHUNK_TOKENS
        if chunks == 0:
            return 0
        tokens = h.tokens[: chunks * CHUNK_TOKENS]
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout
        try:
            matches, lookup = await self._holders(tokens, deadline)
        except KVCacheError as exc:
            self.events.warn("manage_lookup", "[kvcache] management lookup failed: %s", exc)
            return 0
        holders = [inst for inst, n in matches.items() if n >= CHUNK_TOKENS]
        if self.planner is not None:
            holders += [r for r in self._replicas(str(h.key)) if r not in holders]
        signals = {inst: self.scraper.snapshot(inst) for inst in holders}
        decisions = self.manager.decide(str(h.key), holders, signals, h.count, chunks)
        for skip in decisions.skipped:
            self.metrics.management_decisions.labels(f"skip_{skip.action}", skip.reason).inc()
        sent = 0
        for action in decisions.actions:
            self._count(action)
            if action.kind in ("pin", "compress", "evict"):
                sent += 1
                await self._execute(action, tokens, lookup, deadline)
        return sent

    def _count(self, action: Action) -> None:
        self.metrics.management_decisions.labels(action.kind, action.reason).inc()

    async def _execute(self, action: Action, tokens: list[int], lookup: LookupResult | None, deadline: float) -> None:
        cs = self.cfg.cache_strategy
        configured = {"pin": cs.pin_location, "compress": cs.compress_location}.get(action.kind, "")
        target = resolve_target(action.instance, configured, lookup)  # the seed's rule: config, else /lookup's
        if target is not None and not target.location and action.kind != "evict":
            target = Target(target.instance_id, DEFAULT_LOCATION)
        try:
            result = await self.executor.run_action(action.kind, tokens, target, deadline)
        except TimeoutError:
            result = "timeout"
        except KVCacheError as exc:
            result = "breaker_open" if isinstance(exc, CircuitOpenError) else "error"
            self.events.warn(
                f"manage_{action.kind}", "[kvcache] %s on %s failed: %s", action.kind, action.instance, exc
            )
        self.metrics.actions.labels(action.kind, result).inc()
        if action.kind == "pin" and result != "ok":
            self.manager.pin_failed(action.instance, action.key)

    # ------------------------------------------------------------------ replication (request path)

    def on_route(
        self,
        ctx: RequestContext,
        tokens: Sequence[int],
        matches: Mapping[str, int],
        endpoints: Sequence[EndpointState],
        spread_tokens: int,
    ) -> Mapping[str, int]:
        """The request path with replication on (never awaits): ``matches`` plus the gateway's replicas of the
        prompt's prefix (credited with the shared prefix), and a warm-up planned when the prefix is hot and all
        its holders are overloaded. One hash of the prompt's first ``hot_prefix_tokens`` tokens."""
        planner = self.planner
        if planner is None or not matches:
            return matches
        key = self.hot.key_of(tokens)
        if key is None:
            return matches
        shared = self.hot.tokens(key)
        matches = credit_replicas(matches, self._replicas(str(key)), len(shared) if shared is not None else 0)
        warm, reason = plan_for_matches(
            planner,
            str(key),
            hot=self.hot.count(key) >= self.replication_threshold,
            matches=matches,
            spread_tokens=spread_tokens,
            min_tokens=CHUNK_TOKENS,
            endpoints=endpoints,
        )
        if reason in ("not_hot", "not_overloaded", "no_holder"):
            return matches  # the common case: nothing to count per request
        child = self._replica_children.get(reason)
        (child if child is not None else self.metrics.replications.labels(reason)).inc()
        if warm is not None:
            self._start_warmup(warm, ctx, endpoints)
        return matches

    def _replicas(self, key: str) -> list[str]:
        """The replicas to credit: all recorded ones, or with an event index only the recently confirmed ones."""
        assert self.planner is not None
        return self.planner.holders(key, EVENTS_REPLICA_GRACE if self.index is not None else None)

    def _start_warmup(self, warm: Warm, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> None:
        assert self.planner is not None
        target = next(ep for ep in endpoints if ep.id == warm.instance)
        try:
            payload = warmup_body(ctx.json())  # parsed once per request, shared with the filter
        except ValueError:
            payload = None
        if payload is None:
            self.planner.confirm(warm, False)
            self._replica_children["error"].inc()
            return
        path = (ctx.raw_path or ctx.path.encode()).decode("latin-1")
        task = asyncio.get_running_loop().create_task(
            self._warm(warm, target, payload, path, ctx.header("authorization"))
        )
        self._warmups.add(task)
        task.add_done_callback(self._warmups.discard)

    async def _warm(self, warm: Warm, ep: EndpointState, payload: bytes, path: str, authorization: str | None) -> None:
        assert self.planner is not None
        headers = {"Content-Type": "application/json"}
        api_key = ep.config.llm_meta.api_key
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif authorization:
            headers["Authorization"] = authorization
        ok = False
        ep.in_flight += 1  # the warm-up is real work on that engine: the balancers see it
        try:
            async with self._session().post(
                ep.base_url.rstrip("/") + path,
                data=payload,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.replication.timeout),
            ) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                detail = f"status {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = type(exc).__name__
        finally:
            ep.in_flight -= 1
        self.planner.confirm(warm, ok)
        self._replica_children["ok" if ok else "error"].inc()
        self.metrics.replicas.set(sum(len(self.planner.holders(k)) for k in self.planner.keys()))
        if not ok:
            self.events.warn("replication_failed", "[kvcache] warm-up of %s failed: %s", warm.instance, detail)
        else:
            log.debug("[kvcache] warmed %s with a hot prefix (overloaded holder %s)", warm.instance, warm.source)


def warmup_body(data: Any) -> bytes | None:
    """The parsed request as a 1-token, non-streaming prefill (None when it is not a JSON object)."""
    if not isinstance(data, dict):
        return None
    data = dict(data)
    for key in ("stream", "stream_options", "n", "best_of", "logprobs", "top_logprobs", "echo"):
        data.pop(key, None)
    data["max_tokens"] = 1
    if "max_completion_tokens" in data:
        data["max_completion_tokens"] = 1
    return json.dumps(data, separators=(",", ":")).encode()
