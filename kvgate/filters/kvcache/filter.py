"""The ``dgp.filter.ai.kvcache`` HTTP filter: KV-cache-aware routing hint + background cache management.

Decode path (synchronous, always ``CONTINUE``, errors never reach the client):

1. extract model / prompt (Pixiu rules, :mod:`.extract`); no prompt → done;
2. record the request key in the hot map (only when pinning is configured: hotness feeds nothing else);
3. routing lookup — only with ``token_cache.enabled`` and only if the tokens are already cached
   (Pixiu's rule, kept by default: the *first* request for a prompt is never routed; its background
   job tokenizes it so the next identical request can be). With ``tokenize_on_miss: true`` a miss
   is tokenized synchronously inside the same cap, so first requests (every new turn of a chat)
   are routed too. The lookup (tokenize included) is capped by
   ``lookup_routing_timeout`` (also by ``request_timeout`` / the HCM timeout if smaller) with
   ``asyncio.timeout_at``, so the request never waits longer than the cap;
4. choose the endpoint (:func:`kvgate.routing.prefix.choose_prefix_endpoint`) and set
   ``ctx.params[PREFERRED_ENDPOINT_PARAM]``;
5. enqueue a background job (never blocks; coalesced per key; dropped and counted when full).

Local routing (issue 9, docs/kvcache-filter.md "Local routing"): with ``local_tokenizer`` a token-cache miss
is tokenized in-process (the remote path stays the fallback); with ``index_source: events`` step 3-4 match
the filter's own event index (:mod:`.event_index`) instead of calling ``/lookup``; ``both`` also feeds the
index with the controller's holders from the background job (off the request path).

Cache management (issue 13, :mod:`.managed`): with ``cache_strategy.signals: engine`` the seed's per-job decision
is replaced by a background loop deciding per instance from the engines' own metrics; the jobs only count each
request's prefix. ``replication.enabled`` adds hot-prefix warm-ups, planned in :meth:`_apply_choice`.

Background jobs run on ``max_background_tasks`` workers fed by a queue of ``background_queue_size``.
Each job: tokenize on a cache miss (store) → lookup (reusing the routing lookup) → decide → execute.
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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from kvgate.chain import JSON_OFFLOAD_BYTES, PREFERRED_ENDPOINT_PARAM, FilterStatus, HttpFilter, RequestContext
from kvgate.config import unknown_keys
from kvgate.errors import ConfigError
from kvgate.filters.kvcache.body_memo import BodyMemo
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.errors import CallTimeout, CircuitOpenError, DecodeError, KVCacheError, PoolTimeout
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.extract import Extracted, ExtractError, extract
from kvgate.filters.kvcache.hotstats import HotStats
from kvgate.filters.kvcache.jobs import Job, JobPool
from kvgate.filters.kvcache.lmcache_client import LMCacheClient, LookupResult, TokenizerClient
from kvgate.filters.kvcache.managed import CacheManagement
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.pool import HostSlots, PoolLimits, make_session
from kvgate.filters.kvcache.remote_tokenizer import RemoteTokenizer
from kvgate.filters.kvcache.signals import LoadSignals, ProcessSignals
from kvgate.filters.kvcache.strategy import StrategyExecutor, make_decision
from kvgate.filters.kvcache.tokens import TokenCache
from kvgate.redact import redact_url
from kvgate.resilience import CircuitBreaker, RetryPolicy, Sleep, retry_call
from kvgate.routing.prefix import ColdPlacement, PrefixChoice, choose_prefix_endpoint
from kvgate.runtime import Runtime
from kvgate.tokenization import LocalTokenizer, TokenizationError

if TYPE_CHECKING:  # imported when index_source needs it: the lookup path loads no ZMQ
    from kvgate.filters.kvcache.event_index import EventIndex

log = logging.getLogger("kvgate.filters.kvcache")

T = TypeVar("T")
# tokenize_routing: request-path tokenizes (tokenize_on_miss), cut by the routing cap; kept apart from the
# background "tokenize" breaker so slow routing tokenizes cannot stop the background work that fills the cache.
BREAKERS = ("tokenize", "tokenize_routing", "lookup", "manage")


LMCACHE_CHUNK_TOKENS = 256  # the controller's hard-coded lookup granularity
_TEMPLATE_TOKENS_PER_MESSAGE = 8  # generous bound on chat-template tokens around each message


class _Unheld:
    """A token-cache miss decided without full tokens: nobody holds the prompt's first block (lazy tokenization)."""


