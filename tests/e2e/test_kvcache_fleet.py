"""kvgate (seed config shape) in front of the simulated fleet: cache-aware routing end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kvgate.app import RunningGateway, start_gateway
from kvgate.asgi import Request, Router, Send
from kvgate.config import parse_config
from kvgate.serving import start_server
from kvgate_sim.fleet import Fleet, start_fleet

MODEL = "qwen2.5-7b-instruct"
LONG = " ".join(f"word{i}" for i in range(900))  # ~1,800 tokens: several 256-token chunks


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await start_fleet(2, time_scale=0.02)
    yield f
    await f.stop()


async def gateway(fleet: Fleet, kv: dict[str, Any] | None = None, lb: str = "RoundRobin") -> RunningGateway:
    cfg = fleet.gateway_config(kvcache=kv if kv is not None else True, lb_policy=lb)
    cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["decision_headers"] = True  # read below
    return await start_gateway(parse_config(cfg), port=0, admin_port=0)


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    async with s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-kvgate-sim-instance"], await r.json()


async def metric(s: aiohttp.ClientSession, admin: str, line_prefix: str) -> float:
    async with s.get(f"{admin}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_for(pred, limit_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_pixiu_sample_scenario_second_request_goes_to_prefix_holder(fleet: Fleet) -> None:
    gw = await gateway(fleet)  # seed behaviour: token cache only
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/completions"
            first, _ = await post(s, url, {"model": MODEL, "prompt": LONG, "max_tokens": 4})
            # The first request is not routed (Pixiu rule); its background job tokenizes the prompt.
            await wait_for(lambda: metric(s, gw.admin_url, 'kvgate_kvcache_tokenize_calls_total{result="ok"}'))
            served = [first]
            for _ in range(3):  # round robin alone would alternate
                inst, body = await post(s, url, {"model": MODEL, "prompt": LONG, "max_tokens": 4})
                served.append(inst)
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            async with s.post(url, json={"model": MODEL, "prompt": LONG, "max_tokens": 1}) as r:
                assert r.headers["x-kvgate-kvcache"].startswith("routed;lookup_ms=")
                served.append(r.headers["x-kvgate-sim-instance"])
            async with s.post(url, json={"model": MODEL, "prompt": "short, unseen", "max_tokens": 1}) as r:
                assert "x-kvgate-kvcache" not in r.headers  # not routed: no tokens cached yet
            routed = await metric(s, gw.admin_url, 'kvgate_kvcache_routing_lookups_total{outcome="routed"}')
            honored = await metric(
                s, gw.admin_url, 'kvgate_preferred_endpoint_decisions_total{cluster="sim_fleet",outcome="honored"}'
            )
    finally:
        await gw.stop()
    assert served == [first] * 5
    assert routed == 4 and honored == 4


async def test_tokenize_on_miss_routes_the_next_chat_turn(fleet: Fleet) -> None:
    gw = await gateway(fleet, {"tokenize_on_miss": True, "lookup_routing_timeout": "500ms"})
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/chat/completions"
            msgs = [{"role": "system", "content": LONG}, {"role": "user", "content": "question one"}]
            owners = []
            for turn in range(4):
                inst, body = await post(s, url, {"model": MODEL, "messages": msgs, "max_tokens": 4})
                owners.append(inst)
                if turn > 0:  # every new turn is a new prompt, routed on its first request
                    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
                msgs = [
                    *msgs,
                    {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                    {"role": "user", "content": f"follow-up {turn}"},
                ]
    finally:
        await gw.stop()
    assert len(set(owners)) == 1


async def test_pin_compress_evict_reach_the_controller(fleet: Fleet) -> None:
    kv = {
        "cache_strategy": {
            "enable_pinning": True,
            "hot_content_threshold": 1,
            "pin_instance_id": "",
            "pin_location": "LocalCPUBackend",
        }
    }
    gw = await gateway(fleet, kv)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/completions"
            for _ in range(2):
                await post(s, url, {"model": MODEL, "prompt": LONG, "max_tokens": 2})
                await asyncio.sleep(0.3)
            await wait_for(lambda: metric(s, gw.admin_url, 'kvgate_kvcache_actions_total{action="pin",result="ok"}'))
    finally:
        await gw.stop()
    # An empty pin_instance_id targets the instance holding the prefix; its chunks are now pinned.
    pinned = [e for e in fleet.engines if any(e.engine.core.tier.is_pinned(k) for k in e.engine.core.tier.keys())]
    assert len(pinned) == 1


class _Hang:
    def __init__(self) -> None:
        self.calls = 0
        self.router = Router()
        self.router.add("POST", "/lookup", self.hang)

    async def hang(self, req: Request, send: Send) -> None:
        self.calls += 1
        await asyncio.sleep(30)


async def test_hanging_controller_costs_at_most_the_routing_cap_then_breaker_opens(fleet: Fleet) -> None:
    hang = _Hang()
    ctl = await start_server(hang.router)
    cfg = fleet.gateway_config(
        kvcache={
            "lmcache_endpoint": ctl.url,
            "lookup_routing_timeout": "100ms",
            "tokenize_on_miss": True,
            "circuit_breaker": {"failure_threshold": 3, "recovery_timeout": "60s"},
        }
    )
    gw = await start_gateway(parse_config(cfg), port=0, admin_port=0)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/completions"
            durations = []
            for i in range(6):
                t0 = time.perf_counter()
                await post(s, url, {"model": MODEL, "prompt": f"{i} {LONG}", "max_tokens": 2})
                durations.append(time.perf_counter() - t0)
            opened = await metric(s, gw.admin_url, 'kvgate_kvcache_routing_lookups_total{outcome="breaker_open"}')
    finally:
        await gw.stop()
        await ctl.stop(1.0)
    assert max(durations) < 0.1 + 1.5  # the cap plus a generous margin for a loaded CI box
    assert hang.calls == 3  # the lookup breaker opened after 3 timeouts: no more calls
    assert opened == 3
