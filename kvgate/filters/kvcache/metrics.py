"""Prometheus metrics of the kvcache filter, registered on the gateway's own registry.

All names start with ``kvgate_kvcache_`` (counters get ``_total`` appended by the client library).
One :class:`KVCacheMetrics` per registry: a second filter instance on the same gateway reuses it. What the request
path updates for every request (token-cache hits and misses, routing outcomes, the added latency, match sizes)
goes through :mod:`kvgate.tally` cells of the gateway's tally, as the proxy filter's metrics do.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvgate.metrics import Family
from kvgate.tally import CountCell, Tally

PREFIX = "kvgate_kvcache_"
LOOKUP_OUTCOMES = (
    "routed",
    "no_tokens",
    "empty",
    "no_match",
    "error",
    "bad_response",
    "pool_wait",
    "breaker_open",
    "timeout",
    "disabled",
)
TOKEN_BUCKETS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, KVCacheMetrics] = weakref.WeakKeyDictionary()


class KVCacheMetrics:
    def __init__(self, registry: CollectorRegistry, tally: Tally | None = None):
        r = registry
        self.tally = tally if tally is not None else Tally(r)  # (a registry of its own: a tally of its own)
        p = PREFIX
        self.token_cache_hits = Counter(p + "token_cache_hits", "Token-cache hits (routing path)", registry=r)
        self.token_cache_misses = Counter(p + "token_cache_misses", "Token-cache misses (routing path)", registry=r)
        self.token_cache_size = Gauge(p + "token_cache_size", "Entries in the token cache", registry=r)
        self.lookup_latency = Histogram(
            p + "lookup_latency_seconds",
            "LMCache /lookup latency by phase",
            ["phase"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.routing_lookups = Family(  # counted per request: .count(outcome).n += 1
            Counter(
                p + "routing_lookups",
                "Synchronous routing decisions by outcome: " + ", ".join(LOOKUP_OUTCOMES),
                ["outcome"],
                registry=r,
            ),
            self.tally,
        )
        self.routing_rejected = Counter(
            p + "routing_candidates_rejected",
            "Lookup instances not eligible for routing: unknown_instance, unhealthy, below_min_match",
            ["reason"],
            registry=r,
        )
        self.routing_added_latency = Histogram(
            p + "routing_added_latency_seconds",
            "Time the decode step added to a request",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.tokenize_latency = Histogram(
            p + "tokenize_latency_seconds", "vLLM /tokenize latency", buckets=FAST_BUCKETS, registry=r
        )
        self.tokenize_calls = Counter(
            p + "tokenize_calls", "vLLM /tokenize calls by result (ok, error)", ["result"], registry=r
        )
        self.actions = Counter(
            p + "actions",
            "Cache actions by type and result (ok, error, timeout, breaker_open, unsupported, no_target)",
            ["action", "result"],
            registry=r,
        )
        self.action_supported = Gauge(
            p + "action_supported",
            "0 once the controller answered 404/405 for the action's route",
            ["action"],
            registry=r,
        )
        self.action_unsupported = Counter(
            p + "action_unsupported",
            "404/405 answers from an action's route (the first disables it; each re-probe that fails counts too)",
            ["action"],
            registry=r,
        )
        self.breaker_state = Gauge(
            p + "breaker_state", "Circuit breaker state (0 closed, 1 open, 2 half-open)", ["breaker"], registry=r
        )
        self.hot_keys = Gauge(p + "hot_keys", "Keys in the hot map (kept only when pinning is on)", registry=r)
        self.hot_bytes = Gauge(p + "hot_bytes", "Estimated bytes held by the hot map", registry=r)
        self.background_queue_depth = Gauge(p + "background_queue_depth", "Background jobs waiting", registry=r)
        self.background_running = Gauge(p + "background_running", "Background jobs executing", registry=r)
        self.background_jobs = Counter(
            p + "background_jobs",
            "Background jobs by result (done, error, timeout, expired, coalesced, dropped)",
            ["result"],
            registry=r,
        )
        self.background_dropped = Counter(p + "background_dropped", "Background jobs dropped (queue full)", registry=r)
        self.cold_placements = Counter(
            p + "cold_placements",
            "Requests without a usable cached prefix placed by cold_placement=lru",
            ["endpoint"],
            registry=r,
        )
        self.bad_responses = Counter(
            p + "bad_responses",
            "Upstream answers refused as malformed (bad JSON, NaN/Infinity, wrong shape) by call",
            ["call"],
            registry=r,
        )
        self.tokenize_fallbacks = Counter(
            p + "tokenize_fallbacks",
            "Tokenizations served by another engine of the route's cluster because vllm_endpoint failed",
            registry=r,
        )
        self.log_suppressed = Counter(
            p + "log_suppressed",
            "WARNING lines suppressed by the once-per-interval rate limit, by event",
            ["event"],
            registry=r,
        )
        # --- local routing (issue 9) ---
        self.predicted_matched_tokens = Histogram(
            p + "predicted_matched_tokens",
            "Predicted cached-prefix tokens of a routed request: for the chosen instance and for the best one",
            ["instance"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.local_tokenize_latency = Histogram(
            p + "local_tokenize_latency_seconds", "In-process tokenization latency", buckets=FAST_BUCKETS, registry=r
        )
        self.local_tokenize = Counter(
            p + "local_tokenize",
            "In-process tokenizations by result (ok; fallback = raised, the remote /tokenize path is used; "
            "unheld = a chat's first blocks are held by nobody, so its first pieces sufficed: routed as empty)",
            ["result"],
            registry=r,
        )
        self.index_blocks = Gauge(p + "index_blocks", "Distinct blocks in the event index", registry=r)
        self.index_entries = Gauge(
            p + "index_entries", "Event-index entries (instance x block) by medium", ["medium"], registry=r
        )
        self.index_match_latency = Histogram(
            p + "index_match_latency_seconds", "Event-index match latency", buckets=FAST_BUCKETS, registry=r
        )
        self.event_lag = Gauge(
            p + "kv_event_lag_seconds",
            "Wall-clock now minus the timestamp of the instance's last KV event batch (grows while it is idle)",
            ["instance"],
            registry=r,
        )
        self.kv_events = Counter(
            p + "kv_events",
            "KV-event subscriber and index counters by kind (batches, gaps, missed_batches, decode_errors, "
            "unknown_source, orphan_events, refused_blocks, aged_out, ...)",
            ["kind"],
            registry=r,
        )
        self.hint_lookups = Counter(
            p + "hint_lookups",
            "Background /lookup calls that add controller holders to the event index (index_source both), by result",
            ["result"],
            registry=r,
        )
        # --- cache management (issue 13) ---
        self.engine_scrapes = Counter(
            p + "engine_scrapes",
            "Scrapes of the engines' /metrics by instance and result (ok, timeout, connect, status, parse, "
            "too_large, lmcache_<reason>)",
            ["instance", "result"],
            registry=r,
        )
        self.engine_kv_usage = Gauge(
            p + "engine_kv_usage",
            "The instance's memory ratio (max of KV usage and LMCache CPU usage)",
            ["instance"],
            registry=r,
        )
        self.engine_load = Gauge(
            p + "engine_load", "The instance's load ratio (1 while requests wait)", ["instance"], registry=r
        )
        self.engine_signal_age = Gauge(
            p + "engine_signal_age_seconds", "Age of the instance's last good metrics scrape", ["instance"], registry=r
        )
        self.management_decisions = Counter(
            p + "management_decisions",
            "Per-instance management decisions and skips by action (pin, unpin, lapse, compress, evict, "
            "skip_<action>) and reason",
            ["action", "reason"],
            registry=r,
        )
        self.pinned_chunks = Gauge(
            p + "pinned_chunks", "LMCache chunks the gateway holds pinned, by instance", ["instance"], registry=r
        )
        self.hot_prefixes = Gauge(p + "hot_prefixes", "Prefix keys tracked for hotness", registry=r)
        self.replications = Counter(
            p + "replications",
            "Hot-prefix replication by result (planned, ok, error, and the planner's refusals: rate_limited, "
            "pending, max_replicas, no_candidate)",
            ["result"],
            registry=r,
        )
        self.replicas = Gauge(p + "replicas", "Replica holders the gateway created and still records", registry=r)
        self.errors = Counter(p + "decode_errors", "Unexpected errors swallowed on the decode path", registry=r)
        for outcome in LOOKUP_OUTCOMES:
            self.routing_lookups.labels(outcome)
        # the request path's cells
        t = self.tally
        self.hits: CountCell = t.counter(self.token_cache_hits)
        self.misses: CountCell = t.counter(self.token_cache_misses)
        self.added_latency = t.histogram(self.routing_added_latency)
        self.match_latency = t.histogram(self.index_match_latency)
        self.routing_lookup_latency = t.histogram(self.lookup_latency.labels("routing"))
        self.predicted_chosen = t.histogram(self.predicted_matched_tokens.labels("chosen"))
        self.predicted_best = t.histogram(self.predicted_matched_tokens.labels("best"))
        for action in ("compress", "pin", "evict"):
            self.action_supported.labels(action).set(1)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry, tally: Tally | None = None) -> KVCacheMetrics:
        """The registry's metrics (made on first use; ``tally``: the registry's, flushed before it is collected)."""
        existing = _BY_REGISTRY.get(registry)
        if existing is None:
            existing = cls(registry, tally)
            _BY_REGISTRY[registry] = existing
        return existing
