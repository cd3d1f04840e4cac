"""Configuration of ``dgp.filter.ai.kvcache``: Pixiu's keys, defaults and validation order.

Pixiu runs ``ApplyDefaults`` first and ``Validate`` second; validation only runs when ``enabled``
is true and reports the *first* failing check with an exact ``[kvcache] ...`` message. We do the
same in one ``model_validator`` so the error names the key (``ConfigError(path, message)``).
Unknown keys are accepted (Pixiu ignores them) and logged by the filter factory.

Keys we add (not in Pixiu): ``max_background_tasks``, ``background_queue_size``,
``min_match_tokens``, ``tokenize_on_miss``, ``max_imbalance_abs``, ``max_imbalance_rel``,
``cold_placement``, ``min_match_ratio``, ``hot_max_bytes``, ``retry.jitter``, and local routing (issue 9):
``local_tokenizer``, ``index_source`` and ``kv_events`` (see docs/kvcache-filter.md), and cache management
(issue 13): ``cache_strategy.{signals, pin_ttl, max_pinned_share, interval, hot_prefix_tokens}``,
``engine_metrics`` and ``replication`` (:mod:`.management_config`). ``hot_max_keys: 0`` means
``DEFAULT_HOT_MAX_KEYS`` here (Pixiu: unlimited), see :meth:`KVCacheConfig.hot_key_cap`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvgate.config import Duration
from kvgate.errors import ConfigError
from kvgate.filters.kvcache.management_config import (
    DEFAULT_HOT_PREFIX_TOKENS,
    DEFAULT_MANAGE_INTERVAL,
    DEFAULT_MAX_PINNED_SHARE,
    DEFAULT_PIN_TTL,
    EngineMetricsConfig,
    ReplicationConfig,
    validate_management,
)

DEFAULT_REQUEST_TIMEOUT = 2.0
DEFAULT_LOOKUP_ROUTING_TIMEOUT = 0.05
DEFAULT_HOT_WINDOW = 300.0
DEFAULT_HOT_MAX_RECORDS = 300
DEFAULT_COMPRESS_METHOD = "zstd"
DEFAULT_RETRY_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BASE_BACKOFF = 0.1
DEFAULT_RETRY_MAX_BACKOFF = 2.0
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RECOVERY_TIMEOUT = 10.0
DEFAULT_HALF_OPEN_MAX_CALLS = 2
DEFAULT_MAX_BACKGROUND_TASKS = 8
DEFAULT_BACKGROUND_QUEUE_SIZE = 1024
DEFAULT_HOT_MAX_KEYS = 10_000  # used when hot_max_keys is 0 (Pixiu: unlimited)
DEFAULT_HOT_MAX_BYTES = 16 * 1024 * 1024  # estimated bytes of the hot map (about 16k single-request keys)


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_default=True)


class TokenCacheConfig(_Section):
    """``token_cache``: routing only happens when it is enabled (Pixiu rule)."""

    enabled: bool = False
    max_size: int = 0  # 0 = unbounded
    ttl: Duration = 0.0  # 0 = no expiry


class CacheStrategyConfig(_Section):
    """``cache_strategy``: which management actions run and where they are sent."""

    enable_compression: bool = False
    enable_pinning: bool = False
    enable_eviction: bool = False
    load_threshold: float = 0.0  # 0 disables compress
    memory_threshold: float = 0.0  # 0 disables evict
    hot_content_threshold: int = 0  # 0 disables pin
    pin_instance_id: str = ""
    pin_location: str = ""
    compress_instance_id: str = ""
    compress_location: str = ""
    compress_method: str = ""
    evict_instance_id: str = ""
    # --- kvgate additions (issue 13, docs/kvcache-filter.md "Cache management") ---
    signals: str = "process"  # process (Pixiu: this gateway's CPU/RSS) | engine (each instance's metrics)
    pin_ttl: Duration = DEFAULT_PIN_TTL
    max_pinned_share: float = DEFAULT_MAX_PINNED_SHARE
    interval: Duration = DEFAULT_MANAGE_INTERVAL  # the management loop's period (signals: engine)
    hot_prefix_tokens: int = DEFAULT_HOT_PREFIX_TOKENS  # hotness is counted per prefix of this many tokens

    @model_validator(mode="after")
    def _default_method(self) -> CacheStrategyConfig:
        if not self.compress_method:
            self.compress_method = DEFAULT_COMPRESS_METHOD
        return self


class RetryConfig(_Section):
    """``retry`` for LMCache controller calls (not ``/tokenize``)."""

    max_attempts: int = 0
    base_backoff: Duration = 0.0
    max_backoff: Duration = 0.0
    jitter: bool = False  # ours: add up to 50 % random jitter to each backoff


class CircuitBreakerConfig(_Section):
    """``circuit_breaker``: one config, three independent breakers (tokenize, lookup, manage)."""

    failure_threshold: int = 0
    recovery_timeout: Duration = 0.0
    half_open_max_calls: int = 0


INDEX_SOURCES = ("lookup", "events", "both")
DEFAULT_CPU_TTL = 120.0  # age limit of CPU-tier entries learned from KV events (LMCache emits no CPU removals)
DEFAULT_HINT_TTL = 30.0  # age limit of holders learned from the controller's /lookup (index_source: both)
DEFAULT_REPLAY_TIMEOUT = 0.5
DEFAULT_MAX_BLOCKS = 500_000
_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


class LocalTokenizerConfig(_Section):
    """``local_tokenizer``: tokenize in-process from a model/tokenizer directory (``tokenizer.json`` + template)."""

    path: str = ""
    # a fast engine where it gives the same ids: fastokens (``kvgate[fast]``; kept if its self-check against
    # tokenizers agrees), else tiktoken (proven equivalent at load); false: tokenizers only
    fast: bool = True
    thread_threshold: int = 4096  # texts longer than this (characters) are encoded on a worker thread


class KVEventSourceConfig(_Section):
    """One engine's KV-event stream: ``topic`` (bind mode) or ``endpoint`` (connect mode)."""

    instance: str = ""
    topic: str = ""
    endpoint: str | None = None
    replay_endpoint: str | None = None


