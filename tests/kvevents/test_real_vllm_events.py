"""Optional (marker ``real``): vLLM's own ZmqEventPublisher -> kvgate's subscriber, decoder and replay client.

Runs vLLM 0.32's ``vllm.distributed.kv_events.ZmqEventPublisher`` (the class an engine started with
``--kv-events-config`` uses) in a subprocess of the real tier's venv (``.cache/real-venv``; importing it
takes a few seconds, no model, no engine). The publisher connects to the gateway's bound SUB socket
(non-wildcard endpoint) and binds its replay ROUTER. The first batches are published before the gateway
subscribes, so they can only arrive through vLLM's replay endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
import zmq.asyncio

from kvgate.kvevents.subscriber import EventSource, KVEventSubscriber
from kvgate.routing.block_index import BlockIndex

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".cache" / "real-venv" / "bin" / "python"

PUBLISHER = """
import select, sys, time
from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch,
                                        ZmqEventPublisher)
endpoint, replay, topic = sys.argv[1:4]
pub = ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint, replay_endpoint=replay, topic=topic)
def stored(hashes, parent, tokens, medium="GPU"):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=4,
                       lora_id=None, medium=medium, lora_name=None)
# seq 0..2, before the gateway listens: int and bytes hashes, a CPU (LMCache-style) block, a removal
pub.publish(KVEventBatch(ts=time.time(), events=[stored([11, 12], None, list(range(8)))]))
pub.publish(KVEventBatch(ts=time.time(), events=[stored([b"\\x01" * 32], 12, list(range(8, 12)), "cpu")]))
pub.publish(KVEventBatch(ts=time.time(), events=[stored([21], None, [7, 7, 7, 7]), BlockRemoved(
    block_hashes=[21], medium="GPU")]))
time.sleep(0.5)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(400):  # seq 3.. until the test closes our stdin
    pub.publish(KVEventBatch(ts=time.time(), events=[stored([31], None, [9, 9, 9, 9])]))
    if select.select([sys.stdin], [], [], 0.05)[0] and not sys.stdin.readline():
        break
pub.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not VENV_PY.exists(), reason="real tier venv not installed")
async def test_vllm_publisher_to_kvgate_index_with_replay() -> None:
    port, replay_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        str(VENV_PY),
        "-c",
        PUBLISHER,
        f"tcp://127.0.0.1:{port}",
        f"tcp://127.0.0.1:{replay_port}",
        "kv.engine-a",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    ctx = zmq.asyncio.Context()
    index = BlockIndex()
    sub = KVEventSubscriber(
        index,
        [EventSource("engine-a", topic="kv.engine-a", replay_endpoint=f"tcp://127.0.0.1:{replay_port}")],
        bind=f"tcp://127.0.0.1:{port}",
        context=ctx,
        replay_timeout=2.0,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line.strip() == b"ready"
        await sub.start()
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        for _ in range(400):
            if sub.stats.batches >= 4:
                break
            await asyncio.sleep(0.025)
        assert sub.stats.replayed_batches >= 3  # seq 0..2 came from vLLM's replay ROUTER
        assert sub.stats.decode_errors == 0 and sub.stats.skipped_events == 0
        assert index.match(list(range(12))) == {"engine-a": 12}  # GPU 8 tokens + the cpu block on top
        assert index.match(list(range(12)), media=["GPU"]) == {"engine-a": 8}
        assert index.match([7, 7, 7, 7]) == {}  # stored then removed
        assert index.match([9, 9, 9, 9]) == {"engine-a": 4}
    finally:
        await sub.stop()
        ctx.destroy(linger=0)
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "real", "-q"]))
