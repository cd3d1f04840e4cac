"""The routing modes a benchmark compares, and the simulated fleet they run on (TEST AND BENCHMARK TOOL).

Every mode is defined here, once, for both runners:

* the **real-time** runner (:mod:`kvgate_bench.realtime`) turns a gateway mode into a kvgate config with
  :func:`gateway_config` (or starts the external peer router of a peer mode, :mod:`kvgate_bench.peers`);
* the **virtual-time** runner (:mod:`kvgate_bench.virtual`) replays the same decision with the same code:
  the balancer of :func:`kvgate.routing.balancers.make_balancer`, and for kvcache modes the controller
  index lookup + :func:`kvgate.routing.prefix.choose_prefix_endpoint`.

Modes:

``round_robin``
    proxy ``RoundRobin``, no kvcache filter (Pixiu's default).
``least_request``
    proxy ``least_request`` (fewest in-flight requests), no kvcache filter.
``kvcache-seed``
    the seed's filter behaviour: kvcache filter with its token cache, ``tokenize_on_miss: false`` (a prompt
    is routed only when an identical prompt was seen before, because tokens come from the token cache
    only), ``RoundRobin`` otherwise.
``kvcache``
    ours, the recommended settings (what ``kvgate sim`` writes): local routing — in-process tokenization
    with the engines' tokenizer directory (``local_tokenizer``) and the prefix index fed by the engines'
    KV-cache events (``index_source: events``, ``kv_events`` bound by the gateway, one topic and replay
    endpoint per engine; the fleet is started with events on) — plus the routing keys of ``kvcache-lookup``.
``kvcache-lookup``
    the previous recommended settings, remote tokenization + LMCache ``/lookup``: ``tokenize_on_miss: true``
    (a token-cache miss tokenizes synchronously within the ``lookup_routing_timeout`` cap, then looks up),
    ``cold_placement: lru`` (a request with no usable cached prefix goes to the least-loaded,
    least-recently-cold endpoint, spreading new sessions), ``min_match_ratio: 0.5`` (route only when the
    cached prefix covers half the prompt, so a shared system prompt does not drag new conversations to the
    one instance LMCache credits for it), the load guard ``max_imbalance_abs: 8`` and ``least_request``.
``kvcache-managed``
    ``kvcache`` (the recommended local routing, same keys) plus cache management with engine signals (issue 13,
    docs/cache-management.md): ``cache_strategy`` with ``enable_pinning``, ``hot_content_threshold: 2`` counted
    per prefix (the first ``hot_prefix_tokens: 256`` tokens), ``signals: engine``, ``pin_ttl: 300s``,
    ``max_pinned_share: 0.2``, ``interval: 1s``; ``engine_metrics`` (scrape every 1s, 500ms timeout) with the
    simulated engines' LMCache capacity (chunks and bytes) and ``max_num_seqs`` from
    :meth:`kvgate_sim.fleet.Fleet.management_config`; ``replication: {enabled: true}`` (warm a second holder of
    a hot prefix whose holders are overloaded). Real and virtual time; not in the default mode list (select it
    with ``--modes``). On an external fleet (``--fleet real``) no capacity is known, so the gateway pins nothing
    there (``capacity_unknown``); replication still runs.
``vllm-router:cache_aware`` / ``vllm-router:round_robin``
    the external peer (PyPI ``vllm-router``), real time only, only when installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kvgate_bench import peers
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.merge import deep_merge

PrefixRouting = Literal["none", "seed", "always", "events"]

DEFAULT_MODEL = "qwen2.5-7b-instruct"

#: kvcache filter settings shared by both kvcache modes (merged over ``Fleet.gateway_config`` defaults).
KVCACHE_COMMON: dict[str, Any] = {
    "request_timeout": "2s",
    "lookup_routing_timeout": "100ms",
    "token_cache": {"enabled": True, "max_size": 8192, "ttl": "10m"},
    "max_background_tasks": 4,
}


#: kvgate's recommended kvcache settings beyond the seed (docs/kvcache-filter.md, "Recommended settings").
KVCACHE_RECOMMENDED: dict[str, Any] = {
    "tokenize_on_miss": True,  # route first requests (every new chat turn) too
    "cold_placement": "lru",  # spread prompts with no usable cached prefix
    "min_match_ratio": 0.5,  # a shared system prompt alone does not pull new conversations to one engine
    "max_imbalance_abs": 8,  # load guard: never pile a hot prefix onto an overloaded engine
    "max_imbalance_rel": 1.5,
}


#: cache management with engine signals and hot-prefix replication (docs/cache-management.md, issue 13); the
#: per-fleet ``engine_metrics`` capacities come from ``Fleet.management_config`` in :func:`gateway_config`.
KVCACHE_MANAGEMENT: dict[str, Any] = {
    "cache_strategy": {
        "enable_pinning": True,
        "hot_content_threshold": 2,  # requests sharing a prefix within hot_window
        "signals": "engine",  # per-instance engine /metrics, not the gateway process
        "pin_ttl": "300s",
        "max_pinned_share": 0.2,  # pinned chunks / instance LMCache capacity
        "interval": "1s",
        "hot_prefix_tokens": 256,
    },
    "engine_metrics": {"interval": "1s", "timeout": "500ms"},
    "replication": {"enabled": True},
}


@dataclass(frozen=True, slots=True)
class Mode:
    """One routing configuration under test.

    ``kind == "gateway"``: kvgate with cluster ``lb_policy`` and, if ``kvcache`` is not None, the kvcache
    filter with those overrides. ``kind == "peer"``: the external router ``peer`` with ``peer_policy``.
    ``balancer`` / ``prefix`` describe the same decision for the virtual-time runner (``prefix``:
    ``"none"`` never looks up, ``"seed"`` looks up only prompts seen before, ``"always"`` every prompt,
    ``"events"`` every prompt in the KV-event index). ``local``: the kvcache filter gets the fleet's
    local-routing keys (tokenizer directory, event index) and the fleet publishes KV events. ``managed``: cache
    management runs in the gateway (its fleet-specific ``engine_metrics`` come from the fleet); the virtual
    runner replays it with the same pure blocks (:mod:`kvgate_bench.virtual_manage`).
    """

    name: str
    kind: Literal["gateway", "peer"]
    description: str
    lb_policy: str = "RoundRobin"
    kvcache: Mapping[str, Any] | None = None
    balancer: str = "round_robin"
    prefix: PrefixRouting = "none"
    peer: str | None = None
    peer_policy: str | None = None
    local: bool = False
    managed: bool = False

    @property
    def virtual_supported(self) -> bool:
        """Whether the virtual-time runner can replay this mode (peers are real time only; cache management is
        replayed by :mod:`kvgate_bench.virtual_manage`)."""
        return self.kind == "gateway"


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "round_robin",
            "gateway",
            "kvgate proxy, RoundRobin, no kvcache filter",
            lb_policy="RoundRobin",
            balancer="round_robin",
        ),
        Mode(
            "least_request",
            "gateway",
            "kvgate proxy, least in-flight requests, no kvcache filter",
            lb_policy="least_request",
            balancer="least_request",
        ),
        Mode(
            "kvcache-seed",
            "gateway",
            "kvcache filter as in the seed/Pixiu: routes only prompts already in the token cache; RoundRobin",
            lb_policy="RoundRobin",
            kvcache={**KVCACHE_COMMON, "tokenize_on_miss": False},
            balancer="round_robin",
            prefix="seed",
        ),
        Mode(
            "kvcache",
            "gateway",
            "kvcache filter, recommended settings: local tokenizer + KV-event index (cold lru, min_match_ratio .5, "
            "load guard)",
            lb_policy="least_request",
            kvcache={**KVCACHE_COMMON, **KVCACHE_RECOMMENDED},
            balancer="least_request",
            prefix="events",
            local=True,
        ),
        Mode(
            "kvcache-lookup",
            "gateway",
            "kvcache filter, previous recommended settings: remote /tokenize (tokenize_on_miss) + LMCache /lookup "
            "(cold lru, min_match_ratio .5, load guard)",
            lb_policy="least_request",
            kvcache={**KVCACHE_COMMON, **KVCACHE_RECOMMENDED},
            balancer="least_request",
            prefix="always",
        ),
        Mode(
            "kvcache-managed",
            "gateway",
            "kvcache + cache management with engine signals: pin hot prefixes in LMCache (TTL, 0.2 capacity cap), "
            "replicate a hot prefix whose holders are overloaded",
            lb_policy="least_request",
            kvcache=deep_merge({**KVCACHE_COMMON, **KVCACHE_RECOMMENDED}, KVCACHE_MANAGEMENT),
            balancer="least_request",
            prefix="events",
            local=True,
            managed=True,
        ),
        Mode(
            "vllm-router:cache_aware",
            "peer",
            "external vllm-router (Rust), policy cache_aware (approximate prefix tree on request text)",
            peer="vllm-router",
            peer_policy="cache_aware",
        ),
        Mode(
            "vllm-router:round_robin",
            "peer",
            "external vllm-router (Rust), policy round_robin",
            peer="vllm-router",
            peer_policy="round_robin",
        ),
    )
}

GATEWAY_MODES: tuple[str, ...] = ("round_robin", "least_request", "kvcache-seed", "kvcache-lookup", "kvcache")
PEER_MODES: tuple[str, ...] = ("vllm-router:cache_aware", "vllm-router:round_robin")
DEFAULT_MODES: tuple[str, ...] = GATEWAY_MODES + PEER_MODES
#: cache-management modes, selected with ``--modes``
MANAGEMENT_MODES: tuple[str, ...] = ("kvcache-managed",)


def resolve_modes(names: Iterable[str]) -> list[Mode]:
    """Modes by name, in the order given (duplicates dropped); unknown names raise ``KeyError``."""
    out: list[Mode] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip()
        if not name or name in seen:
            continue
        try:
            out.append(MODES[name])
        except KeyError:
            raise KeyError(f"unknown mode {name!r}; choose from {', '.join(MODES)}") from None
        seen.add(name)
    return out


def local_routing_supported() -> bool:
    """True when the kvcache filter's config model knows ``index_source`` (local routing, issue 9)."""
    from kvgate.filters.kvcache.config import KVCacheConfig

    return "index_source" in KVCacheConfig.model_fields


