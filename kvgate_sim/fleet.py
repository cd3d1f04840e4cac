"""SIMULATOR: start a fleet of simulated vLLM engines + an LMCache-compatible controller on loopback.

Test and benchmark tool. Engine instance ids equal the gateway endpoint ids (``sim-0``, ``sim-1``, …),
which is the contract the kvcache filter relies on. The controller is either ours (in-process,
commands reach the engines directly) or the REAL LMCache controller, to which each engine registers
through :class:`kvgate_sim.lmcache_worker.LMCacheWorkerBridge` over the ZMQ worker protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from kvgate.serving import ServerHandle, start_server
from kvgate_sim.controller_core import SimController
from kvgate_sim.controller_server import create_controller_app
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.engine_server import SimEngine, create_engine_app
from kvgate_sim.kv_publisher import KVEventsConfig, engine_binds
from kvgate_sim.merge import deep_merge
from kvgate_sim.tokenizer import tokenizer_dir

#: kvgate's recommended kvcache settings without local routing (docs/kvcache-filter.md "Recommended settings"):
#: remote ``/tokenize`` on a token-cache miss + LMCache ``/lookup``.
KVCACHE_RECOMMENDED_LOOKUP: dict[str, Any] = {
    "request_timeout": "2s",
    "lookup_routing_timeout": "100ms",
    "token_cache": {"enabled": True, "max_size": 8192, "ttl": "10m"},
    "tokenize_on_miss": True,  # route first requests (every new chat turn) too
    "cold_placement": "lru",  # spread prompts with no usable cached prefix
    "min_match_ratio": 0.5,  # a shared system prompt alone does not pull new conversations to one engine
    "max_imbalance_abs": 8,  # load guard: never pile a hot prefix onto an overloaded engine
    "max_imbalance_rel": 1.5,
}

#: the default topic template of a fleet's engines (one topic per engine: the gateway's bind mode needs it)
DEFAULT_TOPIC = "kv.{instance}"


def free_loopback_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for an address that must be known before anything binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_kv_events(buffer_steps: int = 10_000) -> KVEventsConfig:
    """What ``kvgate sim`` uses: the gateway binds a free loopback port, engines connect their PUB to it, each
    under its own topic, each with a replay ROUTER on an ephemeral loopback port."""
    return KVEventsConfig(
        endpoint=f"tcp://127.0.0.1:{free_loopback_port()}",
        topic=DEFAULT_TOPIC,
        replay_endpoint="tcp://127.0.0.1:*",
        buffer_steps=buffer_steps,
    )


_PORT = re.compile(r"^(?P<head>tcp://.+):(?P<port>\d+)$")


def _engine_endpoint(endpoint: str, index: int) -> str:
    """A bound endpoint's per-engine address: a numeric port is offset by the engine index (as vLLM offsets it by
    the data-parallel rank); ``*`` stays an ephemeral port. Connect-mode endpoints are shared by every engine."""
    if not engine_binds(endpoint):
        return endpoint
    m = _PORT.match(endpoint)
    return f"{m['head']}:{int(m['port']) + index}" if m else endpoint


def engine_kv_events(template: KVEventsConfig, instance_id: str, index: int) -> KVEventsConfig:
    """Engine ``index``'s ``--kv-events-config`` from a fleet template (``{instance}`` in the topic expanded)."""
    replay = template.replay_endpoint
    return replace(
        template,
        topic=template.topic.replace("{instance}", instance_id),
        endpoint=_engine_endpoint(template.endpoint, index),
        replay_endpoint=None if replay is None else _engine_endpoint(replay, index),
    )


def _reachable(endpoint: str | None) -> str | None:
    """A bound wildcard address as a subscriber on this host reaches it."""
    if endpoint is None:
        return None
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://127.0.0.1:")


@dataclass
class FleetEngine:
    instance_id: str
    engine: SimEngine
    handle: ServerHandle

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def port(self) -> int:
        return self.handle.port


