"""EngineScraper against real loopback servers: good pages, a hanging endpoint, 500s, garbage, a refused port."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from kvgate.filters.kvcache.engine_signals import (
    EngineScraper,
    EngineSnapshot,
    ScrapeTarget,
    StaticEngineSignals,
    parse_metrics,
)

GOOD = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.9
# HELP vllm:gpu_cache_usage_perc old name.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1
"""

OLD_ONLY = """# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 4
"""

LMCACHE = """# TYPE lmcache:local_cache_usage gauge
lmcache:local_cache_usage{model_name="m",worker_id="0",role="worker",served_model_name=""} 300.0
# TYPE lmcache:pinned_memory_objs_count gauge
lmcache:pinned_memory_objs_count{model_name="m",worker_id="0",role="worker",served_model_name=""} 7.0
"""


class Engine:
    """A loopback HTTP server whose /metrics behaviour can be switched between rounds."""

    def __init__(self) -> None:
        self.mode = "good"
        self.page = GOOD
        self.hits = 0
        self.release = asyncio.Event()

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(text="vllm:kv_cache_usage_perc{ this is not prometheus\n")
        return web.Response(text=self.page, content_type="text/plain")


@pytest_asyncio.fixture
async def engines() -> AsyncIterator[tuple[list[Engine], list[str]]]:
    runners: list[web.AppRunner] = []
    engs: list[Engine] = []
    urls: list[str] = []
    for _ in range(2):
        e = Engine()
        app = web.Application()
        app.router.add_get("/metrics", e.metrics)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
        engs.append(e)
        urls.append(f"http://127.0.0.1:{port}/metrics")
    yield engs, urls
    for e in engs:
        e.release.set()
    for r in runners:
        await r.cleanup()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_parse_metrics_aggregates_and_falls_back_to_the_old_name() -> None:
    v = parse_metrics(GOOD)
    assert v["vllm:num_requests_running"] == 5.0  # summed over engines (DP ranks)
    assert v["vllm:kv_cache_usage_perc"] == 0.9  # the fullest rank, new name preferred over the old one
    old = parse_metrics(OLD_ONLY)
    assert old["vllm:kv_cache_usage_perc"] == 0.75 and old["vllm:num_requests_waiting"] == 4.0
    assert parse_metrics("") == {}
    with pytest.raises(ValueError):
        parse_metrics("a{b c\n")


async def test_scrapes_each_instance_and_samples_per_instance(engines: tuple[list[Engine], list[str]]) -> None:
    engs, urls = engines
    engs[1].page = OLD_ONLY
    clock = Clock()
    s = EngineScraper(
        [ScrapeTarget("a", urls[0], max_num_seqs=10), ScrapeTarget("b", urls[1])], interval=1.0, clock=clock
    )
    try:
        await s.scrape_once()
        a, b = s.snapshot("a"), s.snapshot("b")
        assert a is not None and a.kv_usage == 0.9 and a.running == 5.0 and a.waiting == 0.0 and a.at == 100.0
        assert b is not None and b.kv_usage == 0.75 and b.waiting == 4.0 and b.running is None
        assert s.sample("a").memory_usage == 0.9 and s.sample("a").cpu_usage == 0.5  # 5 running / 10 seqs
        assert s.sample("b").cpu_usage == 1.0  # requests waiting: saturated
        assert s.stats.get("a", "ok") == 1 and s.stats.get("b", "ok") == 1
        clock.t += 3.5  # older than max_age (3 × interval): no longer trusted
        assert s.fresh("a") is None and s.sample("a").memory_usage == 0.0
        assert s.sample("unknown").memory_usage == 0.0
    finally:
        await s.aclose()


async def test_lmcache_metrics_url_and_capacity_ratio(engines: tuple[list[Engine], list[str]]) -> None:
    engs, urls = engines
    engs[1].page = LMCACHE
    s = EngineScraper([ScrapeTarget("a", urls[0], lmcache_metrics_url=urls[1], lmcache_capacity_bytes=1200)])
    try:
        await s.scrape_once()
        a = s.snapshot("a")
        assert a is not None and a.lmcache_cpu_bytes == 300.0 and a.lmcache_cpu_usage == 0.25
        assert a.lmcache_pinned_objs == 7.0 and a.kv_usage == 0.9
    finally:
        await s.aclose()


