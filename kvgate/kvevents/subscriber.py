"""An asyncio ZMQ subscriber that feeds vLLM KV-cache events into a ``BlockIndex``.

Two modes (both may be used at once):
- **bind**: one SUB socket bound at ``bind`` (e.g. ``tcp://127.0.0.1:5557``); every engine started with that
  non-wildcard endpoint connects its PUB to it. ZMQ does not tell a SUB who sent a message, so each engine
  must publish under its own topic (``"topic": "kv.engine-a"`` in ``--kv-events-config``) and
  ``EventSource.topic`` maps the topic to the instance. Messages under an unmapped topic are counted
  (``unknown_source``) and ignored.
- **connect**: for every ``EventSource`` with an ``endpoint`` (engines started with a wildcard endpoint such as
  ``tcp://*:5557`` bind their PUB), one SUB socket connects to it; the socket identifies the instance.

Per source (instance, data-parallel rank) the sequence number is tracked:
- ``seq == last + 1``: applied;
- ``seq <= last`` and the same as before: a duplicate, ignored; lower: the engine restarted (vLLM's sequence
  starts again at 0 in a new process), so the instance's blocks are forgotten before the batch is applied;
- ``seq > last + 1``: a gap. With the source's ``replay_endpoint`` set, the missing batches are fetched from
  vLLM's replay ROUTER (DEALER, ``[b"", start_seq]``) and applied first; otherwise, or when the replay fails
  or no longer holds them, the gap is counted (``missed_batches``) and the index keeps what it has.
- The first batch from a source with a replay endpoint triggers a replay from 0, so a gateway started after
  its engines learns the blocks they announced before (up to vLLM's ``buffer_steps``).

Silence is normal (an idle engine publishes nothing), so this module never expires a source by itself:
the cluster's health checks call ``forget_instance`` for an engine that is gone. ``idle_seconds`` exposes the
time since each instance's last batch for such a policy and for the event-lag metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from kvgate.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    KVEventBatch,
    WireError,
    decode_message,
    is_replay_end,
    replay_request,
)
from kvgate.routing.block_index import BlockIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EventSource:
    instance: str
    topic: str = ""  # bind mode: the engine's topic (unique per engine); connect mode: a subscription prefix
    endpoint: str | None = None  # connect mode: the engine's PUB endpoint, e.g. tcp://127.0.0.1:5557
    replay_endpoint: str | None = None  # the engine's replay ROUTER, e.g. tcp://127.0.0.1:5560


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    events: int = 0
    decode_errors: int = 0
    skipped_events: int = 0  # unknown event types / malformed events inside good batches
    unknown_source: int = 0
    duplicates: int = 0
    restarts: int = 0
    gaps: int = 0
    missed_batches: int = 0  # lost for good (no replay, replay failed or buffer too short)
    replayed_batches: int = 0
    replay_failures: int = 0
    last_batch_at: dict[str, float] = field(default_factory=dict)  # instance -> monotonic time
    last_event_ts: dict[str, float] = field(default_factory=dict)  # instance -> publisher's wall-clock ts


class _LogOnce:
    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, kind: str, msg: str, *args: object) -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning(msg + " (logged once; see the subscriber's counters)", *args)


class KVEventSubscriber:
    def __init__(
        self,
        index: BlockIndex,
        sources: Iterable[EventSource],
        *,
        bind: str | None = None,
        replay_timeout: float = 0.5,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.bind = bind
        self.replay_timeout = replay_timeout
        self.stats = SubscriberStats()
        self.sources: dict[str, EventSource] = {}
        self._topics: dict[bytes, str] = {}
        self._set_sources(sources)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._clock = clock
        self._seq: dict[tuple[str, int | None], int] = {}
        self._streams: dict[str | None, tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = {}  # None: bind socket
        self._started = False
        self._log_once = _LogOnce()
        self.bound_endpoint: str | None = None

    def _set_sources(self, sources: Iterable[EventSource]) -> None:
        new = {s.instance: s for s in sources}
        topics = {s.topic.encode(): s.instance for s in new.values()}
        if self.bind is not None and len(topics) != len(new):
            raise ValueError("bind mode needs a distinct topic per event source")
        self.sources = new
        self._topics = topics if self.bind is not None else {}

    # --- lifecycle ---

    def _open(self, key: str | None, sock: zmq.asyncio.Socket) -> None:
        task = asyncio.create_task(self._recv_loop(sock, key), name=f"kvevents-{key or 'bind'}")
        self._streams[key] = (sock, task)

    async def _close(self, key: str | None) -> None:
        sock, task = self._streams.pop(key)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close(linger=0)

    def _connect(self, src: EventSource) -> None:
        if src.endpoint is None or self.bind is not None:
            return
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, src.topic.encode())
        try:
            sock.connect(src.endpoint)
        except zmq.ZMQError:  # a malformed endpoint: do not leak the socket
            sock.close(linger=0)
            raise
        self._open(src.instance, sock)

    async def start(self) -> None:
        self._started = True
        if self.bind is not None:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                sock.bind(self.bind)
            except zmq.ZMQError:  # address in use, bad endpoint: do not leak the socket
                sock.close(linger=0)
                raise
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._open(None, sock)
        for src in self.sources.values():
            self._connect(src)

    async def stop(self) -> None:
        self._started = False
        for key in list(self._streams):
            await self._close(key)

    async def update_sources(self, sources: Iterable[EventSource]) -> None:
        """The cluster changed: forget instances that left, (re)connect new or moved ones."""
        old = self.sources
        self._set_sources(sources)
        for instance, src in old.items():
            now = self.sources.get(instance)
            if now is None or now.endpoint != src.endpoint or now.topic != src.topic:
                if instance in self._streams:
                    await self._close(instance)
                self.forget_instance(instance)
        if self._started:
            for instance, src in self.sources.items():
                if instance not in self._streams:
                    self._connect(src)

    def forget_instance(self, instance: str) -> int:
        """An engine left the cluster or was declared dead: drop its blocks and sequence state."""
        for key in [k for k in self._seq if k[0] == instance]:
            del self._seq[key]
        self.stats.last_batch_at.pop(instance, None)
        return self.index.clear_instance(instance)

    def idle_seconds(self, instance: str) -> float | None:
        last = self.stats.last_batch_at.get(instance)
        return None if last is None else self._clock() - last

    # --- receiving ---

    async def _recv_loop(self, sock: zmq.asyncio.Socket, instance: str | None) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                await self.on_message(frames, instance)
            except Exception:  # a bug here must not kill the stream for every other engine
                self._log_once("handler", "KV event handler failed")
                log.debug("KV event handler failed", exc_info=True)

    async def on_message(self, frames: list[bytes], instance: str | None) -> None:
        """One ``[topic, seq, payload]`` message; ``instance`` is None in bind mode (resolved by topic)."""
        try:
            msg = decode_message(frames)
        except WireError as exc:
            self.stats.decode_errors += 1
            self._log_once("decode", "undecodable KV event message: %s", exc)
            return
        if instance is None:
            instance = self._topics.get(msg.topic)
            if instance is None:
                self.stats.unknown_source += 1
                self._log_once("unknown", "KV events under an unmapped topic are ignored (%d bytes)", len(msg.topic))
                return
        key = (instance, msg.batch.data_parallel_rank)
        last = self._seq.get(key)
        if last is not None and msg.seq == last:
            self.stats.duplicates += 1
            return
        if last is not None and msg.seq < last:
            self.stats.restarts += 1
            self.index.clear_instance(instance)
            last = None
            self._seq.pop(key, None)
        replay = self.sources[instance].replay_endpoint if instance in self.sources else None
        if last is None and replay is not None and msg.seq > 0:
            await self._replay(instance, key, replay, 0, msg.seq, count_gap=False)
        elif last is not None and msg.seq > last + 1:
            self.stats.gaps += 1
            if replay is None:
                self.stats.missed_batches += msg.seq - last - 1
                self._log_once("gap", "KV event gap with no replay endpoint: index may be stale")
            else:
                await self._replay(instance, key, replay, last + 1, msg.seq, count_gap=True)
        self._apply(instance, key, msg)

    def _apply(self, instance: str, key: tuple[str, int | None], msg: DecodedBatch) -> None:
        self._seq[key] = msg.seq
        self.stats.batches += 1
        self.stats.skipped_events += msg.skipped_events
        self.stats.last_batch_at[instance] = self._clock()
        self.stats.last_event_ts[instance] = msg.batch.ts
        apply_batch(self.index, instance, msg.batch)
        self.stats.events += len(msg.batch.events)

    async def _replay(
        self, instance: str, key: tuple[str, int | None], endpoint: str, start: int, stop: int, *, count_gap: bool
    ) -> None:
        """Fetch and apply batches ``start <= seq < stop`` from the engine's replay ROUTER."""
        got: list[DecodedBatch] = []
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            await sock.send_multipart(replay_request(start))
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), self.replay_timeout)
                body = frames[1:] if frames and frames[0] == b"" else frames
                if is_replay_end(body):
                    break
                msg = decode_message(body)
                if start <= msg.seq < stop and msg.batch.data_parallel_rank == key[1]:
                    got.append(msg)
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            self.stats.replay_failures += 1
            self._log_once("replay", "KV event replay failed: %s", type(exc).__name__)
        finally:
            sock.close(linger=0)
        got.sort(key=lambda m: m.seq)
        for msg in got:
            self._apply(instance, key, msg)
        self.stats.replayed_batches += len(got)
        if count_gap:
            self.stats.missed_batches += (stop - start) - len({m.seq for m in got})


def apply_batch(index: BlockIndex, instance: str, batch: KVEventBatch) -> None:
    """Apply one batch's events to the index, in order (shared by the subscriber and the simulator)."""
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            index.apply_stored(instance, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.medium)
        elif isinstance(ev, BlockRemoved):
            index.apply_removed(instance, ev.block_hashes, ev.medium)
        elif isinstance(ev, AllBlocksCleared):
            index.clear_instance(instance)
