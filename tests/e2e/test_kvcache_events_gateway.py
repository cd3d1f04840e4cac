"""The whole gateway with the kvcache filter routing from KV events (issue 9): HTTP in, a real ZMQ engine
publisher, the proxy honouring the event-routed preference, and no controller anywhere."""

from __future__ import annotations

from typing import Any

import aiohttp
import zmq.asyncio

from kvgate.app import start_gateway
from kvgate.config import parse_config
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.serving import start_server
from kvgate.tokenization import LocalTokenizer
from tests.gateway.upstream import make_upstream
from tests.kvcache.kvevents_support import Publisher, sim_tokenizer_dir
from tests.kvcache.mocks import dead_url

ENGINES = ("engine-a", "engine-b")


async def test_gateway_routes_a_chat_to_the_engine_its_events_name() -> None:
    ups = [make_upstream(e) for e in ENGINES]
    handles = [await start_server(router) for router, _ in ups]
    zctx = zmq.asyncio.Context()
    kv: dict[str, Any] = {
        "enabled": True,
        "vllm_endpoint": dead_url(),
        "lmcache_endpoint": dead_url(),  # no controller: routing must not need one
        "token_cache": {"enabled": True, "max_size": 256},
        "local_tokenizer": {"path": str(sim_tokenizer_dir()), "fast": False},
        "index_source": "events",
        "kv_events": {
            "bind": "tcp://127.0.0.1:*",
            "sources": [{"instance": e, "topic": f"kv.{e}"} for e in ENGINES],
        },
    }
    hcm = {
        "route_config": {"routes": [{"match": {"prefix": "/v1"}, "route": {"cluster": "llm"}}]},
        "http_filters": [
            {"name": "dgp.filter.ai.kvcache", "config": kv},
            {"name": "dgp.filter.llm.proxy", "config": {}},
        ],
        "decision_headers": True,
    }
    cfg = {
        "listeners": [
            {
                "name": "l",
                "protocol_type": "HTTP",
                "address": {"socket_address": {"address": "127.0.0.1", "port": 8888}},
                "filter_chains": {"filters": [{"name": "dgp.filter.httpconnectionmanager", "config": hcm}]},
            }
        ],
        "clusters": [
            {
                "name": "llm",
                "lb_policy": "RoundRobin",
                "endpoints": [
                    {"id": e, "socket_address": {"address": "127.0.0.1", "port": h.port}}
                    for e, h in zip(ENGINES, handles, strict=True)
                ],
            }
        ],
    }
    gw = await start_gateway(parse_config(cfg), port=0, admin_port=0)
    pub: Publisher | None = None
    try:
        filters = [f for app in gw.gateway.listener_apps for f in app.filters if isinstance(f, KVCacheFilter)]
        index = filters[0].event_index
        assert index is not None and index.bound_endpoint
        pub = Publisher(zctx, "kv.engine-b").connect(index.bound_endpoint)
        messages = [
            {"role": "system", "content": "You are a careful assistant. " * 40},
            {"role": "user", "content": "Summarise the routing design of a KV-cache-aware gateway. " * 10},
        ]
        ids = LocalTokenizer.from_dir(sim_tokenizer_dir(), fast=False).encode_chat(messages)
        await pub.store(ids, lambda: index.counters()["batches"])
        url = gw.listeners[0].url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # RoundRobin alone would alternate
                async with s.post(url, json={"model": "demo", "messages": messages}) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["x-kvgate-endpoint"] == "engine-b"
                    assert r.headers["x-kvgate-kvcache"].startswith("routed;source=events;")
        assert len(ups[1][1].calls) == 3 and ups[0][1].calls == []
    finally:
        if pub is not None:
            pub.close()
        await gw.stop(2.0)
        for h in handles:
            await h.stop(1.0)
        zctx.destroy(linger=0)
