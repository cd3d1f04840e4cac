"""The body of the filter's background job (run by :class:`~.jobs.JobPool` workers, off the request path).

Each job: tokens from the token cache, else tokenized (:meth:`.route_tokens.RouteTokens.tokenize`; stored if the
cache is enabled) → with cache management (issue 13, :mod:`.managed`) the prefix is counted → lookup (reusing
the routing lookup when there was one; otherwise retry + the ``manage`` breaker) → the seed's per-request
decision from process signals (:func:`.strategy.make_decision`) → execute it (:class:`.strategy.StrategyExecutor`).

``index_source: both``: at most once per ``kv_events.hint_ttl / 2`` per request key the job also fetches the
controller's holders and adds them to the event index as aging hints (:meth:`JobRunner.add_hints`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.errors import KVCacheError
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.hotstats import HotStats
from kvgate.filters.kvcache.jobs import Job
from kvgate.filters.kvcache.lmcache_client import LookupResult
from kvgate.filters.kvcache.managed import CacheManagement, Lookup
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.route_tokens import LMCACHE_CHUNK_TOKENS, RouteTokens
from kvgate.filters.kvcache.signals import LoadSignals
from kvgate.filters.kvcache.strategy import StrategyExecutor, make_decision
from kvgate.filters.kvcache.tokens import TokenCache
from kvgate.runtime import Runtime

if TYPE_CHECKING:  # imported when index_source needs it: the lookup path loads no ZMQ
    from kvgate.filters.kvcache.event_index import EventIndex

HINT_CACHE_SIZE = 4096  # request keys whose controller holders were fetched recently (index_source: both)


def strategy_active(config: KVCacheConfig) -> bool:
    """The seed's per-request decision from process signals is configured (with ``signals: engine`` the
    management loop decides instead)."""
    cs = config.cache_strategy
    return not config.engine_managed and bool(
        (cs.enable_compression and cs.load_threshold > 0)
        or (cs.enable_eviction and cs.memory_threshold > 0)
        or (cs.enable_pinning and cs.hot_content_threshold > 0)
    )


class JobRunner:
    """See the module docstring. ``lookup`` is the controller ``/lookup`` through retry + the manage breaker."""

    def __init__(
        self,
        config: KVCacheConfig,
        runtime: Runtime,
        *,
        token_cache: TokenCache,
        tokens: RouteTokens,
        lookup: Lookup,
        signals: LoadSignals,
        hot: HotStats,
        executor: StrategyExecutor,
        management: CacheManagement | None,
        event_index: EventIndex | None,
        metrics: KVCacheMetrics,
        events: FilterEvents,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = config
        self.runtime = runtime
        self.token_cache = token_cache
        self.tokens = tokens
        self._lookup = lookup
        self.signals = signals
        self.hot = hot
        self.executor = executor
        self.management = management
        self.event_index = event_index
        self.metrics = metrics
        self.events = events
        self._clock = clock
        self.strategy_active = strategy_active(config)
        self._hinted: OrderedDict[str, float] = OrderedDict()

    async def run(self, job: Job, deadline: float) -> None:
        tokens = self.token_cache.get(job.key, count=False)
        if tokens is None:
            tokens = await self.tokens.tokenize(job, deadline)
            if self.cfg.token_cache.enabled:
                self.tokens.store(job.key, tokens)
        if self.management is not None:
            self.management.observe(tokens)
        hint = self.hint_due(job.key)
        if not (self.strategy_active or hint) or not tokens:
            return
        lookup = job.lookup
        if lookup is None:
            if hint:
                self._hinted[job.key] = self._clock()
                self._hinted.move_to_end(job.key)
                while len(self._hinted) > HINT_CACHE_SIZE:
                    self._hinted.popitem(last=False)
            t0 = time.perf_counter()
            try:
                lookup = await self._lookup(tokens, deadline)
            except KVCacheError as exc:
                self.events.warn("lookup_failed", "[kvcache] lookup failed: %s", exc)
                raise
            finally:
                self.metrics.lookup_latency.labels("background").observe(time.perf_counter() - t0)
                if hint:
                    self.metrics.hint_lookups.labels("error" if lookup is None else "ok").inc()
            if hint:
                self.add_hints(job.cluster, tokens, lookup)
        if not self.strategy_active:
            return
        decision = make_decision(
            self.cfg.cache_strategy,
            self.signals.sample(),
            self.hot.is_hot(job.key, self.cfg.cache_strategy.hot_content_threshold),
        )
        if not decision:
            return
        try:
            await self.executor.execute(decision, tokens, lookup, deadline)
        except KVCacheError as exc:
            self.events.warn("execute_failed", "[kvcache] execute strategy failed: %s", exc)
            raise

    def hint_due(self, key: str) -> bool:
        """``index_source: both``: fetch the controller's holders for ``key`` at most once per hint_ttl / 2."""
        if self.event_index is None or self.cfg.index_source != "both":
            return False
        last = self._hinted.get(key)
        return last is None or self._clock() - last >= self.cfg.kv_events.hint_ttl / 2

    def add_hints(self, cluster_name: str, tokens: list[int], lookup: LookupResult) -> None:
        """Holders the controller reports (LMCache CPU tier) join the event index as aging hints."""
        assert self.event_index is not None
        cluster = self.runtime.clusters.get(cluster_name) if cluster_name else None
        for instance, n in lookup.matches.items():
            if cluster is not None and cluster.get(instance) is None:
                continue  # not an engine of this route: it could never be chosen
            if n > 0:
                self.event_index.add_hint(instance, tokens[:n], LMCACHE_CHUNK_TOKENS)