def tokenize_on_miss_supported() -> bool:
    """True when the kvcache filter's config model knows ``tokenize_on_miss`` (else the key is ignored)."""
    from kvgate.filters.kvcache.config import KVCacheConfig

    return "tokenize_on_miss" in KVCacheConfig.model_fields


def peer_available(mode: Mode) -> tuple[bool, str]:
    """(available, reason) for a peer mode; gateway modes are always available."""
    if mode.kind != "peer":
        return True, ""
    if peers.find_peer(mode.peer or "") is None:
        return False, (
            f"{mode.name}: skipped — the optional peer {mode.peer!r} is not installed "
            f"(pip install {mode.peer} into this environment to include it)"
        )
    return True, ""


def gateway_config(mode: Mode, fleet: Any) -> dict[str, Any]:
    """The kvgate config dict (Pixiu shape) that runs ``mode`` in front of a started simulated ``fleet``.

    ``fleet`` is a :class:`kvgate_sim.fleet.Fleet`. Listener on 127.0.0.1 (the runner binds port 0).
    """
    if mode.kind != "gateway":
        raise ValueError(f"{mode.name} is not a gateway mode")
    kv: dict[str, Any] | bool = False if mode.kvcache is None else dict(mode.kvcache)
    local = getattr(fleet, "local_routing_config", None)  # simulated fleets; an external fleet keeps /lookup
    if mode.local and isinstance(kv, dict) and local is not None:
        kv.update(local())
    management = getattr(fleet, "management_config", None)  # simulated fleets know their engines' capacities
    if mode.managed and isinstance(kv, dict) and management is not None:
        kv = deep_merge(kv, management())
    cfg: dict[str, Any] = fleet.gateway_config(kvcache=kv, lb_policy=mode.lb_policy)  # port: runner binds 0
    # The benchmark reads the decision headers (x-kvgate-endpoint, x-kvgate-kvcache); they are opt-in.
    cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["decision_headers"] = True
    return cfg


