"""Simulated engines publish vLLM KV-cache events that rebuild their real cache contents in kvgate's index.

Real loopback ZMQ end to end: the simulated engines' publishers -> kvgate.kvevents.KVEventSubscriber ->
kvgate.routing.block_index.BlockIndex, compared with the engines' own GPU prefix cache and LMCache tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Sequence

import aiohttp
import pytest
import zmq
import zmq.asyncio

from kvgate.kvevents import EventSource, KVEventSubscriber
from kvgate.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, DecodedBatch, decode_message
from kvgate.routing.block_index import BlockIndex
from kvgate_sim.engine_model import EngineConfig, Prompt
from kvgate_sim.fleet import Fleet, default_kv_events, start_fleet
from kvgate_sim.kv_publisher import KVEventsConfig
from kvgate_sim.tokenizer import get_tokenizer

MODEL = "qwen2.5-7b-instruct"


def _texts(n: int, seed: int = 5) -> list[str]:
    """Prompts sharing long prefixes (so blocks are reused and the small caches evict)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    bases = [" ".join(rng.choice(words) for _ in range(rng.randint(250, 500))) for _ in range(3)]
    return [rng.choice(bases) + " " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 200))) for _ in range(n)]


async def _send(fleet: Fleet, texts: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    async with aiohttp.ClientSession() as s:
        for i, text in enumerate(texts):
            e = fleet.engines[i % len(fleet.engines)]
            async with s.post(f"{e.url}/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
            ids.append(get_tokenizer().encode(text))
    return ids


def _published(fleet: Fleet) -> int:
    return sum(e.engine.publisher.published for e in fleet.engines if e.engine.publisher is not None)


async def _settle(sub: KVEventSubscriber, fleet: Fleet) -> None:
    """Wait until the subscriber applied every batch the engines published (directly or by replay)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 10.0
    while sub.stats.batches < _published(fleet):
        if loop.time() > end:
            raise AssertionError(f"applied {sub.stats.batches} of {_published(fleet)} batches: {sub.stats}")
        await asyncio.sleep(0.02)


def _sources(fleet: Fleet) -> list[EventSource]:
    ev = fleet.kv_events_config()
    assert ev is not None
    return [EventSource(**s) for s in ev["sources"]]


def _assert_index_equals_engines(index: BlockIndex, fleet: Fleet, prompts: Sequence[Sequence[int]], *, cpu_exact: bool):
    checked_gpu = checked_cpu = 0
    for ids in prompts:
        n = len(ids)
        gpu = index.match(ids, media=["GPU"], limit=n - 1)
        cpu = index.match(ids, media=["cpu"])
        for e in fleet.engines:
            core = e.engine.core
            p = Prompt(ids)
            want_gpu = len(core.gpu.match(p.block_hashes(core.block_size), (n - 1) // core.block_size)) * 16
            assert gpu.get(e.instance_id, 0) == want_gpu, (e.instance_id, n)
            checked_gpu += want_gpu > 0
            assert core.tier is not None
            want_cpu = core.tier.lookup(p.chunk_hashes(256)) * 256
            if cpu_exact:
                assert cpu.get(e.instance_id, 0) == want_cpu, (e.instance_id, n)
            else:  # real LMCache in-process mode announces no CPU eviction: the index may only hold more
                assert cpu.get(e.instance_id, 0) >= want_cpu, (e.instance_id, n)
            checked_cpu += want_cpu > 0
    assert checked_gpu and checked_cpu  # the comparison is not vacuous


def _small(removal: bool = False) -> EngineConfig:
    return EngineConfig(time_scale=0.001, num_gpu_blocks=90, lmcache_capacity_chunks=4, lmcache_removal_events=removal)


@pytest.mark.parametrize("removal", [False, True], ids=["lmcache-default", "lmcache-removal-events"])
async def test_bind_mode_index_reproduces_engine_caches(removal: bool) -> None:
    """Engines connect their PUB to the gateway's bound SUB (vLLM's non-wildcard endpoint), one topic each."""
    kv = default_kv_events()
    fleet = await start_fleet(2, engine_config=_small(removal), kv_events=kv)
    index = BlockIndex()
    sub = KVEventSubscriber(index, _sources(fleet), bind=kv.endpoint)
    await sub.start()
    try:
        await asyncio.sleep(0.3)  # PUB -> SUB connection and subscription (ZMQ slow joiner)
        prompts = await _send(fleet, _texts(14))
        await _settle(sub, fleet)
        assert sub.stats.unknown_source == 0 and sub.stats.decode_errors == 0
        assert index.stats.orphan_events == 0 and index.stats.token_mismatch_events == 0
        assert index.stats.trimmed_events > 0  # LMCache's 257-id chunks arrived and were trimmed
        assert sum(e.engine.core.gpu.evictions for e in fleet.engines) > 0  # the caches really evicted
        _assert_index_equals_engines(index, fleet, prompts + [p[: len(p) // 2] for p in prompts], cpu_exact=removal)
    finally:
        await sub.stop()
        await fleet.stop()


async def test_connect_mode_and_kv_event_sources() -> None:
    """Wildcard endpoints: every engine binds its PUB (ephemeral loopback port); the gateway connects to each."""
    kv = KVEventsConfig(endpoint="tcp://127.0.0.1:*", topic="kv.{instance}", replay_endpoint="tcp://127.0.0.1:*")
    fleet = await start_fleet(2, engine_config=_small(True), kv_events=kv)
    index = BlockIndex()
    ev = fleet.kv_events_config()
    assert ev is not None and "bind" not in ev
    sub = KVEventSubscriber(index, _sources(fleet))
    await sub.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{fleet.engines[1].url}/kv_event_sources") as r:
                sources = await r.json()
        src1 = next(x for x in ev["sources"] if x["instance"] == "sim-1")
        assert sources["0"]["endpoint"] == src1["endpoint"] != kv.endpoint  # the bound ephemeral port
        assert sources["0"]["topic"] == "kv.sim-1" and sources["0"]["enable_kv_cache_events"] is True
        await asyncio.sleep(0.3)
        prompts = await _send(fleet, _texts(10, seed=9))
        await _settle(sub, fleet)
        _assert_index_equals_engines(index, fleet, prompts, cpu_exact=True)
    finally:
        await sub.stop()
        await fleet.stop()


async def test_replay_lets_a_late_gateway_learn_earlier_blocks() -> None:
    """Batches published before the gateway existed are lost on PUB/SUB; the replay ROUTER serves them."""
    kv = default_kv_events()
    fleet = await start_fleet(1, engine_config=_small(True), kv_events=kv)
    index = BlockIndex()
    try:
        early = await _send(fleet, _texts(6, seed=11))
        assert _published(fleet) > 1
        sub = KVEventSubscriber(index, _sources(fleet), bind=kv.endpoint)
        await sub.start()
        try:
            await asyncio.sleep(0.3)
            late = await _send(fleet, _texts(1, seed=12))
            await _settle(sub, fleet)
            assert sub.stats.replayed_batches > 0 and sub.stats.replay_failures == 0
            _assert_index_equals_engines(index, fleet, early + late, cpu_exact=True)
        finally:
            await sub.stop()
    finally:
        await fleet.stop()


async def _replay(endpoint: str, start: int) -> list[DecodedBatch]:
    """vLLM's replay protocol by hand: DEALER sends [b"", start_seq], gets [b"", topic, seq, payload]... seq -1."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out: list[DecodedBatch] = []
    try:
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), 5)
            assert frames[0] == b"" and len(frames) == 4
            if frames[2] == (-1).to_bytes(8, "big", signed=True):
                assert frames[1] == frames[3] == b""
                return out
            out.append(decode_message(frames[1:]))
    finally:
        sock.close(linger=0)


