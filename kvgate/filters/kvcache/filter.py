"""The ``dgp.filter.ai.kvcache`` HTTP filter: KV-cache-aware routing hint + background cache management.

Decode path (synchronous, always ``CONTINUE``, errors never reach the client):

1. parse, extract model / prompt (Pixiu rules, :mod:`.extract`) and key the request (:mod:`.request`);
   no prompt → done;
2. record the request key in the hot map (only when pinning is configured: hotness feeds nothing else);
3. routing lookup — only with ``token_cache.enabled`` and only if the tokens are already cached
   (Pixiu's rule, kept by default: the *first* request for a prompt is never routed; its background
   job tokenizes it so the next identical request can be). With ``tokenize_on_miss: true`` a miss
   is tokenized synchronously inside the same cap, so first requests (every new turn of a chat)
   are routed too (token acquisition: :mod:`.route_tokens`). The lookup (tokenize included) is capped by
   ``lookup_routing_timeout`` (also by ``request_timeout`` / the HCM timeout if smaller) with
   ``asyncio.timeout_at``, so the request never waits longer than the cap (the call: :mod:`.lookup_route`);
4. choose the endpoint (:mod:`.choice`: :func:`kvgate.routing.prefix.choose_prefix_endpoint`) and set
   ``ctx.params[PREFERRED_ENDPOINT_PARAM]``;
5. enqueue a background job (never blocks; coalesced per key; dropped and counted when full).

Local routing (issue 9, docs/kvcache-filter.md "Local routing"): with ``local_tokenizer`` a token-cache miss
is tokenized in-process (the remote path stays the fallback); with ``index_source: events`` step 3-4 match
the filter's own event index (:mod:`.event_index`) instead of calling ``/lookup``; ``both`` also feeds the
index with the controller's holders from the background job (off the request path).

Cache management (issue 13, :mod:`.managed`): with ``cache_strategy.signals: engine`` the seed's per-job decision
is replaced by a background loop deciding per instance from the engines' own metrics; the jobs only count each
request's prefix. ``replication.enabled`` adds hot-prefix warm-ups, planned in :meth:`.choice.RouteChoice.apply`.

Background jobs run on ``max_background_tasks`` workers fed by a queue of ``background_queue_size``.
Each job (:mod:`.background`): tokenize on a cache miss (store) → lookup (reusing the routing lookup) → decide
→ execute.
Deadline = the effective request timeout, counted from the job's start; a job that waited in the
queue longer than that is dropped as ``expired``. Jobs are *detached* from the client request (a
fast response does not cut them short — Pixiu's request-bound context did) and are cancelled when
the filter closes. kvgate's ``RequestContext`` exposes no disconnect signal, so client cancellation
does not cancel an already-queued job; it is bounded by the deadline and the pool instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, FilterStatus, HttpFilter, RequestContext
from kvgate.config import unknown_keys
from kvgate.filters.kvcache.background import JobRunner
from kvgate.filters.kvcache.body_memo import BodyMemo
from kvgate.filters.kvcache.choice import RouteChoice
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.errors import CallTimeout, CircuitOpenError
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.extract import Extracted, ExtractError
from kvgate.filters.kvcache.hotstats import HotStats
from kvgate.filters.kvcache.jobs import Job, JobPool
from kvgate.filters.kvcache.lmcache_client import LMCacheClient, LookupResult, TokenizerClient
from kvgate.filters.kvcache.lookup_route import LookupRoute
from kvgate.filters.kvcache.managed import CacheManagement
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.pool import HostSlots, PoolLimits, make_session
from kvgate.filters.kvcache.remote_tokenizer import RemoteTokenizer
from kvgate.filters.kvcache.request import read_request
from kvgate.filters.kvcache.route_tokens import RouteTokens, Unheld, load_local_tokenizer
from kvgate.filters.kvcache.signals import LoadSignals, ProcessSignals
from kvgate.filters.kvcache.strategy import StrategyExecutor
from kvgate.filters.kvcache.tokens import TokenCache
from kvgate.redact import redact_url
from kvgate.resilience import CircuitBreaker, RetryPolicy, Sleep, retry_call
from kvgate.routing.prefix import ColdPlacement
from kvgate.runtime import Runtime

if TYPE_CHECKING:  # imported when index_source needs it: the lookup path loads no ZMQ
    from kvgate.filters.kvcache.event_index import EventIndex

log = logging.getLogger("kvgate.filters.kvcache")

T = TypeVar("T")
# tokenize_routing: request-path tokenizes (tokenize_on_miss), cut by the routing cap; kept apart from the
# background "tokenize" breaker so slow routing tokenizes cannot stop the background work that fills the cache.
BREAKERS = ("tokenize", "tokenize_routing", "lookup", "manage")


class KVCacheFilter(HttpFilter):
    """See the module docstring. Long-lived: one instance per listener."""

    def __init__(
        self,
        config: KVCacheConfig,
        runtime: Runtime,
        *,
        signals: LoadSignals | None = None,
        clock: Callable[[], float] = time.monotonic,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self.cfg = config
        self.runtime = runtime
        self.metrics = KVCacheMetrics.for_registry(runtime.metrics.registry, runtime.metrics.tally)
        self.signals: LoadSignals = signals or ProcessSignals()
        self._sleep = sleep
        # One pool for the controller and tokenizer calls, built from Pixiu's keys (see .pool).
        self.pool_limits = PoolLimits(config.max_conns_per_host, config.max_idle_conns, config.max_idle_conns_per_host)
        self.slots = HostSlots(config.max_conns_per_host)
        self._own_session: aiohttp.ClientSession | None = None
        factory = session_factory or self._session
        self.events = FilterEvents(
            self.metrics,
            controller_url=redact_url(config.lmcache_endpoint),
            tokenizer_url=redact_url(config.vllm_endpoint),
            clock=clock,
        )
        bad = self.events.bad_response
        self.lmcache = LMCacheClient(factory, config.lmcache_endpoint, config.request_timeout, bad, self.slots)
        self.tokenizer = RemoteTokenizer(
            TokenizerClient(factory, config.vllm_endpoint, config.request_timeout, bad, self.slots),
            lambda url: TokenizerClient(factory, url, config.request_timeout, bad, self.slots),
            clock=clock,
            on_fallback=self.events.tokenize_fallback,
        )
        self.token_cache = TokenCache(max(0, config.token_cache.max_size), config.token_cache.ttl, clock)
        # its size is read when the metrics are collected (and flushed under workers), not set per request
        runtime.metrics.tally.sample(lambda: self.metrics.token_cache_size.set(len(self.token_cache)))
        self.hot = HotStats(
            config.hot_window, config.hot_max_records, config.hot_key_cap(), clock, max_bytes=config.hot_max_bytes
        )
        r = config.retry
        self.retry = RetryPolicy(r.max_attempts, r.base_backoff, r.max_backoff, r.jitter, deadline_error=CallTimeout)
        cb = config.circuit_breaker
        self.breakers = {
            name: CircuitBreaker(
                name,
                cb.failure_threshold,
                cb.recovery_timeout,
                cb.half_open_max_calls,
                clock,
                on_change=self.events.breaker_changed,
                open_error=CircuitOpenError,
            )
            for name in BREAKERS
        }
        for name in BREAKERS:
            self.metrics.breaker_state.labels(name).set(0)
        self.executor = StrategyExecutor(
            config.cache_strategy,
            self.lmcache,
            self._manage_call,
            on_result=lambda action, result: self.metrics.actions.labels(action, result).inc(),
            on_unsupported=self.events.action_unsupported,
            on_supported=self.events.action_supported,
            clock=clock,
        )
        self.cold = ColdPlacement() if config.cold_placement == "lru" else None
        tc = config.token_cache
        if config.enabled and tc.enabled and tc.max_size == 0:
            bound = f"only its ttl ({tc.ttl:g}s) bounds it" if tc.ttl > 0 else "it grows without bound"
            log.warning(
                "[kvcache] token_cache.max_size is 0: the token cache has no size bound, %s "
                "(set token_cache.max_size, e.g. 8192)",
                bound,
            )
        extra = unknown_keys(config)
        if extra:
            log.warning("[kvcache] ignoring unknown config keys: %s", ", ".join(extra))
        self.local_tokenizer = load_local_tokenizer(config)
        if self.local_tokenizer is not None:
            lt = self.local_tokenizer
            log.info("[kvcache] local tokenizer %s (engine %s; fast engines: %s)", lt.name, lt.engine, lt.fast_reason)
        self.event_index: EventIndex | None = None
        if config.enabled and config.index_source != "lookup":
            from kvgate.filters.kvcache.event_index import DEFAULT_MEMO_SIZE, EventIndex

            memo = tc.max_size if 0 < tc.max_size < DEFAULT_MEMO_SIZE else DEFAULT_MEMO_SIZE
            self.event_index = EventIndex(config.kv_events, self.metrics, self.events, clock=clock, memo_size=memo)
            known = {ep.id for cluster in runtime.clusters for ep in cluster.endpoints}
            strangers = [i for i in self.event_index.instances if i not in known]
            if strangers:
                log.warning(
                    "[kvcache] kv_events.sources name instances that are no cluster endpoint: %s "
                    "(their blocks are indexed but never chosen)",
                    ", ".join(strangers),
                )
        self.body_memo = BodyMemo()
        self.route_tokens = RouteTokens(
            config,
            token_cache=self.token_cache,
            local=self.local_tokenizer,
            remote=self.tokenizer,
            event_index=self.event_index,
            breaker=self.breakers["tokenize"],
            routing_breaker=self.breakers["tokenize_routing"],
            fallbacks=self._fallbacks,
            metrics=self.metrics,
            events=self.events,
        )

        def manage_lookup(tokens: Sequence[int], deadline: float) -> Awaitable[LookupResult]:
            return self._manage_call(lambda: self.lmcache.lookup(tokens, deadline=deadline), deadline)

        self.management: CacheManagement | None = None
        if config.needs_engine_metrics:
            self.management = CacheManagement(
                config,
                runtime,
                executor=self.executor,
                lookup=manage_lookup,
                index=self.event_index,
                metrics=self.metrics,
                events=self.events,
                session_factory=factory,
                clock=clock,
            )
        self.choice = RouteChoice(
            config,
            runtime,
            metrics=self.metrics,
            management=self.management,
            event_index=self.event_index,
            cold=self.cold,
        )
        self.lookup_route = LookupRoute(
            self.lmcache,
            self.breakers["lookup"],
            self.retry,
            self.choice,
            self.metrics,
            self.events,
            max_conns_per_host=config.max_conns_per_host,
            sleep=sleep,
        )
        self.runner = JobRunner(
            config,
            runtime,
            token_cache=self.token_cache,
            tokens=self.route_tokens,
            lookup=manage_lookup,
            signals=self.signals,
            hot=self.hot,
            executor=self.executor,
            management=self.management,
            event_index=self.event_index,
            metrics=self.metrics,
            events=self.events,
            clock=clock,
        )
        self.jobs = JobPool(
            config.max_background_tasks, config.background_queue_size, self.runner.run, self.metrics, self.events
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.cfg.enabled:
            self.jobs.start()
            if self.event_index is not None:
                await self.event_index.start()
            if self.management is not None:
                self.management.start()

    def _session(self) -> aiohttp.ClientSession:
        """The filter's own client session (created on first use, inside the event loop)."""
        if self._own_session is None or self._own_session.closed:
            self._own_session = make_session(self.pool_limits)
        return self._own_session

    async def close(self) -> None:
        """Cancel the workers, drop queued jobs and close the filter's own client session."""
        await self.jobs.close()
        if self.management is not None:
            await self.management.close()
        if self.event_index is not None:
            await self.event_index.close()
        if self._own_session is not None and not self._own_session.closed:
            await self._own_session.close()

    @property
    def queue_depth(self) -> int:
        return self.jobs.queue_depth

    @property
    def worker_count(self) -> int:
        return self.jobs.worker_count

    # ------------------------------------------------------------------ decode path

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        if not self.cfg.enabled:
            return FilterStatus.CONTINUE
        started = time.perf_counter()
        try:
            await self._decode(ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never reaches the client
            self.metrics.errors.inc()
            self.events.warn("decode_error", "[kvcache] unexpected decode error: %s: %s", type(exc).__name__, exc)
        finally:
            self.metrics.added_latency.observe(time.perf_counter() - started)
        return FilterStatus.CONTINUE

    async def _decode(self, ctx: RequestContext) -> None:
        try:
            parsed = await read_request(ctx, self.cfg.default_model, self.body_memo)
        except ValueError as exc:  # includes ExtractError
            self.events.warn(
                "parse_body",
                "[kvcache] parse request body failed: %s",
                exc if isinstance(exc, ExtractError) else f"invalid JSON ({len(ctx.body)} bytes)",
            )
            return
        if parsed is None:
            return
        req, key = parsed
        if self.cfg.pin_active and self.management is None:  # hotness only feeds the seed's pin decision
            self.hot.record(key)
            self.metrics.hot_keys.set(len(self.hot))
            self.metrics.hot_bytes.set(self.hot.approx_bytes)
        lookup = await self._route(ctx, req, key)
        if self.cold is not None and PREFERRED_ENDPOINT_PARAM not in ctx.params:
            self.choice.place_cold(ctx)
        self._enqueue(req, key, lookup, self.cfg.effective_timeout(ctx.timeout), ctx.cluster_name)

    async def _route(self, ctx: RequestContext, req: Extracted, key: str) -> LookupResult | None:
        m = self.metrics
        if not self.cfg.token_cache.enabled:
            m.routing_lookups.count("disabled").n += 1
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.routing_timeout(ctx.timeout)
        # the event index reads the cached array in place; the lookup path sends a list
        tokens: Sequence[int] | None = (
            self.token_cache.get_array(key) if self.event_index is not None else self.token_cache.get(key)
        )
        if tokens is None:
            m.misses.n += 1
            t0 = time.perf_counter()
            missed = await self.route_tokens.on_miss(req, key, deadline, ctx.cluster_name)
            if isinstance(missed, Unheld):  # the index cannot match it: the background job tokenizes it all
                assert self.event_index is not None
                self.choice.index_decision(ctx, {}, 0, t0)
                return None
            tokens = missed
            if tokens is None:
                m.routing_lookups.count("no_tokens").n += 1
                log.debug("[kvcache] routing lookup skipped: token cache miss (key=%s)", key[:12])
                return None
        else:
            m.hits.n += 1
        if self.event_index is not None:
            self.choice.from_index(ctx, self.event_index, tokens, key)
            return None
        assert isinstance(tokens, list)
        return await self.lookup_route.route(ctx, tokens, deadline)

    # ------------------------------------------------------------------ background

    def _enqueue(
        self, req: Extracted, key: str, lookup: LookupResult | None, timeout: float, cluster: str = ""
    ) -> None:
        if self.jobs.closed:
            return
        needs_tokens = self.cfg.token_cache.enabled and not self.token_cache.contains(key)
        if not (
            needs_tokens or self.runner.strategy_active or self.management is not None or self.runner.hint_due(key)
        ):
            return  # nothing a job could do
        self.jobs.submit(Job(key, req, lookup, timeout, asyncio.get_running_loop().time(), cluster))

    async def _manage_call(self, fn: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        breaker = self.breakers["manage"]
        return await retry_call(
            lambda: breaker.call(fn, deadline=deadline), self.retry, deadline=deadline, sleep=self._sleep
        )

    # ------------------------------------------------------------------ callbacks

    def _fallbacks(self, cluster_name: str) -> list[str]:
        """Base URLs of the healthy endpoints of ``cluster_name`` (they serve the same model as vllm_endpoint)."""
        cluster = self.runtime.clusters.get(cluster_name) if cluster_name else None
        if cluster is None:
            return []
        return [ep.base_url for ep in cluster.healthy_endpoints()]

    def snapshot(self) -> dict[str, Any]:
        """Debug view (no prompt text)."""
        return {
            "token_cache": self.token_cache.stats(),
            "hot_keys": len(self.hot),
            "breakers": {n: b.state.name for n, b in self.breakers.items()},
            "queue_depth": self.queue_depth,
            "running": self.jobs.running,
            "pending_keys": self.jobs.pending_keys,
            "unsupported_actions": sorted(self.executor.unsupported),
            "index": None
            if self.event_index is None
            else {"blocks": len(self.event_index.index), **self.event_index.counters()},
            "management": None if self.management is None else self.management.snapshot(),
        }