UNHELD = _Unheld()
HINT_CACHE_SIZE = 4096  # request keys whose controller holders were fetched recently (index_source: both)


def _may_fill_a_chunk(req: Extracted, chunk_tokens: int = LMCACHE_CHUNK_TOKENS) -> bool:
    """False when the prompt cannot reach one ``chunk_tokens`` block (256 = an LMCache chunk; the event index
    uses its own smallest block size), so a match could never be found.

    Byte-level BPE (and SentencePiece with byte fallback) never makes more tokens than UTF-8 bytes; the
    chat template adds a few tokens per message. Skipping saves a tokenization for short prompts.
    """
    text = req.engine_text if req.kind == "prompt" else req.prompt
    extra = _TEMPLATE_TOKENS_PER_MESSAGE * (len(req.messages) + 1) if req.kind == "chat" else 2
    return len(text.encode("utf-8")) + extra >= chunk_tokens


def load_local_tokenizer(config: KVCacheConfig) -> LocalTokenizer | None:
    """The ``local_tokenizer`` directory, loaded once (a load failure is a config error naming the key)."""
    lt = config.local_tokenizer
    if lt is None or not config.enabled:
        return None
    try:
        return LocalTokenizer.from_dir(lt.path, thread_threshold=lt.thread_threshold, fast=lt.fast)
    except TokenizationError as exc:
        raise ConfigError("local_tokenizer.path", f"[kvcache] local_tokenizer.path: {exc}") from None


def _extract_and_key(data: Any, default_model: str) -> tuple[Extracted, str] | None:
    req = extract(data, default_model)
    return None if req is None else (req, req.key)