async def test_dead_hanging_and_broken_endpoints_never_block(
    engines: tuple[list[Engine], list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    engs, urls = engines
    clock = Clock()
    refused = f"http://127.0.0.1:{_free_port()}/metrics"
    results: list[tuple[str, str]] = []
    s = EngineScraper(
        [ScrapeTarget("a", urls[0]), ScrapeTarget("b", urls[1]), ScrapeTarget("dead", refused)],
        interval=1.0,
        timeout=0.2,
        clock=clock,
        on_result=lambda i, r: results.append((i, r)),
    )
    try:
        await s.scrape_once()
        assert s.snapshot("a").kv_usage == 0.9  # type: ignore[union-attr]
        engs[0].mode = "hang"
        engs[1].mode = "500"
        caplog.set_level(logging.INFO, logger="kvgate.kvcache.engine_signals")
        for _ in range(3):
            clock.t += 1
            # bounded by the timeout: a hanging engine cannot stall the round (the test would time out)
            await asyncio.wait_for(s.scrape_once(), 5.0)
        a = s.snapshot("a")
        assert a is not None and a.kv_usage == 0.9 and a.at == 100.0  # last good values kept
        assert a.consecutive_failures == 3 and a.last_error == "timeout"
        assert s.stats.get("a", "timeout") == 3 and s.stats.get("b", "status") == 3
        assert s.stats.get("dead", "connect") == 4 and s.snapshot("dead").at is None  # type: ignore[union-attr]
        warns = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert sorted(str(r.args[0]) for r in warns) == ["a", "b", "dead"]  # type: ignore[index]  # once per outage
        assert s.fresh("a") is not None  # 3 s old, max_age 3 s: still trusted
        clock.t += 0.5
        assert s.fresh("a") is None  # older than max_age: stale
        engs[0].mode = "garbage"
        clock.t += 1
        await s.scrape_once()
        assert s.stats.get("a", "parse") == 1
        engs[0].mode = "good"
        await s.scrape_once()
        assert s.fresh("a") is not None and s.snapshot("a").consecutive_failures == 0  # type: ignore[union-attr]
        assert any("answer again" in r.getMessage() for r in caplog.records)
        assert ("dead", "connect") in results and ("a", "ok") in results
    finally:
        await s.aclose()


async def test_background_loop_and_target_updates(engines: tuple[list[Engine], list[str]]) -> None:
    engs, urls = engines
    s = EngineScraper([ScrapeTarget("a", urls[0])], interval=0.05, timeout=0.5)
    s.start()
    try:
        for _ in range(200):
            if engs[0].hits >= 3:
                break
            await asyncio.sleep(0.02)
        assert engs[0].hits >= 3 and s.fresh("a") is not None
        s.update_targets([ScrapeTarget("b", urls[1])])
        assert s.snapshot("a") is None and s.instances() == ["b"]
    finally:
        await s.aclose()
    hits = engs[0].hits
    await asyncio.sleep(0.15)
    assert engs[0].hits == hits  # stopped


def test_static_signals_and_snapshot_load() -> None:
    snap = EngineSnapshot("x", kv_usage=0.8, running=4, waiting=0, at=0.0)
    sig = StaticEngineSignals({"x": snap}, max_num_seqs=8)
    assert sig.sample("x").memory_usage == 0.8 and sig.sample("x").cpu_usage == 0.5
    assert sig.sample("y").memory_usage == 0.0 and sig.instances() == ["x"]
    assert snap.inflight == 4 and snap.stale(10.0, 5.0) and not snap.stale(3.0, 5.0)
    with pytest.raises(ValueError):
        EngineScraper([], interval=0)


async def test_lmcache_page_failure_keeps_engine_values(engines: tuple[list[Engine], list[str]]) -> None:
    engs, urls = engines
    engs[1].page = LMCACHE
    s = EngineScraper(
        [ScrapeTarget("a", urls[0], lmcache_metrics_url=urls[1], lmcache_capacity_bytes=600)], timeout=0.3
    )
    try:
        await s.scrape_once()
        assert s.snapshot("a").lmcache_cpu_usage == 0.5  # type: ignore[union-attr]
        engs[1].mode = "hang"
        await asyncio.wait_for(s.scrape_once(), 5.0)
        a = s.snapshot("a")
        assert a is not None and a.kv_usage == 0.9 and a.consecutive_failures == 0
        assert a.lmcache_cpu_usage is None and a.lmcache_failures == 1
        assert s.stats.get("a", "lmcache_timeout") == 1 and s.stats.get("a", "ok") == 2
    finally:
        await s.aclose()