def kvcache_overrides(mode: Mode) -> dict[str, Any] | None:
    """The kvcache filter overrides of ``mode`` merged over nothing (for display / JSON metadata)."""
    return None if mode.kvcache is None else deep_merge({}, mode.kvcache)


# --------------------------------------------------------------------------------------------------
# fleet shape (shared by both runners)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet every mode gets afresh (same seed, same config).

    ``num_gpu_blocks`` / ``lmcache_capacity_chunks`` size the engine's GPU prefix cache (16-token blocks)
    and LMCache CPU tier (256-token chunks); ``None`` keeps the profile / engine defaults.
    """

    engines: int = 4
    profile: str = "h100"
    time_scale: float = 1.0
    num_gpu_blocks: int | None = None
    lmcache_capacity_chunks: int | None = None
    lmcache_enabled: bool = True
    max_num_seqs: int | None = None
    seed: int = 0
    model: str = DEFAULT_MODEL
    extra: dict[str, Any] = field(default_factory=dict)

    def engine_config(self, instance_id: str = "sim-0", index: int = 0) -> EngineConfig:
        """The :class:`EngineConfig` of engine ``index`` (seed ``seed + index``, as ``start_fleet`` does)."""
        kw: dict[str, Any] = {
            "instance_id": instance_id,
            "model_name": self.model,
            "profile": self.profile,
            "time_scale": self.time_scale,
            "lmcache_enabled": self.lmcache_enabled,
            "seed": self.seed + index,
        }
        if self.num_gpu_blocks is not None:
            kw["num_gpu_blocks"] = self.num_gpu_blocks
        if self.lmcache_capacity_chunks is not None:
            kw["lmcache_capacity_chunks"] = self.lmcache_capacity_chunks
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        kw.update(self.extra)
        return EngineConfig(**kw)

    def base_engine_config(self) -> EngineConfig:
        """The config ``start_fleet(engine_config=…)`` copies per engine (it sets id and seed)."""
        return self.engine_config()

    def with_(self, **changes: Any) -> FleetSpec:
        """A modified copy."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary including the resolved capacities."""
        cfg = self.engine_config()
        return {
            "engines": self.engines,
            "profile": self.profile,
            "time_scale": self.time_scale,
            "num_gpu_blocks": cfg.resolved_num_gpu_blocks(),
            "gpu_cache_tokens": cfg.resolved_num_gpu_blocks() * cfg.block_size,
            "lmcache_enabled": self.lmcache_enabled,
            "lmcache_capacity_chunks": cfg.lmcache_capacity_chunks if self.lmcache_enabled else 0,
            "max_num_seqs": self.max_num_seqs,
            "seed": self.seed,
        }
