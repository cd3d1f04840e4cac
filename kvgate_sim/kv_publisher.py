"""SIMULATOR: publish an engine's KV-cache events on ZMQ exactly as vLLM 0.32's ``ZmqEventPublisher`` does.

* ``endpoint`` with a wildcard (``tcp://*:N``, ``tcp://127.0.0.1:*``, ``::``) or ``ipc://`` / ``inproc://``: the
  engine **binds** its PUB socket; any other ``tcp://host:port``: the engine **connects** its PUB there (the
  gateway binds one SUB for every engine and tells them apart by ``topic``).
* Each batch is the 3-frame multipart ``[topic, seq (8 bytes unsigned big-endian), msgpack KVEventBatch]``,
  encoded with :func:`kvgate.kvevents.wire.encode_message`; ``seq`` counts from 0 per process.
* ``replay_endpoint``: a ROUTER socket (always bound) that answers ``[b"", start_seq]`` with every buffered
  ``[b"", topic, seq, payload]`` with ``seq >= start_seq`` and then the end marker (``seq == -1``). The last
  ``buffer_steps`` batches are kept.
* As with vLLM's publisher, PUB/SUB drops what is sent before the subscription has reached the PUB (the first
  batches after a connect are typically lost); subscribers recover them from the replay endpoint.

A port ``*`` (ZMQ's wildcard port) binds an ephemeral port; :attr:`KVEventPublisher.bound` reports the
actual addresses (``GET /kv_event_sources`` shows them). ``publish`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

import zmq
import zmq.asyncio

from kvgate.kvevents.wire import KVEvent, KVEventBatch, encode_message
from kvgate.kvevents.wire import replay_end_message as _end_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config`` (the keys the simulator honours; vLLM 0.32 defaults)."""

    enable_kv_cache_events: bool = True
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    topic: str = ""
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVEventsConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"max_queue_size"})
        if unknown:
            raise ValueError(f"kv-events-config: unknown key(s) {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if cfg.publisher not in ("zmq", "null"):
            raise ValueError(f"kv-events-config: publisher must be 'zmq' or 'null', got {cfg.publisher!r}")
        if not isinstance(cfg.buffer_steps, int) or cfg.buffer_steps < 1:
            raise ValueError("kv-events-config: buffer_steps must be a positive integer")
        return cfg

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard or an ipc/inproc endpoint is bound by the engine; any other tcp one connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """One engine's PUB socket (+ replay ROUTER). ``start()`` in the event loop, ``publish(events)`` per step."""

    def __init__(self, config: KVEventsConfig) -> None:
        self.config = config
        self._sync_ctx = zmq.Context.instance()  # PUB: plain non-blocking sends, from any thread (under the lock)
        self._ctx = zmq.asyncio.Context.instance()  # replay ROUTER: served by an asyncio task
        self._topic = config.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, list[bytes]]] = deque(maxlen=config.buffer_steps)
        self._lock = threading.Lock()
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.bound: KVEventsConfig = config
        self.published = 0

    def start(self) -> None:
        cfg = self.config
        pub: zmq.Socket[bytes] = self._sync_ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        endpoint = cfg.endpoint
        if engine_binds(cfg.endpoint):
            pub.bind(cfg.endpoint)
            endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            pub.connect(cfg.endpoint)
        self._pub = pub
        replay = cfg.replay_endpoint
        if replay is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay)
            replay = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._router = router
            self._task = asyncio.get_running_loop().create_task(self._serve_replay(router), name="kv-events-replay")
        self.bound = replace(cfg, endpoint=endpoint, replay_endpoint=replay)

    def publish(self, events: list[KVEvent]) -> None:
        """One scheduler step's events as one batch (never blocks: PUB drops beyond its high-water mark)."""
        if not events:
            return
        with self._lock:
            seq = self._seq
            self._seq += 1
            frames = encode_message(self._topic, seq, KVEventBatch(time.time(), list(events), None))
            self._buffer.append((seq, frames))
            if self._pub is not None:
                with contextlib.suppress(zmq.Again, zmq.ZMQError):
                    self._pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.published += 1

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.debug("malformed replay request ignored")
                continue
            ident, start = frames[0], int.from_bytes(frames[2], "big")
            with self._lock:
                todo = [f for s, f in self._buffer if s >= start]
            for f in todo:
                await router.send_multipart([ident, b"", *f])
            await router.send_multipart([ident, b"", *_end_frames()])

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with self._lock:
            if self._pub is not None:
                self._pub.close(linger=0)
            if self._router is not None:
                self._router.close(linger=0)
            self._pub = self._router = None