@dataclass
class Fleet:
    engines: list[FleetEngine]
    controller_url: str | None
    controller: SimController | None = None
    _controller_handle: ServerHandle | None = None
    _bridges: list[Any] = field(default_factory=list)
    _stopped: bool = False
    kv_events: KVEventsConfig | None = None  # the fleet's template (None: engines publish no KV events)

    def kv_events_config(self) -> dict[str, Any] | None:
        """The kvcache filter's ``kv_events`` block for this fleet (None when its engines publish none).

        Engines that connect (non-wildcard endpoint): ``bind`` = that endpoint, sources told apart by topic.
        Engines that bind: one ``endpoint`` per source (the gateway connects to each).
        """
        tmpl = self.kv_events
        if tmpl is None or not tmpl.active:
            return None
        sources: list[dict[str, Any]] = []
        for e in self.engines:
            pub = e.engine.publisher
            if pub is None:
                continue
            b = pub.bound
            src: dict[str, Any] = {"instance": e.instance_id, "topic": b.topic}
            if engine_binds(tmpl.endpoint):
                src["endpoint"] = _reachable(b.endpoint)
            if b.replay_endpoint is not None:
                src["replay_endpoint"] = _reachable(b.replay_endpoint)
            sources.append(src)
        out: dict[str, Any] = {"sources": sources}
        if not engine_binds(tmpl.endpoint):
            out = {"bind": tmpl.endpoint, **out}
        return out

    def local_routing_config(self, index_source: str = "events") -> dict[str, Any]:
        """kvcache filter keys for local routing: the engines' tokenizer directory and, when the engines publish
        KV events, ``index_source`` + ``kv_events`` (else the index stays the seed's ``lookup``)."""
        out: dict[str, Any] = {"local_tokenizer": {"path": str(tokenizer_dir())}}
        ev = self.kv_events_config()
        if ev is not None and index_source != "lookup":
            out["index_source"] = index_source
            out["kv_events"] = ev
        return out

    def management_config(self) -> dict[str, Any]:
        """kvcache filter keys for cache management with engine signals (issue 13): the ``engine_metrics`` block
        with what this fleet's engines really have, since neither vLLM nor LMCache exports its capacity.

        ``lmcache_capacity_chunks`` (LMCache CPU-tier chunks of ``lmcache_chunk_size`` tokens),
        ``lmcache_capacity_bytes`` (the same in bytes: chunks × chunk tokens × KV bytes per token, what
        ``lmcache:local_cache_usage`` is measured against) and ``max_num_seqs`` of the first engine as the
        defaults; an engine that differs gets its own ``endpoints`` entry. An engine without the LMCache tier
        has capacity 0 (unknown: the gateway pins nothing there)."""

        def caps(e: FleetEngine) -> dict[str, int]:
            core = e.engine.core
            tier = core.tier
            return {
                "lmcache_capacity_chunks": core.config.lmcache_capacity_chunks if tier is not None else 0,
                "lmcache_capacity_bytes": tier.capacity_bytes if tier is not None else 0,
                "max_num_seqs": core.max_num_seqs,
            }

        per = [(e.instance_id, caps(e)) for e in self.engines]
        default = per[0][1] if per else {"lmcache_capacity_chunks": 0, "lmcache_capacity_bytes": 0, "max_num_seqs": 0}
        em: dict[str, Any] = dict(default)
        overrides = [{"instance": iid, **c} for iid, c in per if c != default]
        if overrides:
            em["endpoints"] = overrides
        return {"engine_metrics": em}

    @property
    def instance_ids(self) -> list[str]:
        return [e.instance_id for e in self.engines]

    def engine(self, instance_id: str) -> FleetEngine:
        for e in self.engines:
            if e.instance_id == instance_id:
                return e
        raise KeyError(instance_id)

    def gateway_config(
        self,
        *,
        kvcache: dict[str, Any] | bool = True,
        lb_policy: str = "RoundRobin",
        listener_port: int = 8888,
        route_prefix: str = "/",
        fallback: bool = True,
        proxy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A ready-to-use kvgate config (Pixiu shape) for this fleet."""
        filters: list[dict[str, Any]] = []
        if kvcache:
            kv: dict[str, Any] = {
                "enabled": True,
                "vllm_endpoint": self.engines[0].url,
                "lmcache_endpoint": self.controller_url or "",
                "default_model": "qwen2.5-7b-instruct",
                "request_timeout": "2s",
                "lookup_routing_timeout": "50ms",
                "token_cache": {"enabled": True, "max_size": 4096, "ttl": "10m"},
            }
            if isinstance(kvcache, dict):
                kv = deep_merge(kv, kvcache)
            filters.append({"name": "dgp.filter.ai.kvcache", "config": kv})
        filters.append({"name": "dgp.filter.llm.proxy", "config": proxy or {}})
        return {
            "listeners": [
                {
                    "name": "net/http",
                    "protocol_type": "HTTP",
                    "address": {"socket_address": {"address": "127.0.0.1", "port": listener_port}},
                    "filter_chains": {
                        "filters": [
                            {
                                "name": "dgp.filter.httpconnectionmanager",
                                "config": {
                                    "route_config": {
                                        "routes": [
                                            {"match": {"prefix": route_prefix}, "route": {"cluster": "sim_fleet"}}
                                        ]
                                    },
                                    "http_filters": filters,
                                },
                            }
                        ]
                    },
                }
            ],
            "clusters": [
                {
                    "name": "sim_fleet",
                    "lb_policy": lb_policy,
                    "endpoints": [
                        {
                            "id": e.instance_id,
                            "socket_address": {"address": "127.0.0.1", "port": e.port},
                            "llm_meta": {"fallback": fallback, "health_check_interval": 2000},
                        }
                        for e in self.engines
                    ],
                }
            ],
        }

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for b in self._bridges:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(b.close)
        for e in self.engines:
            with contextlib.suppress(Exception):
                await e.handle.stop(2.0)
            with contextlib.suppress(Exception):
                await e.engine.aclose()
        if self._controller_handle is not None:
            await self._controller_handle.stop(2.0)

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_fleet(
    n_engines: int = 4,
    *,
    profile: str = "h100",
    time_scale: float = 1.0,
    engine_config: EngineConfig | None = None,
    controller: bool = True,
    lmcache_controller: tuple[str, str] | None = None,
    seed: int = 0,
    id_prefix: str = "sim-",
    kv_events: KVEventsConfig | None = None,
) -> Fleet:
    """Start ``n_engines`` simulated engines (+ our controller, or registration with a real one).

    ``lmcache_controller`` = (pull_url, reply_url) of a REAL LMCache controller: each engine then
    registers as an LMCache worker over ZMQ instead of (or in addition to) our in-process controller.
    ``kv_events``: vLLM's ``--kv-events-config`` for every engine (:func:`engine_kv_events`: ``{instance}`` in
    the topic, bound numeric ports offset by the engine index); see :meth:`Fleet.kv_events_config`.
    """
    if n_engines < 1:
        raise ValueError("n_engines must be >= 1")
    base = engine_config or EngineConfig(profile=profile, time_scale=time_scale)
    ctl: SimController | None = None
    ctl_handle: ServerHandle | None = None
    engines: list[FleetEngine] = []
    bridges: list[Any] = []
    fleet = Fleet(engines, None, kv_events=kv_events)
    try:
        if controller:
            app, ctl = create_controller_app()
            ctl_handle = await start_server(app)
            fleet.controller, fleet._controller_handle, fleet.controller_url = ctl, ctl_handle, ctl_handle.url
        for i in range(n_engines):
            cfg = replace(base, instance_id=f"{id_prefix}{i}", seed=seed + i)
            sinks: list[Any] = []
            if ctl is not None:
                sinks.append(ctl.op_sink)
            bridge = None
            if lmcache_controller is not None:
                from kvgate_sim.lmcache_worker import LMCacheWorkerBridge

                bridge = _DeferredSink()
                sinks.append(bridge)
            sink = _fanout(sinks) if sinks else None
            ev = engine_kv_events(kv_events, cfg.instance_id, i) if kv_events is not None else None
            app_e, eng = create_engine_app(cfg, sink=sink, kv_events=ev)
            try:
                handle = await start_server(app_e)
            except BaseException:
                await eng.aclose()
                raise
            engines.append(FleetEngine(cfg.instance_id, eng, handle))
            if ctl is not None:
                ctl.register_worker(eng.core, "127.0.0.1", handle.port)
            if lmcache_controller is not None and bridge is not None:
                real = LMCacheWorkerBridge(eng.core, lmcache_controller[0], lmcache_controller[1])
                await asyncio.to_thread(real.start)
                bridge.target = real
                bridges.append(real)
        fleet._bridges = bridges
        return fleet
    except BaseException:
        fleet._bridges = bridges
        await fleet.stop()
        raise


class _DeferredSink:
    """An OpSink whose target (a worker bridge) is attached after the engine exists."""

    def __init__(self) -> None:
        self.target: Any = None

    def __call__(self, instance_id: str, worker_id: int, location: str, ops: list[Any]) -> None:
        if self.target is not None:
            self.target(instance_id, worker_id, location, ops)


def _fanout(sinks: list[Any]) -> Any:
    if len(sinks) == 1:
        return sinks[0]

    def sink(instance_id: str, worker_id: int, location: str, ops: list[Any]) -> None:
        for s in sinks:
            s(instance_id, worker_id, location, ops)

    return sink
