"""Configuration of engine-aware cache management (issue 13): ``engine_metrics`` and ``replication``.

The seed's ``cache_strategy`` section (:mod:`.config`) gains ``signals`` (``process`` = Pixiu: the gateway
process's CPU and RSS; ``engine`` = each instance's own vLLM / LMCache metrics), ``pin_ttl``,
``max_pinned_share``, ``interval`` and ``hot_prefix_tokens``. The sections here say where the engines'
metrics are and how hot prefixes are replicated. See docs/kvcache-filter.md, "Cache management".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kvgate.config import Duration
from kvgate.errors import ConfigError

SIGNAL_SOURCES = ("process", "engine")
DEFAULT_PIN_TTL = 300.0  # LMCache 0.5.6's pin_timeout_sec
DEFAULT_MAX_PINNED_SHARE = 0.2  # vLLM's pinned-prefix work caps the pinned share at 0.2
DEFAULT_MANAGE_INTERVAL = 1.0
DEFAULT_HOT_PREFIX_TOKENS = 256  # one LMCache chunk


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_default=True)


class EngineTargetConfig(_Section):
    """Per-instance overrides of ``engine_metrics`` (``instance`` = the cluster endpoint id)."""

    instance: str = ""
    metrics_url: str = ""  # default: <endpoint base URL>/metrics
    lmcache_metrics_url: str = ""
    lmcache_capacity_chunks: int = 0
    lmcache_capacity_bytes: int = 0
    max_num_seqs: int = 0


class EngineMetricsConfig(_Section):
    """``engine_metrics``: the background scrape of every engine's ``/metrics`` (engine signals, replication)."""

    interval: Duration = 1.0
    timeout: Duration = 0.5
    max_age: Duration = 0.0  # 0 = 3 × interval
    lmcache_capacity_chunks: int = 0  # default capacity (256-token chunks) per instance; 0 = unknown: no pins
    lmcache_capacity_bytes: int = 0  # LMCache max_local_cpu_size in bytes; 0 = unknown: no CPU-tier ratio
    max_num_seqs: int = 0  # the engines' --max-num-seqs; 0 = unknown: load is 1 while requests wait, else 0
    endpoints: list[EngineTargetConfig] = Field(default_factory=list)

    def effective_max_age(self) -> float:
        return self.max_age if self.max_age > 0 else 3 * self.interval


class ReplicationConfig(_Section):
    """``replication``: warm a second holder of a hot prefix whose holders are all overloaded."""

    enabled: bool = False
    max_replicas: int = 3
    rate: float = 2.0  # warm-ups per second
    burst: int = 4
    replica_ttl: Duration = 120.0
    max_imbalance_abs: int = 2
    max_imbalance_rel: float = 1.5
    timeout: Duration = 30.0  # one warm-up request
    max_keys: int = 1024


def validate_management(
    signals: str,
    pin_ttl: float,
    max_pinned_share: float,
    interval: float,
    hot_prefix_tokens: int,
    em: EngineMetricsConfig,
    rep: ReplicationConfig,
) -> None:
    """Checks of the management keys, first failure wins, each naming its key path."""
    if signals not in SIGNAL_SOURCES:
        raise ConfigError("cache_strategy.signals", "[kvcache] cache_strategy.signals must be 'process' or 'engine'")
    if pin_ttl <= 0:
        raise ConfigError("cache_strategy.pin_ttl", "[kvcache] cache_strategy.pin_ttl must be > 0")
    if not 0 <= max_pinned_share <= 1:
        raise ConfigError(
            "cache_strategy.max_pinned_share", "[kvcache] cache_strategy.max_pinned_share must be between 0 and 1"
        )
    if interval <= 0:
        raise ConfigError("cache_strategy.interval", "[kvcache] cache_strategy.interval must be > 0")
    if hot_prefix_tokens < 1:
        raise ConfigError("cache_strategy.hot_prefix_tokens", "[kvcache] cache_strategy.hot_prefix_tokens must be >= 1")
    for key in ("interval", "timeout"):
        if getattr(em, key) <= 0:
            raise ConfigError(f"engine_metrics.{key}", f"[kvcache] engine_metrics.{key} must be > 0")
    if em.max_age < 0:
        raise ConfigError("engine_metrics.max_age", "[kvcache] engine_metrics.max_age must be >= 0")
    _non_negative("engine_metrics", em, ("lmcache_capacity_chunks", "lmcache_capacity_bytes", "max_num_seqs"))
    seen: set[str] = set()
    for i, t in enumerate(em.endpoints):
        path = f"engine_metrics.endpoints[{i}]"
        if not t.instance:
            raise ConfigError(f"{path}.instance", f"[kvcache] {path}.instance is required")
        if t.instance in seen:
            raise ConfigError(f"{path}.instance", f"[kvcache] {path}.instance {t.instance!r} is repeated")
        seen.add(t.instance)
        for key in ("metrics_url", "lmcache_metrics_url"):
            url = getattr(t, key)
            if url and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{path}.{key}", f"[kvcache] {path}.{key} must be an http(s) URL")
        _non_negative(path, t, ("lmcache_capacity_chunks", "lmcache_capacity_bytes", "max_num_seqs"))
    if rep.max_replicas < 0:
        raise ConfigError("replication.max_replicas", "[kvcache] replication.max_replicas must be >= 0")
    for key in ("rate", "replica_ttl", "timeout"):
        if getattr(rep, key) <= 0:
            raise ConfigError(f"replication.{key}", f"[kvcache] replication.{key} must be > 0")
    for key in ("burst", "max_keys"):
        if getattr(rep, key) < 1:
            raise ConfigError(f"replication.{key}", f"[kvcache] replication.{key} must be >= 1")
    if rep.max_imbalance_abs < 0:
        raise ConfigError("replication.max_imbalance_abs", "[kvcache] replication.max_imbalance_abs must be >= 0")
    if rep.max_imbalance_rel < 1:
        raise ConfigError("replication.max_imbalance_rel", "[kvcache] replication.max_imbalance_rel must be >= 1")


def _non_negative(path: str, section: BaseModel, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(section, key) < 0:
            raise ConfigError(f"{path}.{key}", f"[kvcache] {path}.{key} must be >= 0")