async def test_wire_format_replay_eviction_and_reset_events() -> None:
    """Raw SUB socket + raw replay DEALER: 3 frames, per-engine topic, seq from 0, vLLM's event shapes;
    evictions -> BlockRemoved, /reset_prefix_cache -> AllBlocksCleared; LMCache chunks carry 257 ids except a
    prompt's last. Batches sent before the subscription took effect are lost (as with vLLM) but replayable."""
    kv = default_kv_events()
    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(kv.endpoint)
    live: list[DecodedBatch] = []

    async def receive() -> None:  # a SUB must be serviced to send its subscription, as a real subscriber is
        while True:
            live.append(decode_message(await sock.recv_multipart()))

    receiver = asyncio.create_task(receive())
    fleet = await start_fleet(1, engine_config=_small(True), kv_events=kv)
    try:
        await asyncio.sleep(0.3)
        prompts = await _send(fleet, _texts(8, seed=3))
        exact = [random.Random(1).randrange(100, 50_000) for _ in range(512)]  # two whole chunks: 257 + 256 ids
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": exact, "max_tokens": 2}
            async with s.post(f"{fleet.engines[0].url}/v1/completions", json=body) as r:
                assert r.status == 200
            async with s.post(f"{fleet.engines[0].url}/reset_prefix_cache") as r:
                assert r.status == 200
        total = _published(fleet)
        for _ in range(250):
            if live and live[-1].seq == total - 1:
                break
            await asyncio.sleep(0.02)
        assert live and live[-1].seq == total - 1, f"got {[m.seq for m in live]} of {total}"
        pub = fleet.engines[0].engine.publisher
        assert pub is not None and pub.bound.replay_endpoint is not None
        replayed = await _replay(pub.bound.replay_endpoint, 0)
        tail = await _replay(pub.bound.replay_endpoint, total - 2)
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        sock.close(linger=0)
        await fleet.stop()
    assert [m.seq for m in live] == list(range(live[0].seq, total))  # no hole after the first one received
    assert [m.seq for m in replayed] == list(range(total)) and [m.seq for m in tail] == [total - 2, total - 1]
    assert [m.batch for m in replayed[live[0].seq :]] == [m.batch for m in live]
    assert {m.topic for m in live + replayed} == {b"kv.sim-0"}
    events = [ev for m in replayed for ev in m.batch.events]
    gpu = [e for e in events if isinstance(e, BlockStored) and e.medium == "GPU"]
    cpu = [e for e in events if isinstance(e, BlockStored) and e.medium == "cpu"]
    assert gpu and all(e.block_size == 16 and len(e.token_ids) == 16 * len(e.block_hashes) for e in gpu)
    first = prompts[0]
    assert gpu[0].parent_block_hash is None and gpu[0].token_ids == first[: len(gpu[0].token_ids)]
    assert all(len(e.block_hashes) == 1 and e.block_size == 256 for e in cpu)
    assert {len(e.token_ids) for e in cpu} == {256, 257}
    assert [e.token_ids for e in cpu[-2:]] == [exact[:257], exact[256:]]
    assert cpu[0].parent_block_hash is None and cpu[0].token_ids == first[:257]
    assert any(isinstance(e, BlockRemoved) and e.medium == "GPU" for e in events)
    assert any(isinstance(e, BlockRemoved) and e.medium == "cpu" for e in events)
    assert isinstance(events[-1], AllBlocksCleared)
    assert all(isinstance(h, int) and 0 <= h < 2**64 for e in gpu + cpu for h in e.block_hashes)


def test_kv_events_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        KVEventsConfig.from_dict({"endpoint": "tcp://*:1", "bogus": 1})
    cfg = KVEventsConfig.from_dict(json.loads('{"endpoint": "tcp://*:5557", "max_queue_size": 5}'))
    assert cfg.endpoint == "tcp://*:5557"
