"""Issue 10 (kvcache part): regression tests against real loopback mocks."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvgate.chain import JSON_OFFLOAD_BYTES, PREFERRED_ENDPOINT_PARAM, FilterStatus, RequestContext
from kvgate.filters.kvcache.config import DEFAULT_HOT_MAX_KEYS, KVCacheConfig
from kvgate.filters.kvcache.errors import DecodeError
from kvgate.filters.kvcache.extract import extract, prompt_key
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.hotstats import KEY_BYTES, STAMP_BYTES, HotStats
from kvgate.filters.kvcache.lmcache_client import LMCacheClient, TokenizerClient
from kvgate.filters.kvcache.pool import IdleCappedConnector, PoolLimits, make_session
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.filters.kvcache.tokens import TokenCache
from kvgate.ratelog import LogLimiter
from kvgate.redact import redact_url, redact_userinfo
from kvgate.resilience import BreakerState
from kvgate.runtime import Runtime
from tests.kvcache.mocks import MockController, MockVLLM, dead_url, word_tokens
from tests.kvcache.test_filter_integration import Harness, gateway_config, make_ctx, wait_for


@pytest.fixture
async def hh() -> AsyncIterator[Harness]:
    harness = await Harness().start()
    try:
        yield harness
    finally:
        await harness.close()


def _with_userinfo(url: str, secret: str) -> str:
    return url.replace("http://", f"http://operator:{secret}@", 1)


# ---------------------------------------------------------------- 1c: no credentials in log lines


def test_redact_url_drops_userinfo_and_query_values() -> None:
    assert (
        redact_url("http://user:pw@host:8000/x?access-token=abc&b=2#f")
        == "http://***@host:8000/x?access-token=***&b=***"
    )
    assert redact_url("http://[::1]:9/p") == "http://[::1]:9/p"
    assert redact_url("http://u@[::1]:9/") == "http://***@[::1]:9/"
    assert redact_url("http://h:99999999") == "***"
    assert (
        redact_userinfo("Cannot connect to http://a:b@h:1/x and https://c@d")
        == "Cannot connect to http://***@h:1/x and https://***@d"
    )


async def test_controller_password_never_logged(hh: Harness, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-pw"
    await hh.ctrl.stop()
    hh.ctrl = MockController(layout={"engine-a": ("LocalCPUBackend", 256)}, evict_route=False)
    await hh.ctrl.start()
    flt = await hh.make(
        lmcache=_with_userinfo(hh.ctrl.url, secret),
        signals=StaticSignals(0.0, 0.95),
        cache_strategy={"enable_eviction": True, "memory_threshold": 0.9, "evict_instance_id": "engine-a"},
    )
    caplog.set_level(logging.DEBUG, logger="kvgate.filters.kvcache")
    await flt.decode(make_ctx({"model": "m", "prompt": "evict me please"}))
    await wait_for(lambda: hh.metric("kvgate_kvcache_actions_total", {"action": "evict", "result": "unsupported"}) == 1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "answered 404 for /evict" in text and "***@127.0.0.1" in text
    assert secret not in text


async def test_tokenizer_password_never_logged_on_transport_error(
    hh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "tok-pw-123"
    flt = await hh.make(vllm_endpoint=_with_userinfo(dead_url(), secret))
    caplog.set_level(logging.DEBUG, logger="kvgate.filters.kvcache")
    await flt.decode(make_ctx({"model": "m", "prompt": "some prompt"}))
    await wait_for(lambda: hh.metric("kvgate_kvcache_tokenize_calls_total", {"result": "error"}) == 1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "tokenize failed" in text and secret not in text


# ---------------------------------------------------------------- 9: NaN / Infinity in a controller answer


@pytest.mark.parametrize("bad", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
async def test_non_finite_lookup_answer_is_a_counted_bad_response(hh: Harness, bad: bytes) -> None:
    hh.ctrl.lookup_raw = b'{"event_id":"x","layout_info":{"engine-a":["LocalCPUBackend",' + bad + b"]}}"
    flt = await hh.make(
        signals=StaticSignals(0.0, 0.0), cache_strategy={"enable_pinning": True, "hot_content_threshold": 1}
    )
    body = {"model": "m", "prompt": "the quick brown fox"}
    await flt.decode(make_ctx(body))  # token-cache miss; the background job tokenizes, then looks up
    await wait_for(lambda: hh.metric("kvgate_kvcache_background_jobs_total", {"result": "error"}) == 1)
    ctx = make_ctx(body)
    await flt.decode(ctx)  # routing lookup on cached tokens
    assert "llm_preferred_endpoint_id" not in ctx.params
    assert hh.metric("kvgate_kvcache_decode_errors_total") == 0  # handled, not an escaped exception
    assert hh.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "bad_response"}) == 1
    assert hh.metric("kvgate_kvcache_bad_responses_total", {"call": "lookup"}) >= 2
    assert hh.metric("kvgate_kvcache_actions_total", {"action": "pin", "result": "ok"}) == 0


# ---------------------------------------------------------------- 5: ttl without max_size stays bounded


def test_token_cache_with_ttl_and_no_max_size_expires_on_write() -> None:
    now = [0.0]
    c = TokenCache(max_size=0, ttl=10.0, clock=lambda: now[0])
    for i in range(1000):
        c.put(f"k{i}", [i])
    now[0] = 5.0
    c.put("k0", [0, 0])  # a rewrite refreshes k0's expiry
    now[0] = 10.5
    c.put("fresh", [1])  # nobody reads the 999 expired keys again: the write drops them
    assert len(c) == 2 and c.expired == 999
    assert c.get("k0") == [0, 0] and c.get("k5") is None
    # a steady stream of distinct keys never holds more than ttl's worth of writes
    for i in range(10_000):
        now[0] += 0.01
        c.put(f"s{i}", [i])
    assert len(c) <= 1001 and len(c._expiry) <= 2 * len(c) + 65


def test_token_cache_lru_and_ttl_keep_the_expiry_index_small() -> None:
    now = [0.0]
    c = TokenCache(max_size=8, ttl=1000.0, clock=lambda: now[0])
    for i in range(5000):
        c.put(f"k{i % 50}", [i])
    assert len(c) == 8 and len(c._expiry) <= 2 * 8 + 65


async def test_no_size_bound_warns_even_with_a_ttl(hh: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvgate.filters.kvcache")
    await hh.make(token_cache={"enabled": True, "max_size": 0, "ttl": "10m"})
    assert any("no size bound" in r.getMessage() and "ttl (600s)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    await hh.make(token_cache={"enabled": True, "max_size": 100, "ttl": "10m"})
    assert not any("no size bound" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 13: a 404 from /pin is re-probed after a back-off


async def test_pin_404_is_reprobed_after_backoff_against_a_real_controller(
    hh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    cfg = {
        "enabled": True,
        "vllm_endpoint": hh.vllm.url,
        "lmcache_endpoint": hh.ctrl.url,
        "token_cache": {"enabled": True, "max_size": 64},
        "lookup_routing_timeout": "1s",
        "cache_strategy": {"enable_pinning": True, "hot_content_threshold": 1, "pin_instance_id": "engine-a"},
    }
    flt = KVCacheFilter(KVCacheConfig.model_validate(cfg), hh.runtime, signals=StaticSignals(), clock=lambda: now[0])
    hh.filters.append(flt)
    await flt.start()
    caplog.set_level(logging.DEBUG, logger="kvgate.filters.kvcache")
    hh.ctrl.action_status = 404  # e.g. a proxy in front of the controller during a rollout

    async def one(i: int) -> None:
        done = hh.metric("kvgate_kvcache_background_jobs_total", {"result": "done"})
        await flt.decode(make_ctx({"model": "m", "prompt": f"hot prompt {i}"}))
        await wait_for(lambda: hh.metric("kvgate_kvcache_background_jobs_total", {"result": "done"}) == done + 1)

    await one(0)
    await one(1)
    assert hh.ctrl.paths().count("/pin") == 1 and hh.metric("kvgate_kvcache_action_supported", {"action": "pin"}) == 0
    now[0] += 31
    await one(2)  # re-probed: still 404
    assert hh.ctrl.paths().count("/pin") == 2
    assert hh.metric("kvgate_kvcache_action_unsupported_total", {"action": "pin"}) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "/pin" in r.getMessage()]
    assert len(warnings) == 1  # logged once, counted every time
    hh.ctrl.action_status = 200  # the rollout finished
    now[0] += 61
    await one(3)
    assert hh.ctrl.paths().count("/pin") == 3
    assert hh.metric("kvgate_kvcache_actions_total", {"action": "pin", "result": "ok"}) == 1
    assert hh.metric("kvgate_kvcache_action_supported", {"action": "pin"}) == 1
    await one(4)
    assert hh.ctrl.paths().count("/pin") == 4


# ---------------------------------------------------------------- 6b: hot map bounded, only with pinning, measured


async def test_hot_map_not_kept_without_pinning(hh: Harness) -> None:
    flt = await hh.make()  # routing only: no pin configured
    for i in range(300):
        await flt.decode(make_ctx({"model": "m", "prompt": f"distinct prompt {i}"}))
    assert len(flt.hot) == 0 and flt.hot.approx_bytes == 0
    assert hh.metric("kvgate_kvcache_hot_keys") == 0


async def test_hot_map_has_a_default_key_cap_a_byte_budget_and_size_gauges(hh: Harness) -> None:
    pin = {"enable_pinning": True, "hot_content_threshold": 2, "pin_instance_id": "engine-a"}
    flt = await hh.make(cache_strategy=pin)
    assert flt.hot.max_keys == DEFAULT_HOT_MAX_KEYS  # hot_max_keys 0 no longer means unbounded
    assert flt.hot.max_bytes == 16 * 1024 * 1024
    flt = await hh.make(cache_strategy=pin, hot_max_bytes=50 * KEY_BYTES)
    for i in range(300):
        await flt.decode(make_ctx({"model": "m", "prompt": f"distinct prompt {i}"}))
    assert 0 < len(flt.hot) <= 50 and flt.hot.approx_bytes <= 50 * KEY_BYTES
    assert hh.metric("kvgate_kvcache_hot_keys") == len(flt.hot)
    assert hh.metric("kvgate_kvcache_hot_bytes") == flt.hot.approx_bytes > 0


def test_hot_map_byte_estimate_follows_trims_and_evictions() -> None:
    now = [0.0]
    h = HotStats(
        window=10.0, max_records=3, max_keys=0, clock=lambda: now[0], max_bytes=5 * KEY_BYTES + 40 * STAMP_BYTES
    )
    for i in range(20):
        for _ in range(i % 5 + 1):  # up to 5 records per key, at most 3 kept
            h.record(f"k{i}")
        now[0] += 1.0

    def recount() -> int:
        return len(h._data) * KEY_BYTES + sum(len(d) for d in h._data.values()) * STAMP_BYTES

    assert h.approx_bytes == recount() and h.approx_bytes <= h.max_bytes
    now[0] += 100
    h.sweep()
    assert len(h) == 0 and h.approx_bytes == 0


# ---------------------------------------------------------------- 4: Pixiu's pool keys; a pool wait is no failure


async def _concurrent_routing(hh: Harness, flt: KVCacheFilter, n: int) -> list[RequestContext]:
    body = {"model": "m", "prompt": "a prompt whose tokens are cached"}
    key = prompt_key("m", body["prompt"])
    flt.token_cache.put(key, word_tokens(body["prompt"]))
    ctxs = [make_ctx(body) for _ in range(n)]
    await asyncio.gather(*(flt.decode(c) for c in ctxs))
    return ctxs


async def test_many_concurrent_lookups_to_a_slow_controller_do_not_open_the_breaker(hh: Harness) -> None:
    """72 concurrent routing lookups to a controller that answers only once all 72 are in flight: the old hidden
    64-per-host cap made 8 of them wait for a connection, so nothing was ever answered, every lookup timed out
    and the lookup breaker opened for everyone. Default now: no per-host cap (Go's default). No timing margin is
    involved: the routing cap is generous, and only the cap on connections decides."""
    hh.ctrl.answer_at_in_flight = 72
    flt = await hh.make(lookup_routing_timeout="10s")
    ctxs = await _concurrent_routing(hh, flt, 72)
    assert flt.breakers["lookup"].state == BreakerState.CLOSED and flt.breakers["lookup"].failure_count == 0
    assert hh.ctrl.max_in_flight == 72
    assert sum(PREFERRED_ENDPOINT_PARAM in c.params for c in ctxs) == 72


async def test_max_conns_per_host_is_honoured_and_a_pool_wait_is_not_a_controller_failure(hh: Harness) -> None:
    """4 lookups hold the 4 connections (1.5 s cap, never answered); then 16 more with a 0.3 s cap (their request
    timeout) wait for a slot and give up long before any slot frees up. Starting them together made the result
    depend on scheduling: a waiter started >5 ms after a holder could take its slot when it timed out."""
    hh.ctrl.hang = True  # the 4 calls holding the connections never get an answer
    flt = await hh.make(max_conns_per_host=4, lookup_routing_timeout="1500ms")
    body = {"model": "m", "prompt": "a prompt whose tokens are cached"}
    flt.token_cache.put(prompt_key("m", body["prompt"]), word_tokens(body["prompt"]))
    holders = [asyncio.create_task(flt.decode(make_ctx(body))) for _ in range(4)]
    await wait_for(lambda: hh.ctrl.in_flight == 4)
    await asyncio.gather(*(flt.decode(make_ctx(body, timeout=0.3)) for _ in range(16)))
    assert all(not t.done() for t in holders)  # every waiter gave up while the 4 slots were still held
    await asyncio.gather(*holders)
    assert hh.ctrl.max_in_flight == 4  # the key is honoured
    assert hh.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "pool_wait"}) == 16
    assert hh.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "timeout"}) == 4
    lookup = flt.breakers["lookup"]
    assert lookup.failure_count == 4 and lookup.state == BreakerState.CLOSED  # only calls that reached it count


async def test_max_idle_conns_caps_idle_keepalive_connections(hh: Harness) -> None:
    hh.ctrl.lookup_delay = 0.05
    # (limits, idle connections left): 10 controller + 4 tokenizer connections were opened each time
    cases = ((PoolLimits(max_idle_conns_per_host=2), 4), (PoolLimits(max_idle_conns=3), 3), (PoolLimits(), 14))
    for limits, expected in cases:
        session = make_session(limits)
        try:
            client = LMCacheClient(lambda s=session: s, hh.ctrl.url, 2.0)
            await asyncio.gather(*(client.lookup([1, 2, 3]) for _ in range(10)))
            tok = TokenizerClient(lambda s=session: s, hh.vllm.url, 2.0)
            await asyncio.gather(*(tok.tokenize({"prompt": "a b"}) for _ in range(4)))
            connector = session.connector
            assert isinstance(connector, IdleCappedConnector)
            assert connector.idle_count() == expected
        finally:
            await session.close()


@pytest.mark.parametrize("bad", [[5, 2**32], [-1, 5], [5, 2**70]])
async def test_tokenize_answer_with_ids_outside_32_bits_is_a_decode_error(hh: Harness, bad: list[int]) -> None:
    """Token ids are held as uint32 (kvgate/token_ids.py): an engine answering ids no vocabulary has is refused
    at the client (DecodeError, counted as a failed tokenize), never a crash in the token cache."""
    hh.vllm.tokens = bad
    session = make_session(PoolLimits())
    try:
        tok = TokenizerClient(lambda: session, hh.vllm.url, 2.0)
        with pytest.raises(DecodeError, match=r"outside 0\.\.2"):
            await tok.tokenize({"prompt": "a b"})
        hh.vllm.tokens = [5, 2**32 - 1]
        assert await tok.tokenize({"prompt": "a b"}) == [5, 2**32 - 1]
    finally:
        await session.close()
    hh.vllm.tokens = bad
    flt = await hh.make()
    body = {"model": "m", "prompt": "word " * 600}
    assert await flt.decode(make_ctx(body)) is FilterStatus.CONTINUE  # the background job's tokenize fails
    await wait_for(lambda: hh.metric("kvgate_kvcache_tokenize_calls_total", {"result": "error"}) == 1)
    assert len(flt.token_cache) == 0


# ---------------------------------------------------------------- 6c: tokenizer fallback, rate-limited warnings


async def test_tokenizer_falls_back_to_another_engine_of_the_cluster(
    hh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The configured vllm_endpoint (engine-a) is dead; engine-b of the same cluster tokenizes instead."""
    dead = dead_url()
    live = await MockVLLM().start()
    try:
        await hh.runtime.close()
        ports = [int(dead.rsplit(":", 1)[1]), int(live.url.rsplit(":", 1)[1])]
        hh.runtime = Runtime(gateway_config(list(zip(("engine-a", "engine-b"), ports, strict=True))))
        hh.ctrl.layout = {"engine-b": ("LocalCPUBackend", 256)}
        caplog.set_level(logging.WARNING, logger="kvgate.filters.kvcache")
        flt = await hh.make(vllm_endpoint=dead)
        body = {"model": "m", "prompt": "the quick brown fox jumps"}
        for i in range(5):
            await flt.decode(make_ctx({"model": "m", "prompt": f"warm up prompt {i}"}))
        await flt.decode(make_ctx(body))
        await wait_for(lambda: hh.metric("kvgate_kvcache_tokenize_calls_total", {"result": "ok"}) == 6)
        assert hh.metric("kvgate_kvcache_tokenize_calls_total", {"result": "error"}) == 0
        assert hh.metric("kvgate_kvcache_tokenize_fallbacks_total") == 6
        assert len(live.requests) == 6
        ctx = make_ctx(body)
        await flt.decode(ctx)
        assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"  # KV routing keeps working
        assert sum("tokenized by" in r.getMessage() for r in caplog.records) == 1  # rate-limited
        assert hh.metric("kvgate_kvcache_log_suppressed_total", {"event": "tokenize_fallback"}) == 5
    finally:
        await live.stop()


async def test_tokenizer_failure_warning_is_rate_limited_and_counted(
    hh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    flt = await hh.make(vllm_endpoint=dead_url())  # the Harness cluster's endpoints are dead too
    caplog.set_level(logging.WARNING, logger="kvgate.filters.kvcache")
    for i in range(40):
        await flt.decode(make_ctx({"model": "m", "prompt": f"prompt number {i}"}))
    await wait_for(lambda: hh.metric("kvgate_kvcache_background_jobs_total", {"result": "error"}) == 40)
    assert sum("tokenize failed" in r.getMessage() for r in caplog.records) == 1
    assert hh.metric("kvgate_kvcache_log_suppressed_total", {"event": "tokenize_failed"}) == 39
    assert hh.metric("kvgate_kvcache_tokenize_calls_total", {"result": "error"}) == 40


def test_log_limiter_once_per_interval() -> None:
    now = [0.0]
    seen: list[str] = []
    lim = LogLimiter(30.0, clock=lambda: now[0], on_suppressed=seen.append)
    assert lim.allow("x") == 0 and lim.allow("x") is None and lim.allow("y") == 0
    now[0] = 29.9
    assert lim.allow("x") is None
    now[0] = 30.0
    assert lim.allow("x") == 2 and seen == ["x", "x"]


# ---------------------------------------------------------------- 14: large bodies are handled off the event loop


def _big_chat(n_bytes: int) -> dict[str, Any]:
    text = "lorem ipsum dolor sit amet " * 40
    return {"model": "m", "messages": [{"role": "user", "content": text}] * (n_bytes // len(text) + 1)}


async def _loop_turns_during(coro: Any) -> tuple[int, Any]:
    """How many times another task got the loop while ``coro`` ran (0 = it blocked the loop throughout)."""
    turns = 0
    stop = False

    async def other_stream() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_stream())
    await asyncio.sleep(0)
    before = turns
    try:
        result = await coro
    finally:
        stop = True
        await task
    return turns - before, result


async def test_large_body_parse_and_key_do_not_block_the_loop(hh: Harness) -> None:
    flt = await hh.make()
    big = make_ctx(_big_chat(1024 * 1024))
    assert len(big.body) > JSON_OFFLOAD_BYTES
    turns, status = await _loop_turns_during(flt.decode(big))
    assert status == FilterStatus.CONTINUE and turns > 0  # main: parse + canonical JSON + SHA-256 inline (0 turns)
    inline = extract(json.loads(big.body), "")
    assert inline is not None  # the key computed off the loop is the inline one: its tokens get cached
    await wait_for(lambda: flt.token_cache.get(inline.key, count=False) is not None, limit=20.0)
    small = make_ctx({"model": "m", "prompt": "short"})
    turns, _ = await _loop_turns_during(flt.decode(small))
    assert turns == 0  # below the threshold the work stays inline (cheaper than a thread hop)


async def test_request_context_json_async_offloads_large_bodies() -> None:
    ctx = make_ctx(_big_chat(1024 * 1024))
    turns, data = await _loop_turns_during(ctx.json_async())
    assert turns > 0 and data is ctx.json()  # parsed once, shared with every later ctx.json()
    bad = make_ctx(b"[" * (JSON_OFFLOAD_BYTES + 1))  # deep nesting: RecursionError inside json → ValueError
    with pytest.raises(ValueError):
        await bad.json_async()
    with pytest.raises(ValueError):
        bad.json()
