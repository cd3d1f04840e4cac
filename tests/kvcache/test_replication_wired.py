"""Hot-prefix replication wired into the filter (issue 13): a hot prefix whose holder is overloaded is warmed
on a second engine with a 1-token prefill, and later requests are routed among both holders by load.

Real loopback servers: the engines are OpenAI-shaped upstreams (tests/gateway/upstream.py) that record the
warm-up they receive; /tokenize and the controller are the mock servers of tests/kvcache/mocks.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvgate.chain import PREFERRED_ENDPOINT_PARAM
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.managed import warmup_body
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.runtime import Runtime
from kvgate.serving import ServerHandle, start_server
from tests.gateway.upstream import UpstreamState, make_upstream
from tests.kvcache.mocks import MockController, MockVLLM
from tests.kvcache.test_filter_integration import gateway_config, make_ctx, wait_for

ENGINES = ("engine-a", "engine-b", "engine-c")
SYSTEM = " ".join(f"policy{i}" for i in range(600))  # 600 mock tokens (one per word): 2 whole chunks


class Engines:
    def __init__(self) -> None:
        self.handles: list[ServerHandle] = []
        self.states: dict[str, UpstreamState] = {}

    async def start(self) -> Engines:
        for e in ENGINES:
            router, state = make_upstream(e)
            self.handles.append(await start_server(router))
            self.states[e] = state
        return self


@pytest.fixture
async def setup() -> AsyncIterator[tuple[KVCacheFilter, Runtime, Engines]]:
    engines = await Engines().start()
    vllm = await MockVLLM().start()
    ctrl = await MockController(layout={"engine-a": ("LocalCPUBackend", 512)}).start()
    runtime = Runtime(gateway_config([(e, h.port) for e, h in zip(ENGINES, engines.handles, strict=True)]))
    cfg = KVCacheConfig.model_validate(
        {
            "enabled": True,
            "vllm_endpoint": vllm.url,
            "lmcache_endpoint": ctrl.url,
            "token_cache": {"enabled": True, "max_size": 64},
            "tokenize_on_miss": True,
            "lookup_routing_timeout": "2s",
            "cache_strategy": {"hot_content_threshold": 2},
            "engine_metrics": {"interval": "1h"},
            "replication": {"enabled": True, "max_imbalance_abs": 2},
        }
    )
    flt = KVCacheFilter(cfg, runtime, signals=StaticSignals())
    await flt.start()
    try:
        yield flt, runtime, engines
    finally:
        await flt.close()
        await runtime.close()
        for h in engines.handles:
            await h.stop()
        await ctrl.stop()
        await vllm.stop()


def posts(state: UpstreamState) -> list[dict[str, Any]]:
    """Completion calls (the upstream also records the engine-metrics scrapes it answers 404)."""
    return [c for c in state.calls if c["path"].endswith("completions")]


def body(question: str, **extra: object) -> dict[str, object]:
    return {"model": "demo", "prompt": f"{SYSTEM} {question}", "max_tokens": 64, **extra}


async def test_an_overloaded_holder_of_a_hot_prefix_gets_a_warmed_replica(
    setup: tuple[KVCacheFilter, Runtime, Engines],
) -> None:
    flt, runtime, engines = setup
    mgmt = flt.management
    assert mgmt is not None and mgmt.planner is not None
    cluster = runtime.clusters.get("llm")
    assert cluster is not None
    holder = cluster.get("engine-a")
    assert holder is not None
    for i in range(2):  # the prefix becomes hot (background jobs count it); the holder is idle: no warm-up
        ctx = make_ctx(body(f"question {i}"))
        await flt.decode(ctx)
        assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-a"
    await wait_for(lambda: [h.count for h in mgmt.hot.hot(1)] == [2])
    assert all(not posts(s) for s in engines.states.values())

    holder.in_flight = 5  # the holder is now overloaded: 5 in flight, the others idle
    ctx = make_ctx(body("question 2", stream=True, stream_options={"include_usage": True}))
    await flt.decode(ctx)
    await wait_for(lambda: bool(posts(engines.states["engine-b"])))
    warm = posts(engines.states["engine-b"])[0]
    assert warm["path"] == "/v1/completions"
    assert warm["body"]["max_tokens"] == 1 and "stream" not in warm["body"] and "stream_options" not in warm["body"]
    assert warm["body"]["prompt"].startswith(SYSTEM)
    key = str(mgmt.hot.hot(1)[0].key)
    await wait_for(lambda: mgmt.planner is not None and mgmt.planner.holders(key) == ["engine-b"])
    assert flt.metrics.replications.labels("planned")._value.get() == 1
    assert flt.metrics.replications.labels("ok")._value.get() == 1

    # the controller still credits only engine-a; the gateway's record makes engine-b a holder, the less loaded
    ctx = make_ctx(body("question 3"))
    await flt.decode(ctx)
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"
    assert len(posts(engines.states["engine-b"])) == 1  # one warm-up per prefix (max_replicas 1)
    assert not posts(engines.states["engine-c"])


def test_warmup_body_is_a_one_token_non_streaming_prefill() -> None:
    request = {"model": "m", "messages": [], "stream": True, "n": 3, "max_completion_tokens": 99}
    out = warmup_body(request)
    assert out is not None
    data = json.loads(out)
    assert data == {"model": "m", "messages": [], "max_tokens": 1, "max_completion_tokens": 1}
    assert warmup_body([1, 2]) is None and warmup_body("nope") is None
    assert request["stream"] is True  # the client's parsed body is not modified
