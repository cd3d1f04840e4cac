"""The kvcache filter against the REAL LMCache 0.5.6 controller: simulated engines register as LMCache
workers over ZMQ; the filter parses the real ``/lookup`` answers and routes to the prefix holder."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from kvgate.app import start_gateway
from kvgate.config import parse_config
from kvgate_sim.fleet import start_fleet
from kvgate_sim.lmcache_real import RealController
from kvgate_sim.tokenizer import get_tokenizer

MODEL = "qwen2.5-7b-instruct"


async def test_filter_routes_with_real_controller_answers(real_ctl: RealController) -> None:
    fleet = await start_fleet(
        2,
        time_scale=0.02,
        controller=False,
        id_prefix="gw-real-",
        lmcache_controller=(real_ctl.pull_url, real_ctl.reply_url),
    )
    fleet.controller_url = real_ctl.url
    prompt = " ".join(f"real{i}" for i in range(700))
    tokens = get_tokenizer().encode(prompt)
    gw = await start_gateway(
        parse_config(fleet.gateway_config(kvcache={"tokenize_on_miss": True, "lookup_routing_timeout": "500ms"})),
        port=0,
        admin_port=0,
    )
    try:
        async with aiohttp.ClientSession() as s:

            async def send() -> str:
                async with s.post(
                    f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
                ) as r:
                    assert r.status == 200
                    return r.headers["x-kvgate-sim-instance"]

            first = await send()
            expect_end = (len(tokens) // 256) * 256
            deadline = time.monotonic() + 20
            layout: dict[str, list[object]] = {}
            while time.monotonic() < deadline:
                async with s.post(f"{real_ctl.url}/lookup", json={"tokens": tokens}) as r:
                    layout = (await r.json())["layout_info"]
                if layout:
                    break
                await asyncio.sleep(0.1)
            # The real wire format: {instance: [location, end]} arrays.
            assert layout == {first: ["LocalCPUBackend", expect_end]}
            second = [await send() for _ in range(3)]
            async with s.get(f"{gw.admin_url}/metrics") as r:
                metrics = await r.text()
    finally:
        await gw.stop()
        await fleet.stop()
    assert second == [first] * 3  # round robin alone would alternate
    assert 'kvgate_kvcache_routing_lookups_total{outcome="routed"} 3.0' in metrics
