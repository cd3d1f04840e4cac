"""Issue 10 (kvcache part) end to end: kvgate in front of the simulated fleet (engines + controller)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from kvgate_sim.fleet import Fleet, start_fleet
from tests.e2e.test_kvcache_fleet import LONG, gateway, metric, wait_for


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await start_fleet(2, time_scale=0.02)
    yield f
    await f.stop()


async def test_request_without_model_is_tokenized_as_the_engine_sees_it(fleet: Fleet) -> None:
    """Item 6: ``default_model`` names the cache key only; /tokenize gets no model, as the engine gets none."""
    gw = await gateway(fleet, {"default_model": "not-the-served-model", "lookup_routing_timeout": "1s"})
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{gw.url}/v1/completions"
            body = {"prompt": LONG, "max_tokens": 2}  # no "model": the engine serves its only model
            async with s.post(url, json=body) as r:
                assert r.status == 200, await r.text()
            ok = 'kvgate_kvcache_tokenize_calls_total{result="ok"}'
            err = 'kvgate_kvcache_tokenize_calls_total{result="error"}'

            async def tokenized() -> bool:
                return await metric(s, gw.admin_url, ok) + await metric(s, gw.admin_url, err) >= 1

            await wait_for(tokenized)
            assert await metric(s, gw.admin_url, err) == 0  # main sent the default model: 404
            async with s.post(url, json=body) as r:
                assert r.status == 200
                assert r.headers["x-kvgate-kvcache"].startswith("routed;")
    finally:
        await gw.stop()
