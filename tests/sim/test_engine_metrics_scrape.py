"""The simulated engine's /metrics carries the names the gateway's engine scraper reads (vLLM + LMCache 0.5.6)."""

from __future__ import annotations

import aiohttp

from kvgate.filters.kvcache.engine_signals import EngineScraper, ScrapeTarget, parse_metrics
from kvgate.serving import start_server
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.engine_server import create_engine_app
from kvgate_sim.protocol import lmcache_chunk_hashes


async def test_scraper_reads_the_simulated_engine() -> None:
    cfg = EngineConfig(instance_id="simA", time_scale=0.01, num_gpu_blocks=400, lmcache_capacity_chunks=16)
    app, engine = create_engine_app(cfg)
    handle = await start_server(app)
    scraper = EngineScraper(
        [ScrapeTarget("simA", handle.url + "/metrics", lmcache_capacity_bytes=16 * 256 * 128 * 1024)], timeout=2.0
    )
    try:
        async with aiohttp.ClientSession() as s:
            prompt = " ".join(f"w{i}" for i in range(700))
            async with s.post(handle.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
                assert r.status == 200
            async with s.post(handle.url + "/tokenize", json={"prompt": prompt}) as r:
                tokens = (await r.json())["tokens"]
        tier = engine.core.tier
        assert tier is not None and len(tier) >= 2
        tier.pin_keys(lmcache_chunk_hashes(tokens, 256)[:1])
        await scraper.scrape_once()
        snap = scraper.snapshot("simA")
        st = engine.core.stats()
        assert snap is not None and snap.at is not None
        assert snap.kv_usage == st.kv_cache_usage_perc and snap.running == st.num_running == 0
        assert snap.waiting == 0
        assert snap.lmcache_cpu_bytes == tier.used_bytes > 0
        assert snap.lmcache_cpu_usage == tier.used_bytes / tier.capacity_bytes
        assert snap.lmcache_pinned_objs == 1
        async with aiohttp.ClientSession() as s, s.get(handle.url + "/metrics") as r:
            text = await r.text()
        assert "lmcache:local_cpu_evict_count_total" in text and "vllm:gpu_cache_usage_perc" in text
    finally:
        await scraper.aclose()
        await handle.stop()


async def test_no_lmcache_gauges_without_the_tier() -> None:
    app, _ = create_engine_app(EngineConfig(instance_id="simB", time_scale=0.01, lmcache_enabled=False))
    handle = await start_server(app)
    try:
        async with aiohttp.ClientSession() as s, s.get(handle.url + "/metrics") as r:
            values = parse_metrics(await r.text())
        assert "lmcache:local_cache_usage" not in values and values["vllm:kv_cache_usage_perc"] == 0.0
    finally:
        await handle.stop()