async def read_request(
    ctx: RequestContext, default_model: str, memo: BodyMemo | None = None
) -> tuple[Extracted, str] | None:
    """Parse, extract and key the request. Above ``JSON_OFFLOAD_BYTES`` the parse and the canonical-JSON +
    SHA-256 key run on worker threads, so a large body does not stall every other stream on the loop.
    With ``memo`` a body seen before reuses its result (see :mod:`.body_memo`).
    Raises ``ValueError`` (malformed JSON, :class:`ExtractError`)."""
    if memo is not None:
        hit = memo.get(ctx.body)
        if hit is not None:
            return hit
    data = await ctx.json_async()
    if len(ctx.body) > JSON_OFFLOAD_BYTES:
        parsed = await asyncio.to_thread(_extract_and_key, data, default_model)
    else:
        parsed = _extract_and_key(data, default_model)
    if memo is not None and parsed is not None:
        memo.put(ctx.body, parsed)
    return parsed


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
        self.metrics = KVCacheMetrics.for_registry(runtime.metrics.registry)
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
        cs = config.cache_strategy
        # the seed's per-request decision from process signals; with signals: engine the management loop decides
        self._strategy_active = not config.engine_managed and bool(
            (cs.enable_compression and cs.load_threshold > 0)
            or (cs.enable_eviction and cs.memory_threshold > 0)
            or (cs.enable_pinning and cs.hot_content_threshold > 0)
        )
        self.cold = ColdPlacement() if config.cold_placement == "lru" else None
        self.jobs = JobPool(
            config.max_background_tasks, config.background_queue_size, self._run_job, self.metrics, self.events
        )
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
            log.info("[kvcache] local tokenizer %s (engine %s)", self.local_tokenizer.name, self.local_tokenizer.engine)
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
        # the index path's per-request metric children, resolved once (labels() costs a lock and a lookup)
        self._outcomes = {o: self.metrics.routing_lookups.labels(o) for o in ("empty", "routed", "no_match")}
        self._predicted_chosen = self.metrics.predicted_matched_tokens.labels("chosen")
        self._predicted_best = self.metrics.predicted_matched_tokens.labels("best")
        self._hinted: OrderedDict[str, float] = OrderedDict()
        self._clock = clock
        self.management: CacheManagement | None = None
        if config.needs_engine_metrics:
            self.management = CacheManagement(
                config,
                runtime,
                executor=self.executor,
                lookup=lambda tokens, deadline: self._manage_call(
                    lambda: self.lmcache.lookup(tokens, deadline=deadline), deadline
                ),
                index=self.event_index,
                metrics=self.metrics,
                events=self.events,
                session_factory=factory,
                clock=clock,
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
            self.metrics.routing_added_latency.observe(time.perf_counter() - started)
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
            self._place_cold(ctx)
        self._enqueue(req, key, lookup, self.cfg.effective_timeout(ctx.timeout), ctx.cluster_name)

    async def _route(self, ctx: RequestContext, req: Extracted, key: str) -> LookupResult | None:
        m = self.metrics
        if not self.cfg.token_cache.enabled:
            m.routing_lookups.labels("disabled").inc()
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.routing_timeout(ctx.timeout)
        # the event index reads the cached array in place; the lookup path sends a list
        tokens: Sequence[int] | None = (
            self.token_cache.get_array(key) if self.event_index is not None else self.token_cache.get(key)
        )
        m.token_cache_size.set(len(self.token_cache))
        if tokens is None:
            m.token_cache_misses.inc()
            t0 = time.perf_counter()
            missed = await self._tokens_on_miss(req, key, deadline, ctx.cluster_name)
            if isinstance(missed, _Unheld):  # the index cannot match it: the background job tokenizes it all
                assert self.event_index is not None
                self._index_decision(ctx, {}, 0, t0)
                return None
            tokens = missed
            if tokens is None:
                m.routing_lookups.labels("no_tokens").inc()
                log.debug("[kvcache] routing lookup skipped: token cache miss (key=%s)", key[:12])
                return None
        else:
            m.token_cache_hits.inc()
        if self.event_index is not None:
            self._route_from_index(ctx, self.event_index, tokens, key)
            return None
        assert isinstance(tokens, list)
        breaker = self.breakers["lookup"]
        if not breaker.would_allow():
            m.routing_lookups.labels("breaker_open").inc()
            return None
        t0 = time.perf_counter()
        outcome: str | None = None
        try:
            async with asyncio.timeout_at(deadline):
                lookup = await retry_call(
                    lambda: breaker.call(lambda: self.lmcache.lookup(tokens, deadline=deadline), deadline=deadline),
                    self.retry,
                    deadline=deadline,
                    sleep=self._sleep,
                )
        except CircuitOpenError:
            outcome = "breaker_open"
        except PoolTimeout:
            outcome = "pool_wait"  # max_conns_per_host saturated: not a controller failure
            self.events.pool_wait(self.cfg.max_conns_per_host)
        except TimeoutError:
            outcome = "timeout"
            log.debug("[kvcache] routing lookup failed: timed out after %.0fms", (time.perf_counter() - t0) * 1e3)
        except DecodeError as exc:
            outcome = "bad_response"
            log.debug("[kvcache] routing lookup failed: %s", exc)
        except KVCacheError as exc:
            outcome = "error"
            log.debug("[kvcache] routing lookup failed: %s", exc)
        finally:
            m.lookup_latency.labels("routing").observe(time.perf_counter() - t0)
        if outcome is not None:
            m.routing_lookups.labels(outcome).inc()
            return None
        if not lookup.layout:
            log.debug("[kvcache] routing lookup returned empty instance")
            outcome, choice = "empty", None
        else:
            outcome, choice = self._apply_choice(ctx, lookup.matches, len(tokens), 0, tokens)
        m.routing_lookups.labels(outcome).inc()
        # Decision label for clients and benchmarks: which instance was preferred and why.
        label = f"{outcome};lookup_ms={(time.perf_counter() - t0) * 1e3:.1f}" + _predicted(choice)
        ctx.response_headers.append((b"x-kvgate-kvcache", label.encode()))
        return lookup

    def _route_from_index(self, ctx: RequestContext, index: EventIndex, tokens: Sequence[int], key: str) -> None:
        """``index_source: events | both``: match the event index (in memory, no controller call)."""
        t0 = time.perf_counter()
        self._index_decision(ctx, index.match(tokens, key), len(tokens), t0, tokens)

    def _index_decision(
        self,
        ctx: RequestContext,
        matches: Mapping[str, int],
        num_tokens: int,
        t0: float,
        tokens: Sequence[int] | None = None,
    ) -> None:
        assert self.event_index is not None
        if not matches:
            outcome, choice = "empty", None
        else:
            outcome, choice = self._apply_choice(ctx, matches, num_tokens, self.event_index.spread_tokens(), tokens)
        self._outcomes[outcome].inc()
        label = f"{outcome};source=events;match_ms={(time.perf_counter() - t0) * 1e3:.2f}" + _predicted(choice)
        ctx.response_headers.append((b"x-kvgate-kvcache", label.encode()))

    def _min_prompt_tokens(self) -> int:
        """Prompts that cannot fill one block of the routing source are not tokenized on the request path."""
        if self.event_index is not None:
            return self.event_index.min_block_tokens() or LMCACHE_CHUNK_TOKENS
        return LMCACHE_CHUNK_TOKENS

    async def _tokens_on_miss(
        self, req: Extracted, key: str, deadline: float, cluster: str
    ) -> list[int] | _Unheld | None:
        """Token-cache miss on the request path: local tokenizer first, then (``tokenize_on_miss``) remote.
        ``UNHELD``: the event index provably matches nothing for this chat (see :meth:`_lazy_chat`)."""
        if not _may_fill_a_chunk(req, self._min_prompt_tokens()):
            return None
        if self.local_tokenizer is not None:
            text: str | None = None
            if self.event_index is not None and req.kind == "chat":
                lazy = self._lazy_chat(self.local_tokenizer, self.event_index, req)
                if isinstance(lazy, _Unheld):
                    return lazy
                if isinstance(lazy, list):
                    self._store_tokens(key, lazy)
                    return lazy
                text = lazy
            tokens = await self._tokenize_local(self.local_tokenizer, req, key, text)
            if tokens is not None:
                self._store_tokens(key, tokens)
                return tokens
        if self.cfg.tokenize_on_miss:
            return await self._tokenize_within(req, key, deadline, cluster)
        return None

    def _lazy_chat(self, tok: LocalTokenizer, index: EventIndex, req: Extracted) -> _Unheld | list[int] | str | None:
        """Lazy tokenization for the event index: render the chat, encode its pieces (between added tokens) only
        until one more token than the index's largest block size is known, and stop when nobody holds the first
        block at any size: ``match`` of the full ids would be empty too (``BlockIndex.first_block_held``), so the
        decision is identical. Returns ``UNHELD``, the full ids (the whole chat fit in the prefix), or the rendered
        text to encode in full (``None``: rendering failed; the full path repeats it and reports the failure).
        Nothing partial is cached: the background job tokenizes an ``UNHELD`` chat in full."""
        t0 = time.perf_counter()
        try:
            text = tok.render_chat(list(req.messages), tools=req.tools)
        except TokenizationError:
            return None
        biggest = index.max_block_tokens()
        if biggest is None:  # an empty index matches nothing
            self.metrics.local_tokenize.labels("unheld").inc()
            return UNHELD
        prefix = tok.chat_prefix(text, biggest + 1)
        if prefix is None:
            return text
        ids, complete = prefix
        if complete:
            self.metrics.local_tokenize.labels("ok").inc()
            self.metrics.local_tokenize_latency.observe(time.perf_counter() - t0)
            return ids
        if index.index.first_block_held(ids, len(ids) - 1):
            return text
        self.metrics.local_tokenize.labels("unheld").inc()
        return UNHELD

    async def _tokenize_local(
        self, tok: LocalTokenizer, req: Extracted, key: str, text: str | None = None
    ) -> list[int] | None:
        """In-process tokenization (long texts on a worker thread); ``None`` when it fails (counted, logged).
        ``text``: the chat already rendered."""
        m = self.metrics
        t0 = time.perf_counter()
        try:
            if req.kind == "prompt":
                tokens = await tok.aencode_prompt(req.engine_text)
            elif text is not None:
                tokens = await tok.aencode_rendered_chat(text)
            else:
                tokens = await tok.aencode_chat(list(req.messages), tools=req.tools)
        except TokenizationError as exc:
            m.local_tokenize.labels("fallback").inc()
            self.events.warn(
                "local_tokenize_fallback",
                "[kvcache] local tokenization failed, the remote /tokenize path is used: %s (key=%s)",
                str(exc)[:200],
                key[:12],
            )
            return None
        finally:
            m.local_tokenize_latency.observe(time.perf_counter() - t0)
        m.local_tokenize.labels("ok").inc()
        return tokens

    async def _tokenize_within(self, req: Extracted, key: str, deadline: float, cluster: str) -> list[int] | None:
        """``tokenize_on_miss``: tokenize on the request path, bounded by the routing deadline."""
        breaker = self.breakers["tokenize_routing"]
        if not breaker.would_allow():
            return None
        t0 = time.perf_counter()
        body = req.tokenize_request()
        try:
            async with asyncio.timeout_at(deadline):
                tokens = await breaker.call(
                    lambda: self.tokenizer.tokenize(body, deadline=deadline, fallbacks=self._fallbacks(cluster)),
                    deadline=deadline,
                )
        except (TimeoutError, KVCacheError) as exc:
            self.metrics.tokenize_calls.labels("error").inc()
            log.debug(
                "[kvcache] routing tokenize failed: %s (key=%s, prompt_chars=%d)",
                type(exc).__name__,
                key[:12],
                len(req.prompt),
            )
            return None
        finally:
            self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        self.metrics.tokenize_calls.labels("ok").inc()
        self._store_tokens(key, tokens)
        return tokens

    def _store_tokens(self, key: str, tokens: list[int]) -> None:
        self.token_cache.put(key, tokens)
        self.metrics.token_cache_size.set(len(self.token_cache))
        if self.event_index is not None:
            self.event_index.forget_tokens(key)

    def _place_cold(self, ctx: RequestContext) -> None:
        """``cold_placement: lru``: no usable cached prefix, so spread the new prefix (see ColdPlacement)."""
        assert self.cold is not None
        cluster = self.runtime.clusters.get(ctx.cluster_name) if ctx.cluster_name else None
        if cluster is None:
            return
        target = self.cold.pick(cluster.endpoints)
        if target is None:
            return
        ctx.params[PREFERRED_ENDPOINT_PARAM] = target
        self.metrics.cold_placements.labels(target).inc()
        ctx.response_headers.append((b"x-kvgate-kvcache-cold", target.encode()))

    def _apply_choice(
        self,
        ctx: RequestContext,
        matches: Mapping[str, int],
        num_tokens: int,
        spread_tokens: int = 0,
        tokens: Sequence[int] | None = None,
    ) -> tuple[str, PrefixChoice]:
        cluster = self.runtime.clusters.get(ctx.cluster_name) if ctx.cluster_name else None
        mgmt = self.management
        if mgmt is not None and mgmt.planner is not None and tokens is not None and cluster is not None:
            matches = mgmt.add_replicas(tokens, matches)
            mgmt.consider_replica(
                tokens,
                matches,
                cluster.endpoints,
                spread_tokens,
                ctx.body,
                (ctx.raw_path or ctx.path.encode()).decode("latin-1"),
                ctx.header("authorization"),
            )
        choice = choose_prefix_endpoint(
            matches,
            cluster.endpoints if cluster is not None else None,
            min_match_tokens=self.cfg.min_match_tokens,
            max_imbalance_abs=self.cfg.max_imbalance_abs,
            max_imbalance_rel=self.cfg.max_imbalance_rel,
            min_match_ratio=self.cfg.min_match_ratio,
            num_tokens=num_tokens,
            spread_tokens=spread_tokens,
        )
        for reason, n in choice.rejected.items():
            self.metrics.routing_rejected.labels(reason).inc(n)
        if choice.endpoint_id is None:
            log.debug("[kvcache] routing lookup found no eligible instance (rejected: %s)", dict(choice.rejected))
            return "no_match", choice
        ctx.params[PREFERRED_ENDPOINT_PARAM] = choice.endpoint_id
        self._predicted_chosen.observe(choice.matched_tokens)
        self._predicted_best.observe(choice.best_tokens)
        log.debug("[kvcache] routing preferred endpoint set: %s (%d tokens)", choice.endpoint_id, choice.matched_tokens)
        return "routed", choice

    # ------------------------------------------------------------------ background

    def _enqueue(
        self, req: Extracted, key: str, lookup: LookupResult | None, timeout: float, cluster: str = ""
    ) -> None:
        if self.jobs.closed:
            return
        needs_tokens = self.cfg.token_cache.enabled and not self.token_cache.contains(key)
        if not (needs_tokens or self._strategy_active or self.management is not None or self._hint_due(key)):
            return  # nothing a job could do
        self.jobs.submit(Job(key, req, lookup, timeout, asyncio.get_running_loop().time(), cluster))

    async def _run_job(self, job: Job, deadline: float) -> None:
        tokens = self.token_cache.get(job.key, count=False)
        if tokens is None:
            tokens = await self._tokenize(job, deadline)
            if self.cfg.token_cache.enabled:
                self._store_tokens(job.key, tokens)
        if self.management is not None:
            self.management.observe(tokens)
        hint = self._hint_due(job.key)
        if not (self._strategy_active or hint) or not tokens:
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
                lookup = await self._manage_call(lambda: self.lmcache.lookup(tokens, deadline=deadline), deadline)
            except KVCacheError as exc:
                self.events.warn("lookup_failed", "[kvcache] lookup failed: %s", exc)
                raise
            finally:
                self.metrics.lookup_latency.labels("background").observe(time.perf_counter() - t0)
                if hint:
                    self.metrics.hint_lookups.labels("error" if lookup is None else "ok").inc()
            if hint:
                self._add_hints(job.cluster, tokens, lookup)
        if not self._strategy_active:
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

    def _hint_due(self, key: str) -> bool:
        """``index_source: both``: fetch the controller's holders for ``key`` at most once per hint_ttl / 2."""
        if self.event_index is None or self.cfg.index_source != "both":
            return False
        last = self._hinted.get(key)
        return last is None or self._clock() - last >= self.cfg.kv_events.hint_ttl / 2

    def _add_hints(self, cluster_name: str, tokens: list[int], lookup: LookupResult) -> None:
        """Holders the controller reports (LMCache CPU tier) join the event index as aging hints."""
        assert self.event_index is not None
        cluster = self.runtime.clusters.get(cluster_name) if cluster_name else None
        for instance, n in lookup.matches.items():
            if cluster is not None and cluster.get(instance) is None:
                continue  # not an engine of this route: it could never be chosen
            if n > 0:
                self.event_index.add_hint(instance, tokens[:n], LMCACHE_CHUNK_TOKENS)

    async def _tokenize(self, job: Job, deadline: float) -> list[int]:
        if self.local_tokenizer is not None:
            local = await self._tokenize_local(self.local_tokenizer, job.request, job.key)
            if local is not None:
                return local
        t0 = time.perf_counter()
        body = job.request.tokenize_request()
        try:
            fallbacks = self._fallbacks(job.cluster)
            tokens = await self.breakers["tokenize"].call(
                lambda: self.tokenizer.tokenize(body, deadline=deadline, fallbacks=fallbacks), deadline=deadline
            )
        except KVCacheError as exc:
            self.metrics.tokenize_calls.labels("error").inc()
            self.events.warn(
                "tokenize_failed",
                "[kvcache] tokenize failed: %s (key=%s, prompt_chars=%d)",
                exc,
                job.key[:12],
                len(job.request.prompt),
            )
            raise
        finally:
            self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        self.metrics.tokenize_calls.labels("ok").inc()
        return tokens

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


def _predicted(choice: PrefixChoice | None) -> str:
    """The decision header's predicted matched tokens: for the chosen instance and for the best one."""
    if choice is None or choice.endpoint_id is None:
        return ""
    return f";matched={choice.matched_tokens};best={choice.best_tokens}"
