"""Test support for event-routed kvcache tests: the simulator's tokenizer directory and a real ZMQ publisher."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq
import zmq.asyncio

from kvgate.kvevents.wire import BlockStored, KVEventBatch, encode_message
from kvgate_sim.tokenizer import tokenizer_dir

_hashes = itertools.count(1)


def sim_tokenizer_dir() -> Path:
    """The simulator's HF tokenizer directory (shipped as package data of kvgate_sim)."""
    return tokenizer_dir()


class Publisher:
    """One engine's PUB socket: ``connect`` to the gateway's bind endpoint, or ``bind`` (the gateway connects)."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: str) -> None:
        self.topic = topic.encode()
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.seq = 0
        self.endpoint = ""

    def connect(self, endpoint: str) -> Publisher:
        self.sock.connect(endpoint)
        return self

    def bind(self) -> Publisher:
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self

    async def store(
        self,
        tokens: Sequence[int],
        seen: Callable[[], int],
        *,
        block_size: int = 16,
        medium: str = "GPU",
    ) -> None:
        """Publish a ``BlockStored`` of every full block of ``tokens`` and wait until the gateway applied it
        (ZMQ drops PUB messages until the connection is up, so the same sequence is resent: duplicates are
        ignored by the subscriber)."""
        n = len(tokens) // block_size
        ev = BlockStored(
            block_hashes=[next(_hashes) for _ in range(n)],
            parent_block_hash=None,
            token_ids=list(tokens[: n * block_size]),
            block_size=block_size,
            medium=medium,
        )
        frames = encode_message(self.topic, self.seq, KVEventBatch(ts=1.0, events=[ev]))
        self.seq += 1
        before = seen()
        for _ in range(500):
            await self.sock.send_multipart(frames)
            await asyncio.sleep(0.01)
            if seen() > before:
                return
        raise AssertionError("the gateway never applied the batch")

    def close(self) -> None:
        self.sock.close(linger=0)
