"""The filter against real loopback HTTP mocks (vLLM /tokenize + LMCache controller)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Self

import pytest

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, FilterStatus, RequestContext
from kvgate.config import parse_config
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.extract import prompt_key
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.runtime import Runtime
from tests.kvcache.mocks import MockController, MockVLLM, dead_url, word_tokens

ENDPOINTS = ("engine-a", "engine-b", "engine-c")


def gateway_config(endpoints: Sequence[tuple[str, int]] | None = None) -> Any:
    """One listener routing everything to cluster ``llm``; ``endpoints`` are (id, port), else ENDPOINTS."""
    eps = endpoints if endpoints is not None else [(eid, 20000 + i) for i, eid in enumerate(ENDPOINTS)]
    return parse_config(
        {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port": 18888}},
                    "filter_chains": {
                        "filters": [
                            {
                                "name": "dgp.filter.httpconnectionmanager",
                                "config": {
                                    "route_config": {
                                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "llm"}}]
                                    },
                                    "http_filters": [],
                                },
                            }
                        ]
                    },
                }
            ],
            "clusters": [
                {
                    "name": "llm",
                    "endpoints": [
                        {"id": eid, "socket_address": {"address": "127.0.0.1", "port": port}} for eid, port in eps
                    ],
                }
            ],
        }
    )


def make_ctx(body: dict[str, Any] | bytes, *, cluster: str = "llm", timeout: float = 10.0) -> RequestContext:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RequestContext(
        method="POST",
        path="/v1/completions",
        query_string=b"",
        headers=[],
        body=raw,
        cluster_name=cluster,
        timeout=timeout,
    )


async def wait_for(cond: Callable[[], bool], limit: float = 3.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class MockBackends:
    """A gateway runtime over ENDPOINTS with a mock vLLM /tokenize and LMCache controller; closes its filters."""

    def __init__(self, ctrl: MockController) -> None:
        self.vllm = MockVLLM()
        self.ctrl = ctrl
        self.runtime = Runtime(gateway_config())
        self.filters: list[KVCacheFilter] = []

    async def start(self) -> Self:
        await self.vllm.start()
        await self.ctrl.start()
        return self

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        v = self.runtime.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    async def close(self) -> None:
        for f in self.filters:
            await f.close()
        await self.runtime.close()
        await asyncio.gather(self.ctrl.stop(), self.vllm.stop())


class Harness(MockBackends):
    def __init__(self) -> None:
        super().__init__(
            MockController(
                layout={
                    "engine-a": ("LocalCPUBackend", 256),
                    "engine-b": ("LocalCPUBackend", 768),
                    "ghost": ("LocalCPUBackend", 4096),
                }
            )
        )

    async def make(
        self, *, signals: StaticSignals | None = None, lmcache: str | None = None, **overrides: Any
    ) -> KVCacheFilter:
        cfg = {
            "enabled": True,
            "vllm_endpoint": self.vllm.url,
            "lmcache_endpoint": lmcache or self.ctrl.url,
            "default_model": "demo",
            "token_cache": {"enabled": True, "max_size": 1024, "ttl": "10m"},
            # generous cap so a loaded CI machine does not turn routing tests into timeouts;
            # the cap itself is tested with explicit values
            "lookup_routing_timeout": "1s",
        }
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}  # type: ignore[dict-item]
            else:
                cfg[k] = v
        flt = KVCacheFilter(KVCacheConfig.model_validate(cfg), self.runtime, signals=signals or StaticSignals())
        await flt.start()
        self.filters.append(flt)
        return flt


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = await Harness().start()
    try:
        yield harness
    finally:
        await harness.close()


@pytest.mark.parametrize("array_shape", [True, False])
async def test_second_identical_request_routed_to_longest_match(h: Harness, array_shape: bool) -> None:
    h.ctrl.array_shape = array_shape
    flt = await h.make()
    body = {"model": "m", "prompt": "the quick brown fox jumps", "max_tokens": 4}
    ctx1 = make_ctx(body)
    assert await flt.decode(ctx1) == FilterStatus.CONTINUE
    assert PREFERRED_ENDPOINT_PARAM not in ctx1.params  # first request: token cache miss (Pixiu rule)
    key = prompt_key("m", "the quick brown fox jumps")
    await wait_for(lambda: flt.token_cache.get(key, count=False) is not None)
    assert h.vllm.requests == [{"model": "m", "prompt": "the quick brown fox jumps"}]  # built, not the raw body
    ctx2 = make_ctx(body)
    await flt.decode(ctx2)
    assert ctx2.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"  # "ghost" (4096) is not in the cluster
    assert h.ctrl.calls[-1] == ("/lookup", {"tokens": word_tokens("the quick brown fox jumps")})
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "no_tokens"}) == 1
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "routed"}) == 1
    assert h.metric("kvgate_kvcache_routing_candidates_rejected_total", {"reason": "unknown_instance"}) == 1
    assert h.metric("kvgate_kvcache_token_cache_hits_total") == 1
    assert h.metric("kvgate_kvcache_token_cache_misses_total") == 1
    assert h.metric("kvgate_kvcache_tokenize_calls_total", {"result": "ok"}) == 1
    assert h.metric("kvgate_kvcache_predicted_matched_tokens_count", {"instance": "chosen"}) == 1
    assert h.metric("kvgate_kvcache_routing_added_latency_seconds_count") == 2
    flt.token_cache.clear()  # the size gauge is read from the cache at collection time
    assert h.metric("kvgate_kvcache_token_cache_size") == 0


async def test_chat_request_tokenized_with_messages(h: Harness) -> None:
    flt = await h.make()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    await flt.decode(make_ctx({"messages": msgs, "stream": True}))
    await wait_for(lambda: len(flt.token_cache) == 1)
    # no model from the client → none sent to /tokenize (default_model only names the cache key; issue 10 item 6)
    assert h.vllm.requests == [{"messages": msgs, "add_generation_prompt": True}]
    ctx = make_ctx({"messages": msgs, "stream": False})
    await flt.decode(ctx)
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"
    # same joined text, different roles → different key → not routed from the cache
    swapped = [{"role": "user", "content": "be brief"}, {"role": "assistant", "content": "hello there"}]
    ctx = make_ctx({"messages": swapped})
    await flt.decode(ctx)
    assert PREFERRED_ENDPOINT_PARAM not in ctx.params


async def test_zero_match_and_unhealthy_not_routed(h: Harness) -> None:
    h.ctrl.layout = {"engine-a": ("LocalCPUBackend", 0), "engine-b": ("LocalCPUBackend", 512)}
    cluster = h.runtime.clusters.get("llm")
    assert cluster is not None
    cluster.get("engine-b").active_healthy = False  # type: ignore[union-attr]
    flt = await h.make()
    flt.token_cache.put(prompt_key("m", "p q r"), [1, 2, 3])
    ctx = make_ctx({"model": "m", "prompt": "p q r"})
    await flt.decode(ctx)
    assert PREFERRED_ENDPOINT_PARAM not in ctx.params
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "no_match"}) == 1
    assert h.metric("kvgate_kvcache_routing_candidates_rejected_total", {"reason": "unhealthy"}) == 1
    assert h.metric("kvgate_kvcache_routing_candidates_rejected_total", {"reason": "below_min_match"}) == 1
    h.ctrl.layout = {}
    await flt.decode(make_ctx({"model": "m", "prompt": "p q r"}))
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "empty"}) == 1


async def test_hanging_controller_bounded_by_routing_cap(h: Harness) -> None:
    h.ctrl.hang = True
    flt = await h.make(lookup_routing_timeout="100ms")
    flt.token_cache.put(prompt_key("m", "hang on"), [7, 8, 9])
    ctx = make_ctx({"model": "m", "prompt": "hang on"})
    t0 = time.perf_counter()
    assert await flt.decode(ctx) == FilterStatus.CONTINUE
    elapsed = time.perf_counter() - t0
    assert 0.09 <= elapsed < 0.1 + 0.5
    assert PREFERRED_ENDPOINT_PARAM not in ctx.params
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "timeout"}) == 1
    assert flt.breakers["lookup"].failure_count == 1  # a timed-out lookup counts as a failure


async def test_hcm_timeout_lowers_the_cap(h: Harness) -> None:
    h.ctrl.hang = True
    flt = await h.make(lookup_routing_timeout="2s")
    flt.token_cache.put(prompt_key("m", "x"), [1])
    t0 = time.perf_counter()
    await flt.decode(make_ctx({"model": "m", "prompt": "x"}, timeout=0.1))
    assert time.perf_counter() - t0 < 0.6


async def test_controller_failing_opens_lookup_breaker_and_stops_calls(h: Harness) -> None:
    h.ctrl.lookup_status = 503
    flt = await h.make(
        circuit_breaker={"failure_threshold": 3, "recovery_timeout": "10s"},
        lookup_routing_timeout="1s",
        retry={"max_attempts": 1},
    )
    flt.token_cache.put(prompt_key("m", "down"), [1, 2])
    for _ in range(8):
        ctx = make_ctx({"model": "m", "prompt": "down"})
        await flt.decode(ctx)
        assert PREFERRED_ENDPOINT_PARAM not in ctx.params
    assert len(h.ctrl.calls) == 3  # the breaker opened after 3 failures; later lookups never left the gateway
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "error"}) == 3
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "breaker_open"}) == 5
    assert h.metric("kvgate_kvcache_breaker_state", {"breaker": "lookup"}) == 1
    assert h.metric("kvgate_kvcache_breaker_state", {"breaker": "manage"}) == 0  # separate breakers


async def test_controller_down_transport_errors_open_breaker(h: Harness) -> None:
    flt = await h.make(lmcache=dead_url(), circuit_breaker={"failure_threshold": 2}, lookup_routing_timeout="50ms")
    flt.token_cache.put(prompt_key("m", "gone"), [1])
    for _ in range(4):
        t0 = time.perf_counter()
        await flt.decode(make_ctx({"model": "m", "prompt": "gone"}))
        assert time.perf_counter() - t0 < 0.05 + 0.5
    assert flt.breakers["lookup"].state.name == "OPEN"
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "breaker_open"}) == 2


async def test_actions_sent_in_order_with_fields(h: Harness) -> None:
    flt = await h.make(
        signals=StaticSignals(cpu_usage=0.9, memory_usage=0.9),
        cache_strategy={
            "enable_compression": True,
            "enable_pinning": True,
            "enable_eviction": True,
            "load_threshold": 0.5,
            "memory_threshold": 0.5,
            "hot_content_threshold": 1,
            "pin_instance_id": "engine-b",
            "pin_location": "LocalCPUBackend",
            "compress_instance_id": "engine-a",
            "compress_location": "LocalDiskBackend",
            "evict_instance_id": "engine-c",
        },
    )
    prompt = "pin me please"
    await flt.decode(make_ctx({"model": "m", "prompt": prompt}))
    await wait_for(lambda: "/evict" in h.ctrl.paths())
    toks = word_tokens(prompt)
    assert h.ctrl.calls == [
        ("/lookup", {"tokens": toks}),
        ("/compress", {"tokens": toks, "instance_id": "engine-a", "location": "LocalDiskBackend", "method": "zstd"}),
        ("/pin", {"tokens": toks, "instance_id": "engine-b", "location": "LocalCPUBackend"}),
        ("/evict", {"tokens": toks, "instance_id": "engine-c"}),
    ]
    await wait_for(lambda: h.metric("kvgate_kvcache_background_jobs_total", {"result": "done"}) == 1)
    for action in ("compress", "pin", "evict"):
        assert h.metric("kvgate_kvcache_actions_total", {"action": action, "result": "ok"}) == 1
    # second request: routed, and the routing lookup is reused by the background job (no second lookup)
    ctx = make_ctx({"model": "m", "prompt": prompt})
    await flt.decode(ctx)
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"
    await wait_for(lambda: h.ctrl.paths().count("/evict") == 2)
    assert h.ctrl.paths().count("/lookup") == 2


async def test_action_error_stops_sequence(h: Harness) -> None:
    h.ctrl.action_status = 500
    flt = await h.make(
        signals=StaticSignals(0.9, 0.9),
        retry={"max_attempts": 2, "base_backoff": "1ms"},
        cache_strategy={
            "enable_compression": True,
            "enable_pinning": True,
            "load_threshold": 0.5,
            "hot_content_threshold": 1,
            "compress_instance_id": "engine-a",
            "pin_instance_id": "engine-a",
        },
    )
    await flt.decode(make_ctx({"model": "m", "prompt": "boom"}))
    await wait_for(lambda: h.metric("kvgate_kvcache_background_jobs_total", {"result": "error"}) == 1)
    assert h.ctrl.paths() == ["/lookup", "/compress", "/compress"]  # retried once, pin never sent
    assert h.metric("kvgate_kvcache_actions_total", {"action": "compress", "result": "error"}) == 1


async def test_missing_evict_route_reported_once(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await h.ctrl.stop()
    h.ctrl = MockController(layout={"engine-a": ("LocalCPUBackend", 256)}, evict_route=False)
    await h.ctrl.start()
    flt = await h.make(
        signals=StaticSignals(0.0, 0.95),
        cache_strategy={"enable_eviction": True, "memory_threshold": 0.9, "evict_instance_id": "engine-a"},
    )
    caplog.set_level(logging.WARNING, logger="kvgate.filters.kvcache")
    for i in range(4):
        await flt.decode(make_ctx({"model": "m", "prompt": f"prompt number {i}"}))
        await wait_for(lambda i=i: h.metric("kvgate_kvcache_background_jobs_total", {"result": "done"}) == i + 1)
    assert h.ctrl.paths().count("/evict") == 1  # 404 not retried, then not called again
    warnings = [r.getMessage() for r in caplog.records if "/evict" in r.getMessage()]
    assert len(warnings) == 1 and "not supported" in warnings[0] and warnings[0].startswith("[kvcache]")
    assert h.metric("kvgate_kvcache_action_supported", {"action": "evict"}) == 0
    assert h.metric("kvgate_kvcache_actions_total", {"action": "evict", "result": "unsupported"}) == 4
    assert h.metric("kvgate_kvcache_breaker_state", {"breaker": "manage"}) == 0


async def test_burst_keeps_background_bounded(h: Harness) -> None:
    h.vllm.delay = 0.2
    flt = await h.make(max_background_tasks=4, background_queue_size=16)
    tasks_before = len(asyncio.all_tasks())
    max_tasks = 0
    for i in range(1000):
        await flt.decode(make_ctx({"model": "m", "prompt": f"unique prompt {i}"}))
        if i % 50 == 0:
            await asyncio.sleep(0)
            max_tasks = max(max_tasks, len(asyncio.all_tasks()))
        assert flt.queue_depth <= 16
    assert flt.worker_count == 4
    assert max_tasks <= tasks_before + 4 + 8  # workers' in-flight HTTP work only; no task per request
    dropped = h.metric("kvgate_kvcache_background_dropped_total")
    assert dropped >= 1000 - 16 - 4 - 20 * 4  # a few jobs start while the loop yields
    assert h.metric("kvgate_kvcache_background_jobs_total", {"result": "dropped"}) == dropped
    assert h.metric("kvgate_kvcache_background_queue_depth") <= 16


async def test_identical_requests_coalesced(h: Harness) -> None:
    h.vllm.delay = 0.1
    flt = await h.make()
    for _ in range(50):
        await flt.decode(make_ctx({"model": "m", "prompt": "same thing"}))
    await wait_for(lambda: len(flt.token_cache) == 1)
    assert len(h.vllm.requests) == 1
    assert h.metric("kvgate_kvcache_background_jobs_total", {"result": "coalesced"}) == 49


async def test_bad_bodies_never_fail_and_disabled_is_noop(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    flt = await h.make()
    caplog.set_level(logging.WARNING, logger="kvgate.filters.kvcache")
    for raw in (b"{not json", b"[1,2]", b"", b'{"prompt": 5}'):
        ctx = make_ctx(raw)
        assert await flt.decode(ctx) == FilterStatus.CONTINUE and ctx.params == {}
    # two bad bodies, one WARNING: the second is rate-limited and counted (issue 10 item 6c)
    assert sum("parse request body failed" in r.getMessage() for r in caplog.records) == 1
    assert h.metric("kvgate_kvcache_log_suppressed_total", {"event": "parse_body"}) == 1
    off = KVCacheFilter(KVCacheConfig.model_validate({"enabled": False}), h.runtime)
    await off.start()
    ctx = make_ctx({"prompt": "x"})
    assert await off.decode(ctx) == FilterStatus.CONTINUE and ctx.params == {} and off.worker_count == 0
    await off.close()


async def test_tokenize_failure_logged_without_prompt_text(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.vllm.status = 500
    flt = await h.make()
    caplog.set_level(logging.DEBUG, logger="kvgate.filters.kvcache")
    secret = "my secret prompt text"
    await flt.decode(make_ctx({"model": "m", "prompt": secret}))
    await wait_for(lambda: h.metric("kvgate_kvcache_tokenize_calls_total", {"result": "error"}) == 1)
    await wait_for(lambda: h.metric("kvgate_kvcache_background_jobs_total", {"result": "error"}) == 1)
    assert len(flt.token_cache) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "tokenize status 500" in text and secret not in text


async def test_close_cancels_workers(h: Harness) -> None:
    h.vllm.delay = 5.0
    flt = await h.make(max_background_tasks=2)
    await flt.decode(make_ctx({"model": "m", "prompt": "slow"}))
    # a worker really runs the job: it waits inside the tokenize call to vLLM
    await wait_for(lambda: flt.jobs.running == 1 and len(h.vllm.requests) == 1)
    await flt.close()
    assert flt.worker_count == 0 and flt.jobs.running == 0
    assert len(flt.token_cache) == 0  # the job was cancelled mid-call, not awaited to its end (that fills the cache)
    ctx = make_ctx({"model": "m", "prompt": "after close"})
    assert await flt.decode(ctx) == FilterStatus.CONTINUE  # still harmless


async def test_factory_through_chain(h: Harness) -> None:
    from kvgate.chain import build_filter, validate_filter_config

    cfg = validate_filter_config(
        "dgp.filter.ai.kvcache",
        {"enabled": True, "vllm_endpoint": h.vllm.url, "lmcache_endpoint": h.ctrl.url},
        "http_filters[0]",
    )
    flt = build_filter("dgp.filter.ai.kvcache", cfg, h.runtime)
    assert isinstance(flt, KVCacheFilter) and flt.kind == "dgp.filter.ai.kvcache"
    from kvgate.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_filter_config("dgp.filter.ai.kvcache", {"enabled": True}, "http_filters[0]")
    assert info.value.reason == "[kvcache] vllm_endpoint is required when enabled"
    assert info.value.path == "http_filters[0].config.vllm_endpoint"


async def test_background_job_deadline(h: Harness) -> None:
    h.vllm.delay = 1.0
    flt = await h.make(request_timeout="100ms")
    t0 = time.perf_counter()
    await flt.decode(make_ctx({"model": "m", "prompt": "too slow"}))
    await wait_for(lambda: h.metric("kvgate_kvcache_background_jobs_total", {"result": "timeout"}) == 1)
    assert time.perf_counter() - t0 < 0.6
    assert len(flt.token_cache) == 0


async def test_min_match_tokens(h: Harness) -> None:
    flt = await h.make(min_match_tokens=1024)
    flt.token_cache.put(prompt_key("m", "short"), [1, 2])
    ctx = make_ctx({"model": "m", "prompt": "short"})
    await flt.decode(ctx)
    assert PREFERRED_ENDPOINT_PARAM not in ctx.params  # best eligible match is 768 < 1024
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "no_match"}) == 1


async def test_token_cache_disabled_means_no_routing(h: Harness) -> None:
    flt = await h.make(token_cache={"enabled": False})
    for _ in range(2):
        ctx = make_ctx({"model": "m", "prompt": "never routed"})
        await flt.decode(ctx)
        assert PREFERRED_ENDPOINT_PARAM not in ctx.params
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "disabled"}) == 2
    assert h.ctrl.calls == [] and h.vllm.requests == []  # no strategy configured → no background work


async def test_tokenize_on_miss_routes_first_requests_but_skips_prompts_below_one_chunk(h: Harness) -> None:
    flt = await h.make(tokenize_on_miss=True)
    long_prompt = " ".join(["the quick brown fox jumps"] * 12)  # > 256 bytes: could fill a chunk
    ctx = make_ctx({"model": "m", "prompt": long_prompt})
    await flt.decode(ctx)
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"  # routed on its very first request
    assert h.vllm.requests == [{"model": "m", "prompt": long_prompt}]
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "routed"}) == 1
    # A prompt shorter than 256 bytes can never fill a 256-token LMCache chunk: no synchronous tokenize.
    short = make_ctx({"model": "m", "prompt": "the quick brown fox"})
    await flt.decode(short)
    assert PREFERRED_ENDPOINT_PARAM not in short.params
    assert h.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "no_tokens"}) == 1
    assert len([c for c in h.ctrl.calls if c[0] == "/lookup"]) == 1
