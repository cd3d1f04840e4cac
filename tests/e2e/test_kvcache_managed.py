"""Engine-aware cache management (issue 13) end to end: the gateway in front of the simulated fleet, pins sent
through the strategy to the controller, per-instance decisions from the engines' own /metrics.

Management rounds are driven by the test (``scraper.scrape_once()`` + ``run_round()``), so nothing depends on
timing: the loop and scraper intervals are set to an hour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from kvgate.app import RunningGateway, start_gateway
from kvgate.config import parse_config
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.managed import CacheManagement
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.fleet import Fleet, start_fleet
from tests.kvcache.mocks import dead_url

MODEL = "qwen2.5-7b-instruct"
SYSTEM = " ".join(f"rule{i} applies" for i in range(700))  # ~2,100 tokens: several 256-token chunks


def managed_kv(**over: Any) -> dict[str, Any]:
    kv: dict[str, Any] = {
        "token_cache": {"enabled": True, "max_size": 1024},
        "tokenize_on_miss": True,
        "lookup_routing_timeout": "1s",
        "cache_strategy": {
            "enable_pinning": True,
            "hot_content_threshold": 2,
            "signals": "engine",
            "interval": "1h",  # rounds are driven by the test
        },
        "engine_metrics": {"interval": "1h", "max_age": "1h", "lmcache_capacity_chunks": 1000},
    }
    for k, v in over.items():
        kv[k] = {**kv[k], **v} if isinstance(v, dict) and isinstance(kv.get(k), dict) else v
    return kv


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await start_fleet(2, engine_config=EngineConfig(time_scale=0.02, lmcache_capacity_chunks=256))
    yield f
    await f.stop()


async def gateway(fleet: Fleet, kv: dict[str, Any]) -> tuple[RunningGateway, KVCacheFilter]:
    cfg = fleet.gateway_config(kvcache=kv, lb_policy="RoundRobin")
    gw = await start_gateway(parse_config(cfg), port=0, admin_port=0)
    flt = next(f for app in gw.gateway.listener_apps for f in app.filters if isinstance(f, KVCacheFilter))
    return gw, flt


async def chat(s: aiohttp.ClientSession, gw: RunningGateway, question: str) -> str:
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    }
    async with s.post(f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-kvgate-sim-instance"]


async def metrics_text(s: aiohttp.ClientSession, url: str) -> str:
    async with s.get(url) as r:
        return await r.text()


def value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        got = pred()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def make_hot(s: aiohttp.ClientSession, gw: RunningGateway, mgmt: CacheManagement) -> str:
    """Two different questions after the same system prompt; returns the instance that served the first."""
    first = await chat(s, gw, "What is the first rule?")
    await chat(s, gw, "Which rule applies last?")
    await wait_until(lambda: len(mgmt.hot.hot(2)) == 1)
    return first


async def test_a_hot_shared_prefix_is_pinned_on_its_holder_through_the_controller(fleet: Fleet) -> None:
    gw, flt = await gateway(fleet, managed_kv())
    try:
        mgmt = flt.management
        assert mgmt is not None
        async with aiohttp.ClientSession() as s:
            holder = await make_hot(s, gw, mgmt)
            (hot,) = mgmt.hot.hot(2)
            shared_chunks = len(hot.tokens) // 256
            assert shared_chunks >= 6  # the system prompt, not the questions after it
            await mgmt.scraper.scrape_once()
            assert await mgmt.run_round() >= 1
            text = await metrics_text(s, f"{gw.admin_url}/metrics")
            assert value(text, 'kvgate_kvcache_management_decisions_total{action="pin",reason="hot_content"}') >= 1
            assert value(text, 'kvgate_kvcache_actions_total{action="pin",result="ok"}') >= 1
            assert value(text, f'kvgate_kvcache_pinned_chunks{{instance="{holder}"}}') == shared_chunks
            assert value(text, f'kvgate_kvcache_engine_scrapes_total{{instance="{holder}",result="ok"}}') >= 1
            # the engine itself now holds exactly the shared prefix's chunks pinned
            engine = fleet.engine(holder)
            page = await metrics_text(s, f"{engine.url}/metrics")
            assert value(page, "lmcache:pinned_memory_objs_count") == shared_chunks
            # a second round within half the TTL sends nothing new (no duplicate pins)
            assert await mgmt.run_round() == 0
    finally:
        await gw.stop()


async def test_the_pinned_share_cap_and_the_seed_default_keep_pins_off(fleet: Fleet) -> None:
    # capacity 10 chunks x 0.2 = 2 chunks: a prefix of 6+ chunks may not be pinned there
    gw, flt = await gateway(fleet, managed_kv(engine_metrics={"lmcache_capacity_chunks": 10}))
    try:
        mgmt = flt.management
        assert mgmt is not None
        async with aiohttp.ClientSession() as s:
            holder = await make_hot(s, gw, mgmt)
            await mgmt.scraper.scrape_once()
            assert await mgmt.run_round() == 0
            text = await metrics_text(s, f"{gw.admin_url}/metrics")
            assert value(text, 'kvgate_kvcache_management_decisions_total{action="skip_pin",reason="pin_cap"}') >= 1
            assert value(text, 'kvgate_kvcache_actions_total{action="pin"') == 0
            page = await metrics_text(s, f"{fleet.engine(holder).url}/metrics")
            assert value(page, "lmcache:pinned_memory_objs_count") == 0
    finally:
        await gw.stop()


async def test_a_dead_metrics_endpoint_blocks_no_request_and_gets_no_decision(fleet: Fleet) -> None:
    dead = [{"instance": e.instance_id, "metrics_url": dead_url()} for e in fleet.engines]
    gw, flt = await gateway(fleet, managed_kv(engine_metrics={"endpoints": dead}))
    try:
        mgmt = flt.management
        assert mgmt is not None
        async with aiohttp.ClientSession() as s:
            await make_hot(s, gw, mgmt)  # requests are served while every engine's /metrics is down
            await mgmt.scraper.scrape_once()
            assert await mgmt.run_round() == 0
            text = await metrics_text(s, f"{gw.admin_url}/metrics")
            assert value(text, 'kvgate_kvcache_management_decisions_total{action="skip_any",reason="no_signals"}') >= 1
            assert value(text, 'kvgate_kvcache_engine_scrapes_total{instance="sim-0",result="connect"}') >= 1
            assert value(text, 'kvgate_kvcache_actions_total{action="pin"') == 0
    finally:
        await gw.stop()


async def test_process_signals_keep_the_seed_path_and_build_no_manager(fleet: Fleet) -> None:
    kv = managed_kv()
    kv["cache_strategy"] = {**kv["cache_strategy"], "signals": "process"}
    gw, flt = await gateway(fleet, kv)
    try:
        assert flt.management is None
    finally:
        await gw.stop()
