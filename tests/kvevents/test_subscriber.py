"""The ZMQ subscriber over real loopback sockets: bind and connect modes, gaps + replay, restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from kvgate.kvevents.subscriber import EventSource, KVEventSubscriber
from kvgate.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    encode_message,
    encode_payload,
    replay_end_message,
)
from kvgate.routing.block_index import BlockIndex

BS = 4
TOKENS = list(range(100, 116))  # 4 blocks


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, medium: str = "GPU") -> BlockStored:
    return BlockStored(
        block_hashes=list[int | bytes](hashes), parent_block_hash=parent, token_ids=tokens, block_size=BS, medium=medium
    )


def batch(*events: BlockStored | BlockRemoved | AllBlocksCleared) -> KVEventBatch:
    return KVEventBatch(ts=1.0, events=list(events))


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


async def publish_until_seen(pub: zmq.asyncio.Socket, sub: KVEventSubscriber, frames: list[bytes]) -> None:
    """ZMQ drops PUB messages until the connection is up: resend (duplicates are ignored) until seen."""
    before = sub.stats.batches
    for _ in range(500):
        await pub.send_multipart(frames)
        await asyncio.sleep(0.01)
        if sub.stats.batches > before:
            return
    raise AssertionError("subscriber never received the message")


async def test_bind_mode_one_socket_many_engines_by_topic(ctx: zmq.asyncio.Context) -> None:
    index = BlockIndex()
    sub = KVEventSubscriber(
        index,
        [EventSource("engine-a", topic="kv.a"), EventSource("engine-b", topic="kv.b")],
        bind="tcp://127.0.0.1:0",
        context=ctx,
    )
    await sub.start()
    pubs: list[zmq.asyncio.Socket] = []
    try:
        assert sub.bound_endpoint is not None
        for _ in range(3):
            pub = ctx.socket(zmq.PUB)
            pub.connect(sub.bound_endpoint)  # what vLLM does with a non-wildcard endpoint
            pubs.append(pub)
        await publish_until_seen(pubs[0], sub, encode_message(b"kv.a", 0, batch(stored([1, 2, 3, 4], TOKENS))))
        await publish_until_seen(pubs[1], sub, encode_message(b"kv.b", 0, batch(stored([9, 8], TOKENS[:8]))))
        assert index.match(TOKENS) == {"engine-a": 16, "engine-b": 8}
        # an engine not in the cluster: counted and ignored
        for _ in range(300):
            await pubs[2].send_multipart(encode_message(b"kv.stranger", 0, batch(stored([5], TOKENS[:4]))))
            await asyncio.sleep(0.01)
            if sub.stats.unknown_source:
                break
        assert sub.stats.unknown_source >= 1
        assert set(index.match(TOKENS)) == {"engine-a", "engine-b"}
    finally:
        for pub in pubs:
            pub.close(linger=0)
        await sub.stop()


async def test_connect_mode_one_socket_per_engine(ctx: zmq.asyncio.Context) -> None:
    pub_a, pub_b = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    port_a = pub_a.bind_to_random_port("tcp://127.0.0.1")  # what vLLM does with tcp://*:port
    port_b = pub_b.bind_to_random_port("tcp://127.0.0.1")
    index = BlockIndex()
    sub = KVEventSubscriber(
        index,
        [
            EventSource("a", topic="kv", endpoint=f"tcp://127.0.0.1:{port_a}"),
            EventSource("b", topic="kv", endpoint=f"tcp://127.0.0.1:{port_b}"),
        ],
        context=ctx,
    )
    await sub.start()
    try:
        # the same topic and sequence numbers on both engines: the socket tells them apart
        await publish_until_seen(pub_a, sub, encode_message(b"kv", 0, batch(stored([1, 2], TOKENS[:8]))))
        await publish_until_seen(pub_b, sub, encode_message(b"kv", 0, batch(stored([1, 2, 3], TOKENS[:12]))))
        assert index.match(TOKENS) == {"a": 8, "b": 12}
        await publish_until_seen(pub_b, sub, encode_message(b"kv", 1, batch(BlockRemoved(block_hashes=[3]))))
        assert index.match(TOKENS) == {"a": 8, "b": 8}
        await publish_until_seen(pub_a, sub, encode_message(b"kv", 1, batch(AllBlocksCleared())))
        assert index.match(TOKENS) == {"b": 8}
    finally:
        await sub.stop()
        pub_a.close(linger=0)
        pub_b.close(linger=0)


class ReplayServer:
    """vLLM's replay ROUTER protocol: ``[id, b"", start]`` in; ``[id, b"", topic, seq, payload]``... then end."""

    def __init__(self, ctx: zmq.asyncio.Context, buffer: dict[int, KVEventBatch]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.buffer = buffer
        self.requests: list[int] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            client, _, start = await self.sock.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.requests.append(start_seq)
            for seq in sorted(self.buffer):
                if seq >= start_seq:
                    await self.sock.send_multipart(
                        [client, b"", b"kv", seq.to_bytes(8, "big"), encode_payload(self.buffer[seq])]
                    )
            await self.sock.send_multipart([client, b"", *replay_end_message()])

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close(linger=0)


async def test_gap_is_filled_from_the_replay_endpoint(ctx: zmq.asyncio.Context) -> None:
    history = {
        0: batch(stored([1], TOKENS[:4])),
        1: batch(stored([2], TOKENS[4:8], parent=1)),
        2: batch(stored([3], TOKENS[8:12], parent=2)),
        3: batch(stored([4], TOKENS[12:16], parent=3)),
    }
    replay = ReplayServer(ctx, history)
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a", replay_endpoint=f"tcp://127.0.0.1:{replay.port}")], context=ctx)
    try:
        await sub.on_message(encode_message(b"kv", 0, history[0]), "a")
        assert replay.requests == []  # seq 0 first: nothing to catch up
        # seq 1 and 2 were lost: without the replay, block 4's parent would be unknown (orphan)
        await sub.on_message(encode_message(b"kv", 3, history[3]), "a")
        assert replay.requests == [1]
        assert sub.stats.gaps == 1
        assert sub.stats.replayed_batches == 2
        assert sub.stats.missed_batches == 0
        assert index.match(TOKENS) == {"a": 16}
        assert index.stats.orphan_events == 0
    finally:
        await replay.close()


async def test_late_subscriber_catches_up_from_replay(ctx: zmq.asyncio.Context) -> None:
    history = {0: batch(stored([1], TOKENS[:4])), 1: batch(stored([2], TOKENS[4:8], parent=1))}
    replay = ReplayServer(ctx, history)
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a", replay_endpoint=f"tcp://127.0.0.1:{replay.port}")], context=ctx)
    try:
        await sub.on_message(encode_message(b"kv", 2, batch(stored([3], TOKENS[8:12], parent=2))), "a")
        assert replay.requests == [0]
        assert index.match(TOKENS) == {"a": 12}
        assert sub.stats.gaps == 0
    finally:
        await replay.close()


async def test_gap_without_replay_is_counted(ctx: zmq.asyncio.Context) -> None:
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a")], context=ctx)
    await sub.on_message(encode_message(b"kv", 0, batch(stored([1], TOKENS[:4]))), "a")
    await sub.on_message(encode_message(b"kv", 5, batch(stored([7], TOKENS[:4], medium="cpu"))), "a")
    assert (sub.stats.gaps, sub.stats.missed_batches) == (1, 4)
    assert index.match(TOKENS) == {"a": 4}


async def test_unreachable_replay_is_a_counted_failure(ctx: zmq.asyncio.Context) -> None:
    dead = ctx.socket(zmq.PUB)
    port = dead.bind_to_random_port("tcp://127.0.0.1")
    dead.close(linger=0)  # nothing listens there any more
    index = BlockIndex()
    sub = KVEventSubscriber(
        index, [EventSource("a", replay_endpoint=f"tcp://127.0.0.1:{port}")], replay_timeout=0.1, context=ctx
    )
    await sub.on_message(encode_message(b"kv", 0, batch(stored([1], TOKENS[:4]))), "a")
    await sub.on_message(
        encode_message(
            b"kv",
            3,
            batch(stored([4], TOKENS[:4])),
        ),
        "a",
    )
    assert sub.stats.replay_failures == 1
    assert sub.stats.missed_batches == 2
    assert sub.stats.batches == 2  # the current batch is still applied


async def test_engine_restart_forgets_old_blocks(ctx: zmq.asyncio.Context) -> None:
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a")], context=ctx)
    await sub.on_message(encode_message(b"kv", 0, batch(stored([1, 2, 3, 4], TOKENS))), "a")
    await sub.on_message(encode_message(b"kv", 1, batch(BlockRemoved(block_hashes=[4]))), "a")
    await sub.on_message(encode_message(b"kv", 1, batch(BlockRemoved(block_hashes=[3]))), "a")  # duplicate
    assert sub.stats.duplicates == 1
    assert index.match(TOKENS) == {"a": 12}
    # a new engine process starts counting at 0 again with an empty cache
    await sub.on_message(encode_message(b"kv", 0, batch(stored([50], TOKENS[:4]))), "a")
    assert sub.stats.restarts == 1
    assert index.match(TOKENS) == {"a": 4}


async def test_decode_errors_and_forget_instance(ctx: zmq.asyncio.Context) -> None:
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a")], context=ctx)
    await sub.on_message([b"kv", b"short"], "a")
    await sub.on_message([b"kv", b"\x00" * 8, b"\xc1"], "a")
    assert sub.stats.decode_errors == 2
    await sub.on_message(encode_message(b"kv", 7, batch(stored([1], TOKENS[:4]))), "a")
    assert sub.idle_seconds("a") is not None
    assert sub.forget_instance("a") == 1
    assert index.match(TOKENS) == {}
    assert sub.idle_seconds("a") is None


def test_bind_mode_needs_distinct_topics() -> None:
    with pytest.raises(ValueError, match="distinct topic"):
        KVEventSubscriber(
            BlockIndex(), [EventSource("a", topic="kv"), EventSource("b", topic="kv")], bind="tcp://127.0.0.1:0"
        )


async def test_update_sources_forgets_leavers_and_connects_newcomers(ctx: zmq.asyncio.Context) -> None:
    pub_a, pub_b = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    ep_a = f"tcp://127.0.0.1:{pub_a.bind_to_random_port('tcp://127.0.0.1')}"
    ep_b = f"tcp://127.0.0.1:{pub_b.bind_to_random_port('tcp://127.0.0.1')}"
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a", endpoint=ep_a)], context=ctx)
    await sub.start()
    try:
        await publish_until_seen(pub_a, sub, encode_message(b"kv", 0, batch(stored([1], TOKENS[:4]))))
        await sub.update_sources([EventSource("b", endpoint=ep_b)])  # a left the cluster, b joined
        assert index.match(TOKENS) == {}
        await publish_until_seen(pub_b, sub, encode_message(b"kv", 0, batch(stored([2, 3], TOKENS[:8]))))
        assert index.match(TOKENS) == {"b": 8}
        before = sub.stats.batches
        for seq in range(1, 20):  # a's socket is closed: nothing more from it reaches the index
            await pub_a.send_multipart(encode_message(b"kv", seq, batch(stored([9], TOKENS[:4]))))
        await asyncio.sleep(0.1)
        assert sub.stats.batches == before
        assert index.match(TOKENS) == {"b": 8}
    finally:
        await sub.stop()
        pub_a.close(linger=0)
        pub_b.close(linger=0)


async def test_bind_mode_update_sources_maps_new_topics(ctx: zmq.asyncio.Context) -> None:
    index = BlockIndex()
    sub = KVEventSubscriber(index, [EventSource("a", topic="kv.a")], bind="tcp://127.0.0.1:0", context=ctx)
    await sub.on_message(encode_message(b"kv.a", 0, batch(stored([1], TOKENS[:4]))), None)
    await sub.on_message(encode_message(b"kv.b", 0, batch(stored([2], TOKENS[:4]))), None)
    assert (index.match(TOKENS), sub.stats.unknown_source) == ({"a": 4}, 1)
    await sub.update_sources([EventSource("b", topic="kv.b")])
    await sub.on_message(encode_message(b"kv.a", 1, batch(stored([3], TOKENS[:4]))), None)
    await sub.on_message(encode_message(b"kv.b", 1, batch(stored([2], TOKENS[:4]))), None)
    assert (index.match(TOKENS), sub.stats.unknown_source) == ({"b": 4}, 2)
