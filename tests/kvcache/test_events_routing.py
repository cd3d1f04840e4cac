"""The filter routing from its own KV-event index (issue 9), over real loopback ZMQ and HTTP.

Engines are played by real ZMQ PUB sockets fed by ``kvgate.kvevents.wire.encode_message``; tokens come from the
simulator's tokenizer directory through ``local_tokenizer`` (or the mock vLLM /tokenize where stated).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, RequestContext
from kvgate.errors import ConfigError
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.extract import extract
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.runtime import Runtime
from kvgate.tokenization import LocalTokenizer
from tests.kvcache.kvevents_support import Publisher, sim_tokenizer_dir
from tests.kvcache.mocks import MockController, dead_url, word_tokens
from tests.kvcache.test_filter_integration import ENDPOINTS, MockBackends, gateway_config, make_ctx, wait_for

WORDS = "cache route prefix engine token block gateway latency alpha beta gamma delta über 東京 数据".split()
_TOK: LocalTokenizer | None = None


def tok() -> LocalTokenizer:
    global _TOK
    if _TOK is None:
        _TOK = LocalTokenizer.from_dir(sim_tokenizer_dir(), fast=False)
    return _TOK


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choices(WORDS, k=n_words))


def chat(*contents: str) -> list[dict[str, str]]:
    roles = ["system", "user", "assistant"]
    return [{"role": roles[0] if i == 0 else roles[1 + (i + 1) % 2], "content": c} for i, c in enumerate(contents)]


def header(ctx: RequestContext) -> str:
    return dict(ctx.response_headers).get(b"x-kvgate-kvcache", b"").decode()


class Fleet(MockBackends):
    """A gateway runtime with three engines (engine-a/b/c) and the filter under test."""

    def __init__(self) -> None:
        super().__init__(MockController(layout={}))
        self.zctx = zmq.asyncio.Context()
        self.pubs: dict[tuple[int, str], Publisher] = {}  # (filter id, engine)

    async def make(
        self, *, mode: str = "bind", local: bool = True, lmcache: str | None = None, **kw: Any
    ) -> KVCacheFilter:
        """``mode`` bind: the gateway binds, engines connect (by topic); connect: every engine binds its PUB."""
        sources: list[dict[str, Any]] = []
        pubs: dict[str, Publisher] = {}
        if mode == "connect":
            pubs = {eid: Publisher(self.zctx, f"kv.{eid}").bind() for eid in ENDPOINTS}
            sources = [{"instance": eid, "endpoint": pub.endpoint} for eid, pub in pubs.items()]
            kv_events: dict[str, Any] = {"sources": sources}
        else:
            sources = [{"instance": eid, "topic": f"kv.{eid}"} for eid in ENDPOINTS]
            kv_events = {"bind": "tcp://127.0.0.1:*", "sources": sources}
        cfg: dict[str, Any] = {
            "enabled": True,
            "vllm_endpoint": self.vllm.url,
            "lmcache_endpoint": lmcache or self.ctrl.url,
            "token_cache": {"enabled": True, "max_size": 1024},
            "lookup_routing_timeout": "1s",
            "index_source": "events",
            "kv_events": kv_events,
        }
        if local:
            cfg["local_tokenizer"] = {"path": str(sim_tokenizer_dir()), "fast": False}
        for k, v in kw.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        flt = KVCacheFilter(KVCacheConfig.model_validate(cfg), self.runtime, signals=StaticSignals())
        await flt.start()
        self.filters.append(flt)
        if mode == "bind":
            bound = flt.event_index.bound_endpoint if flt.event_index is not None else None
            assert bound
            pubs = {eid: Publisher(self.zctx, f"kv.{eid}").connect(bound) for eid in ENDPOINTS}
        self.pubs.update({(id(flt), eid): pub for eid, pub in pubs.items()})
        return flt

    async def store(self, flt: KVCacheFilter, eid: str, tokens: list[int], **kw: Any) -> None:
        assert flt.event_index is not None
        index = flt.event_index
        await self.pubs[(id(flt), eid)].store(tokens, lambda: index.counters()["batches"], **kw)

    async def close(self) -> None:
        await super().close()
        for p in self.pubs.values():
            p.close()
        self.zctx.destroy(linger=0)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await Fleet().start()
    try:
        yield f
    finally:
        await f.close()


async def route(flt: KVCacheFilter, body: dict[str, Any]) -> RequestContext:
    ctx = make_ctx(body)
    await flt.decode(ctx)
    return ctx


@pytest.mark.parametrize("mode", ["bind", "connect"])
async def test_routes_from_events_with_the_controller_absent(fleet: Fleet, mode: str) -> None:
    flt = await fleet.make(mode=mode, lmcache=dead_url())
    msgs = chat(text(300, 1), text(200, 2))
    ids = tok().encode_chat(msgs)
    await fleet.store(flt, "engine-a", ids[:64])  # a shorter holder
    await fleet.store(flt, "engine-b", ids)  # the whole prompt
    ctx = await route(flt, {"model": "m", "messages": msgs})
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"
    expected = (len(ids) - 1) // 16 * 16  # vLLM recomputes the last token
    assert header(ctx).startswith("routed;source=events;") and f";matched={expected};best={expected}" in header(ctx)
    assert fleet.vllm.requests == []  # tokenized in-process
    assert fleet.metric("kvgate_kvcache_routing_lookups_total", {"outcome": "routed"}) == 1
    assert fleet.metric("kvgate_kvcache_predicted_matched_tokens_sum", {"instance": "chosen"}) == expected
    assert fleet.metric("kvgate_kvcache_local_tokenize_total", {"result": "ok"}) == 1
    assert flt.event_index is not None
    flt.event_index.maintain()  # the periodic export
    assert fleet.metric("kvgate_kvcache_kv_events_total", {"kind": "batches"}) == 2
    assert fleet.metric("kvgate_kvcache_index_entries", {"medium": "GPU"}) == 4 + len(ids) // 16
    assert fleet.metric("kvgate_kvcache_index_blocks") == len(ids) // 16  # engine-a's blocks are shared
    assert fleet.metric("kvgate_kvcache_kv_event_lag_seconds", {"instance": "engine-b"}) > 0
    req = extract({"model": "m", "messages": msgs})
    assert req is not None and flt.token_cache.get(req.key) == ids


async def test_multi_turn_chat_routed_to_the_holder(fleet: Fleet) -> None:
    flt = await fleet.make()
    turn1 = chat(text(120, 3), text(150, 4))
    await fleet.store(flt, "engine-c", tok().encode_chat(turn1))  # engine-c served turn 1
    await fleet.store(flt, "engine-a", tok().encode_chat(chat(text(120, 9), text(150, 4))))  # other system prompt
    turn2 = [*turn1, {"role": "assistant", "content": text(60, 5)}, {"role": "user", "content": text(40, 6)}]
    ctx = await route(flt, {"messages": turn2})
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-c"
    # the event index credits turn 1's prompt blocks (rendered turn 2 extends turn 1's rendered prompt)
    assert f";matched={len(tok().encode_chat(turn1)) // 16 * 16};" in header(ctx)


async def test_short_prompt_routed_at_block_granularity(fleet: Fleet) -> None:
    flt = await fleet.make()
    prompt = " ".join(random.Random(7).choices("a b c x y z".split(), k=60))
    ids = tok().encode_prompt(prompt)
    # under 256 UTF-8 bytes: the seed's one-LMCache-chunk skip would never tokenize it; 2+ blocks of 16
    assert len(prompt.encode()) < 250 and len(ids) > 32
    await fleet.store(flt, "engine-b", ids)
    ctx = await route(flt, {"prompt": prompt})
    assert ctx.params.get(PREFERRED_ENDPOINT_PARAM) == "engine-b", header(ctx)
    assert f";matched={(len(ids) - 1) // 16 * 16};" in header(ctx)


async def test_hot_prefix_spreads_over_two_holders_by_load(fleet: Fleet) -> None:
    flt = await fleet.make()
    prompt = text(400, 8)
    ids = tok().encode_prompt(prompt)
    await fleet.store(flt, "engine-a", ids)
    await fleet.store(flt, "engine-b", ids[: len(ids) - 16])  # one block shorter: still a holder of the prefix
    cluster = fleet.runtime.clusters.get("llm")
    assert cluster is not None
    picks = []
    for _ in range(4):
        ctx = await route(flt, {"prompt": prompt})
        chosen = ctx.params[PREFERRED_ENDPOINT_PARAM]
        picks.append(chosen)
        ep = cluster.get(chosen)
        assert ep is not None
        ep.in_flight += 1  # the proxy would hold it in flight
    assert sorted(picks) == ["engine-a", "engine-a", "engine-b", "engine-b"]
    # an ejected holder is never preferred
    ep_a = cluster.get("engine-a")
    assert ep_a is not None
    ep_a.in_flight, ep_a.active_healthy = 0, False
    ctx = await route(flt, {"prompt": prompt})
    assert ctx.params[PREFERRED_ENDPOINT_PARAM] == "engine-b"


async def test_local_failure_falls_back_to_remote_tokenize(fleet: Fleet) -> None:
    flt = await fleet.make(tokenize_on_miss=True)
    first = text(300, 10)
    body = {
        "messages": [
            {"role": "user", "content": first},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
        ]
    }
    mock_ids = word_tokens(f"<user> {first}")  # what the mock /tokenize answers
    await fleet.store(flt, "engine-c", mock_ids)
    ctx = await route(flt, body)
    assert len(fleet.vllm.requests) == 1  # the remote path tokenized it
    assert fleet.metric("kvgate_kvcache_local_tokenize_total", {"result": "fallback"}) == 1
    assert ctx.params.get(PREFERRED_ENDPOINT_PARAM) == "engine-c", header(ctx)


async def test_no_local_tokenizer_uses_remote_tokenize(fleet: Fleet) -> None:
    flt = await fleet.make(local=False, tokenize_on_miss=True)
    prompt = text(300, 11)
    await fleet.store(flt, "engine-a", word_tokens(prompt))
    ctx = await route(flt, {"prompt": prompt})
    assert ctx.params.get(PREFERRED_ENDPOINT_PARAM) == "engine-a" and len(fleet.vllm.requests) == 1


@pytest.mark.parametrize("controller", ["hung", "closed"])
async def test_both_mode_routing_ignores_a_stopped_controller(fleet: Fleet, controller: str) -> None:
    """A SIGSTOPped controller accepts connections and never answers (``hang``); a closed one refuses them.
    Either way the event-routed decision is the one a healthy controller gives."""
    healthy = await fleet.make(index_source="both")
    if controller == "hung":
        fleet.ctrl.hang = True
        url = fleet.ctrl.url
    else:
        url = dead_url()
    stopped = await fleet.make(index_source="both", lmcache=url)
    prompt = text(500, 12)
    ids = tok().encode_prompt(prompt)
    for flt in (healthy, stopped):
        await fleet.store(flt, "engine-b", ids)
    decisions = []
    for flt in (healthy, stopped):
        ctx = await route(flt, {"prompt": prompt})
        decisions.append((ctx.params.get(PREFERRED_ENDPOINT_PARAM), header(ctx).split(";match_ms")[0]))
    assert decisions[0] == decisions[1] == ("engine-b", "routed;source=events")


async def test_both_mode_adds_controller_holders_as_hints_that_expire(fleet: Fleet) -> None:
    clock = [1000.0]
    fleet.ctrl.layout = {"engine-c": ("LocalCPUBackend", 512), "ghost": ("LocalCPUBackend", 512)}
    flt = await fleet.make(index_source="both", kv_events={"hint_ttl": "30s"})
    flt.event_index.index._clock = lambda: clock[0]  # type: ignore[union-attr]
    prompt = text(600, 13)
    ctx = await route(flt, {"prompt": prompt})
    assert header(ctx).startswith("empty;source=events")  # nothing known yet; the job asks the controller
    assert flt.event_index is not None
    await wait_for(lambda: flt.event_index is not None and flt.event_index.index.hints > 0)
    assert [p for p, _ in fleet.ctrl.calls] == ["/lookup"]
    # a different prompt sharing the first 512 tokens is now routed to the controller's holder, from the index
    ids = tok().encode_prompt(prompt)
    other = tok()._tok.decode(ids[:520])  # the same leading tokens
    ctx = await route(flt, {"prompt": other + " " + text(50, 14)})
    assert ctx.params.get(PREFERRED_ENDPOINT_PARAM) == "engine-c", header(ctx)
    assert "ghost" not in flt.event_index.index.instances()  # not an engine of the route: never indexed
    clock[0] += 31
    flt.event_index.maintain()
    assert flt.event_index.index.instances() == []
    assert fleet.metric("kvgate_kvcache_kv_events_total", {"kind": "aged_out"}) == 2


def events_config(kv_events: dict[str, Any]) -> KVCacheConfig:
    """An events-indexed filter config whose vLLM and controller endpoints refuse connections."""
    return KVCacheConfig.model_validate(
        {
            "enabled": True,
            "vllm_endpoint": dead_url(),
            "lmcache_endpoint": dead_url(),
            "index_source": "events",
            "kv_events": kv_events,
        }
    )


async def test_sources_unknown_to_the_cluster_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    runtime = Runtime(gateway_config())
    cfg = events_config(
        {
            "sources": [
                {"instance": "engine-a", "endpoint": "tcp://127.0.0.1:1"},
                {"instance": "ghost", "endpoint": "tcp://127.0.0.1:2"},
            ]
        }
    )
    with caplog.at_level("WARNING"):
        flt = KVCacheFilter(cfg, runtime)
    assert "no cluster endpoint: ghost" in caplog.text and "engine-a" not in caplog.text
    await flt.close()
    await runtime.close()


async def test_bind_address_in_use_is_a_config_error(fleet: Fleet) -> None:
    first = await fleet.make()
    assert first.event_index is not None and first.event_index.bound_endpoint
    cfg = events_config(
        {"bind": first.event_index.bound_endpoint, "sources": [{"instance": "engine-a", "topic": "kv.engine-a"}]}
    )
    second = KVCacheFilter(cfg, fleet.runtime)
    with pytest.raises(ConfigError) as info:
        await second.start()
    assert info.value.path == "kv_events.bind"
    await second.close()
