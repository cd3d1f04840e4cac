"""The kvgate config (Pixiu shape) that routes to a real fleet: kvcache filter then llm.proxy, one cluster.

Pure: built from the fleet's :class:`~kvgate_real.state.EngineInfo` records; the fleet writes it next to its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvgate_real.locations import LOCATION, LOOPBACK, MODEL_NAME, model_dir
from kvgate_real.state import EngineInfo


def kv_events_block(engines: Sequence[EngineInfo]) -> dict[str, Any] | None:
    """The kvcache filter's ``kv_events`` block (bind mode) for these engines, None when events are off."""
    configs = [(e.instance_id, e.kv_events) for e in engines if e.kv_events]
    if not configs:
        return None
    sources = [{"instance": i, "topic": c["topic"], "replay_endpoint": c["replay_endpoint"]} for i, c in configs]
    return {"bind": configs[0][1]["endpoint"], "sources": sources}


def kvgate_config(
    engines: Sequence[EngineInfo], controller_url: str, gateway_port: int, lmcache_cpu_gb: float
) -> dict[str, Any]:
    """Gateway config routing to these engines (endpoint ids = instance ids), listening on ``gateway_port``.

    With KV events on: local tokenizer (the model directory) and the event index (``index_source: events``).
    """
    first = engines[0].instance_id
    kvcache = {
        "enabled": True,
        "vllm_endpoint": engines[0].url,
        "lmcache_endpoint": controller_url,
        "default_model": MODEL_NAME,
        "request_timeout": "10s",
        "lookup_routing_timeout": "500ms",
        "hot_window": "5m",
        "hot_max_records": 300,
        "token_cache": {"enabled": True, "max_size": 1024, "ttl": "10m"},
        # engine signals for cache management (cache_strategy.signals: engine): LMCache's tier size here
        "engine_metrics": {"lmcache_capacity_bytes": int(lmcache_cpu_gb * 1024**3)},
        "cache_strategy": {
            "enable_compression": False,
            "enable_pinning": False,
            "enable_eviction": False,
            "pin_instance_id": first,
            "pin_location": LOCATION,
            "compress_instance_id": first,
            "compress_location": LOCATION,
            "compress_method": "zstd",
            "evict_instance_id": first,
        },
    }
    events = kv_events_block(engines)
    if events is not None:
        kvcache.update({"local_tokenizer": {"path": str(model_dir())}, "index_source": "events", "kv_events": events})
    return {
        "listeners": [
            {
                "name": "net/http",
                "protocol_type": "HTTP",
                "address": {"socket_address": {"address": LOOPBACK, "port": gateway_port}},
                "filter_chains": {
                    "filters": [
                        {
                            "name": "dgp.filter.httpconnectionmanager",
                            "config": {
                                "route_config": {
                                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "vllm_cluster"}}]
                                },
                                "http_filters": [
                                    {"name": "dgp.filter.ai.kvcache", "config": kvcache},
                                    {"name": "dgp.filter.llm.proxy", "config": {"timeout": "120s"}},
                                ],
                            },
                        }
                    ]
                },
            }
        ],
        "clusters": [
            {
                "name": "vllm_cluster",
                "lb_policy": "RoundRobin",
                "endpoints": [
                    {"id": e.instance_id, "socket_address": {"address": LOOPBACK, "port": e.port}} for e in engines
                ],
            }
        ],
    }