class KVEventsConfig(_Section):
    """``kv_events``: where vLLM's KV-cache events come from (``index_source: events | both``)."""

    bind: str | None = None
    sources: list[KVEventSourceConfig] = Field(default_factory=list)
    replay_timeout: Duration = DEFAULT_REPLAY_TIMEOUT
    max_blocks: int = DEFAULT_MAX_BLOCKS
    # Age limit of non-GPU entries (LMCache's CPU tier sends stores but no removals); 0 = never aged out.
    cpu_ttl: Duration = DEFAULT_CPU_TTL
    # index_source "both": holders confirmed by the controller's /lookup are kept this long after the last
    # confirmation.
    hint_ttl: Duration = DEFAULT_HINT_TTL
    # Holders whose match is within this many tokens of the longest are chosen by load; 0 = one block
    # (the index's smallest block size).
    spread_tokens: int = 0


class KVCacheConfig(_Section):
    """The whole ``config`` map of ``dgp.filter.ai.kvcache`` (snake_case keys as in Pixiu)."""

    enabled: bool = False
    vllm_endpoint: str = ""
    lmcache_endpoint: str = ""
    default_model: str = ""
    request_timeout: Duration = 0.0
    lookup_routing_timeout: Duration = 0.0
    hot_window: Duration = 0.0
    hot_max_records: int = 0
    hot_max_keys: int = 0
    # The filter's own connection pool (kvgate/filters/kvcache/pool.py); 0 = no limit / no cap.
    max_idle_conns: int = 0
    max_idle_conns_per_host: int = 0
    max_conns_per_host: int = 0
    token_cache: TokenCacheConfig = Field(default_factory=TokenCacheConfig)
    cache_strategy: CacheStrategyConfig = Field(default_factory=CacheStrategyConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    # --- kvgate additions ---
    max_background_tasks: int = DEFAULT_MAX_BACKGROUND_TASKS
    background_queue_size: int = DEFAULT_BACKGROUND_QUEUE_SIZE
    min_match_tokens: int = 0  # 0 = any positive match routes
    # False = Pixiu/seed: tokens come from the token cache only, so a prompt's first request is never
    # routed. True = on a miss, call /tokenize synchronously inside the same routing cap, then look up.
    tokenize_on_miss: bool = False
    # Load guard (0 = off, Pixiu behaviour): drop the cache hint when the holder has at least this many
    # more in-flight requests than the least-loaded endpoint AND more than max_imbalance_rel times as many.
    max_imbalance_abs: int = 0
    max_imbalance_rel: float = 1.5
    # Requests with no usable cached prefix: "lb" = leave the choice to the proxy's load balancer
    # (Pixiu); "lru" = least in-flight, then least recently given a cold request (spreads new sessions).
    cold_placement: str = "lb"
    # Route only when the match covers at least this fraction of the prompt (0 = off, Pixiu).
    min_match_ratio: float = 0.0
    # Byte budget of the hot map (estimated; 0 = none). The map is only kept when pinning is on.
    hot_max_bytes: int = DEFAULT_HOT_MAX_BYTES
    # --- local routing (issue 9) ---
    local_tokenizer: LocalTokenizerConfig | None = None  # absent = remote /tokenize (seed)
    index_source: str = "lookup"  # lookup (seed) | events | both
    kv_events: KVEventsConfig = Field(default_factory=KVEventsConfig)
    # --- cache management (issue 13) ---
    engine_metrics: EngineMetricsConfig = Field(default_factory=EngineMetricsConfig)
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)

    @model_validator(mode="after")
    def _apply(self) -> KVCacheConfig:
        self.apply_defaults()
        if self.enabled:
            self.validate_enabled()
        return self

    def apply_defaults(self) -> None:
        """Pixiu's ``ApplyDefaults`` (runs whether or not the filter is enabled)."""
        self.vllm_endpoint = self.vllm_endpoint.strip().rstrip("/")
        self.lmcache_endpoint = self.lmcache_endpoint.strip().rstrip("/")
        if self.request_timeout <= 0:
            self.request_timeout = DEFAULT_REQUEST_TIMEOUT
        if self.lookup_routing_timeout <= 0:
            self.lookup_routing_timeout = DEFAULT_LOOKUP_ROUTING_TIMEOUT
        if self.hot_window <= 0:
            self.hot_window = DEFAULT_HOT_WINDOW
        if self.hot_max_records <= 0:
            self.hot_max_records = DEFAULT_HOT_MAX_RECORDS
        if self.hot_max_keys < 0:
            self.hot_max_keys = 0
        if not self.cache_strategy.compress_method:
            self.cache_strategy.compress_method = DEFAULT_COMPRESS_METHOD
        r = self.retry
        if r.max_attempts <= 0:
            r.max_attempts = DEFAULT_RETRY_MAX_ATTEMPTS
        if r.base_backoff <= 0:
            r.base_backoff = DEFAULT_RETRY_BASE_BACKOFF
        if r.max_backoff <= 0:
            r.max_backoff = DEFAULT_RETRY_MAX_BACKOFF
        cb = self.circuit_breaker
        if cb.failure_threshold <= 0:
            cb.failure_threshold = DEFAULT_FAILURE_THRESHOLD
        if cb.recovery_timeout <= 0:
            cb.recovery_timeout = DEFAULT_RECOVERY_TIMEOUT
        if cb.half_open_max_calls <= 0:
            cb.half_open_max_calls = DEFAULT_HALF_OPEN_MAX_CALLS

    def validate_enabled(self) -> None:
        """Pixiu's ``Validate``: first failing check wins, exact messages; then our own keys."""
        if not self.vllm_endpoint:
            raise ConfigError("vllm_endpoint", "[kvcache] vllm_endpoint is required when enabled")
        if not self.lmcache_endpoint:
            raise ConfigError("lmcache_endpoint", "[kvcache] lmcache_endpoint is required when enabled")
        if self.token_cache.max_size < 0:
            raise ConfigError("token_cache.max_size", "[kvcache] token_cache.max_size must be >= 0")
        cs = self.cache_strategy
        if not 0 <= cs.memory_threshold <= 1:
            raise ConfigError(
                "cache_strategy.memory_threshold", "[kvcache] cache_strategy.memory_threshold must be between 0 and 1"
            )
        if not 0 <= cs.load_threshold <= 1:
            raise ConfigError(
                "cache_strategy.load_threshold", "[kvcache] cache_strategy.load_threshold must be between 0 and 1"
            )
        if cs.hot_content_threshold < 0:
            raise ConfigError(
                "cache_strategy.hot_content_threshold", "[kvcache] cache_strategy.hot_content_threshold must be >= 0"
            )
        # Checks 7-9 cannot fail after apply_defaults (kept for fidelity).
        if self.retry.max_attempts < 0:
            raise ConfigError("retry.max_attempts", "[kvcache] retry.max_attempts must be >= 0")
        if self.retry.base_backoff < 0 or self.retry.max_backoff < 0:
            raise ConfigError("retry", "[kvcache] retry backoff durations must be >= 0")
        for key in ("hot_window", "hot_max_records", "hot_max_keys", "hot_max_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"[kvcache] {key} must be >= 0")
        # kvgate's own keys.
        if self.token_cache.ttl < 0:
            raise ConfigError("token_cache.ttl", "[kvcache] token_cache.ttl must be >= 0")
        if self.max_background_tasks < 1:
            raise ConfigError("max_background_tasks", "[kvcache] max_background_tasks must be >= 1")
        if self.background_queue_size < 1:
            raise ConfigError("background_queue_size", "[kvcache] background_queue_size must be >= 1")
        for key in ("max_conns_per_host", "max_idle_conns", "max_idle_conns_per_host"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"[kvcache] {key} must be >= 0")
        if self.min_match_tokens < 0:
            raise ConfigError("min_match_tokens", "[kvcache] min_match_tokens must be >= 0")
        if not 0 <= self.min_match_ratio <= 1:
            raise ConfigError("min_match_ratio", "[kvcache] min_match_ratio must be between 0 and 1")
        if self.cold_placement not in ("lb", "lru"):
            raise ConfigError("cold_placement", "[kvcache] cold_placement must be 'lb' or 'lru'")
        if self.max_imbalance_abs < 0:
            raise ConfigError("max_imbalance_abs", "[kvcache] max_imbalance_abs must be >= 0")
        if self.max_imbalance_rel < 1:
            raise ConfigError("max_imbalance_rel", "[kvcache] max_imbalance_rel must be >= 1")
        self._validate_local_routing()
        validate_management(
            cs.signals,
            cs.pin_ttl,
            cs.max_pinned_share,
            cs.interval,
            cs.hot_prefix_tokens,
            self.engine_metrics,
            self.replication,
        )

    def _validate_local_routing(self) -> None:
        lt = self.local_tokenizer
        if lt is not None:
            if not lt.path.strip():
                raise ConfigError("local_tokenizer.path", "[kvcache] local_tokenizer.path is required")
            if lt.thread_threshold < 0:
                raise ConfigError(
                    "local_tokenizer.thread_threshold", "[kvcache] local_tokenizer.thread_threshold must be >= 0"
                )
        if self.index_source not in INDEX_SOURCES:
            raise ConfigError("index_source", "[kvcache] index_source must be 'lookup', 'events' or 'both'")
        if self.index_source == "lookup":
            return
        ev = self.kv_events
        if not ev.sources:
            raise ConfigError(
                "kv_events.sources", f"[kvcache] kv_events.sources is required with index_source: {self.index_source}"
            )
        if ev.bind is not None and not ev.bind.startswith(_ZMQ_SCHEMES):
            raise ConfigError("kv_events.bind", "[kvcache] kv_events.bind must be a ZMQ endpoint (tcp://host:port)")
        for key in ("replay_timeout", "cpu_ttl", "hint_ttl"):
            if getattr(ev, key) < 0:
                raise ConfigError(f"kv_events.{key}", f"[kvcache] kv_events.{key} must be >= 0")
        if ev.replay_timeout == 0:
            ev.replay_timeout = DEFAULT_REPLAY_TIMEOUT
        if ev.max_blocks < 1:
            raise ConfigError("kv_events.max_blocks", "[kvcache] kv_events.max_blocks must be >= 1")
        if ev.spread_tokens < 0:
            raise ConfigError("kv_events.spread_tokens", "[kvcache] kv_events.spread_tokens must be >= 0")
        instances: set[str] = set()
        topics: set[str] = set()
        for i, src in enumerate(ev.sources):
            path = f"kv_events.sources[{i}]"
            if not src.instance:
                raise ConfigError(f"{path}.instance", f"[kvcache] {path}.instance is required")
            if src.instance in instances:
                raise ConfigError(f"{path}.instance", f"[kvcache] {path}.instance {src.instance!r} is repeated")
            instances.add(src.instance)
            for key in ("endpoint", "replay_endpoint"):
                value = getattr(src, key)
                if value is not None and not value.startswith(_ZMQ_SCHEMES):
                    raise ConfigError(
                        f"{path}.{key}", f"[kvcache] {path}.{key} must be a ZMQ endpoint (tcp://host:port)"
                    )
            if src.endpoint is None:  # bind mode: the engine connects to kv_events.bind, named by its topic
                if ev.bind is None:
                    raise ConfigError(
                        f"{path}.endpoint",
                        f"[kvcache] {path} needs an endpoint (engine binds) or kv_events.bind (engines connect)",
                    )
                if not src.topic:
                    raise ConfigError(
                        f"{path}.topic", f"[kvcache] {path}.topic is required in bind mode (one topic per engine)"
                    )
                if src.topic in topics:
                    raise ConfigError(f"{path}.topic", f"[kvcache] {path}.topic {src.topic!r} is repeated")
                topics.add(src.topic)

    def hot_key_cap(self) -> int:
        """The hot map's key cap: ``hot_max_keys``, or ``DEFAULT_HOT_MAX_KEYS`` when it is 0 (never unbounded)."""
        return self.hot_max_keys if self.hot_max_keys > 0 else DEFAULT_HOT_MAX_KEYS

    @property
    def pin_active(self) -> bool:
        """Pinning can fire, so request hotness must be recorded."""
        cs = self.cache_strategy
        return cs.enable_pinning and cs.hot_content_threshold > 0

    @property
    def engine_managed(self) -> bool:
        """Management decides per instance from engine signals (``cache_strategy.signals: engine``)."""
        return self.cache_strategy.signals == "engine"

    @property
    def needs_engine_metrics(self) -> bool:
        return self.enabled and (self.engine_managed or self.replication.enabled)

    def effective_timeout(self, hcm_timeout: float) -> float:
        """Pixiu's ``effectiveTimeout``: request_timeout, lowered to the HCM timeout if smaller; <= 0 → 2s."""
        t = self.request_timeout
        if 0 < hcm_timeout < t:
            t = hcm_timeout
        return t if t > 0 else DEFAULT_REQUEST_TIMEOUT

    def routing_timeout(self, hcm_timeout: float) -> float:
        """The hard cap on the synchronous routing lookup."""
        return min(self.effective_timeout(hcm_timeout), self.lookup_routing_timeout)
