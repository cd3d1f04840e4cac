"""The kvcache filter's event index: KV-event subscribers feeding an aging ``BlockIndex`` (issue 9).

``index_source: events | both`` builds one :class:`EventIndex`. It owns
- an :class:`~kvgate.routing.aging_index.AgingBlockIndex` (GPU entries exact; non-GPU entries and ``/lookup``
  hints expire after ``kv_events.cpu_ttl`` / ``kv_events.hint_ttl``);
- up to two :class:`~kvgate.kvevents.KVEventSubscriber`: one bound at ``kv_events.bind`` for the sources named
  by topic (engines connect), one connecting to every source with an ``endpoint`` (engines bind);
- a maintenance task (every ``MAINTENANCE_INTERVAL``): expires aged entries and exports the index size, the
  event lag and the subscriber / index counters; drops are logged once per interval (rate-limited).

The request path only calls :meth:`match` (pure, in-memory): no controller call, no I/O. Per request key (LRU,
the token cache's size) a prompt's block chain keys are memoized, and so is its last answer, stamped with the
index's ``version`` (bumped by every change that can alter an answer: a holder added or dropped by a store, a
removal, a clear, an expiry). A repeated prompt on an unchanged index costs one dict lookup; after a change it
walks the memoized chain keys (dict lookups, no hashing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

import zmq

from kvgate.errors import ConfigError
from kvgate.filters.kvcache.config import KVEventsConfig
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.kvevents import EventSource, KVEventSubscriber, SubscriberStats
from kvgate.routing.aging_index import HINT_MEDIUM, AgingBlockIndex

log = logging.getLogger("kvgate.filters.kvcache")

MAINTENANCE_INTERVAL = 1.0  # seconds
DEFAULT_MEMO_SIZE = 4096  # prompts whose block chain keys are memoized (8 bytes a block: 4 KB for 8k tokens)
_SUB_KINDS = tuple(f.name for f in dataclasses.fields(SubscriberStats))
# Drops worth a (rate-limited) WARNING; the subscriber itself logs decode errors, unknown topics, gaps, replays.
_INDEX_DROPS = {
    "orphan_events": "KV events whose parent block is unknown were not indexed",
    "token_mismatch_events": "KV events whose token count disagrees with their blocks were not indexed",
    "refused_blocks": "event index full (kv_events.max_blocks): blocks refused",
    "refused_sizes": "KV events of too many distinct block sizes were refused",
}


@dataclasses.dataclass(slots=True)
class _Memo:
    chains: dict[int, array[int]]  # block size -> the prompt's chain keys
    version: int = -1  # index version the answer below was computed at (-1: none yet)
    answer: dict[str, int] = dataclasses.field(default_factory=dict)


class EventIndex:
    def __init__(
        self,
        cfg: KVEventsConfig,
        metrics: KVCacheMetrics,
        events: FilterEvents,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        interval: float = MAINTENANCE_INTERVAL,
        memo_size: int = DEFAULT_MEMO_SIZE,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.events = events
        self._wall = wall
        self.interval = interval
        self.index = AgingBlockIndex(
            {"*": cfg.cpu_ttl, HINT_MEDIUM: cfg.hint_ttl}, max_blocks=cfg.max_blocks, clock=clock
        )
        by_topic = [
            EventSource(s.instance, topic=s.topic, replay_endpoint=s.replay_endpoint)
            for s in cfg.sources
            if s.endpoint is None
        ]
        by_endpoint = [
            EventSource(s.instance, topic=s.topic, endpoint=s.endpoint, replay_endpoint=s.replay_endpoint)
            for s in cfg.sources
            if s.endpoint is not None
        ]
        self.subscribers: list[KVEventSubscriber] = []
        if cfg.bind is not None:
            self.subscribers.append(
                KVEventSubscriber(self.index, by_topic, bind=cfg.bind, replay_timeout=cfg.replay_timeout, clock=clock)
            )
        if by_endpoint:
            self.subscribers.append(
                KVEventSubscriber(self.index, by_endpoint, replay_timeout=cfg.replay_timeout, clock=clock)
            )
        self.instances = [s.instance for s in cfg.sources]
        self._seen: dict[str, int] = {}
        self.memo_size = memo_size
        self._memo: OrderedDict[str, _Memo] = OrderedDict()  # request key -> chain keys + last answer
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        for sub in self.subscribers:
            try:
                await sub.start()
            except zmq.ZMQError as exc:  # address in use, bad endpoint: name the key
                await self.close()
                path = "kv_events.bind" if sub.bind is not None else "kv_events.sources"
                raise ConfigError(path, f"[kvcache] {path}: cannot open the KV-event socket: {exc}") from None
            if sub.bound_endpoint:
                log.info("[kvcache] KV events: bound %s for %d engine(s)", sub.bound_endpoint, len(sub.sources))
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="kvcache-event-index")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sub in self.subscribers:
            await sub.stop()

    @property
    def bound_endpoint(self) -> str | None:
        """The bind-mode socket's actual endpoint (``tcp://127.0.0.1:*`` resolves to a port)."""
        for sub in self.subscribers:
            if sub.bound_endpoint:
                return sub.bound_endpoint
        return None

    # --- request path ---

    def min_block_tokens(self) -> int | None:
        """The smallest block size in the index (a prompt shorter than this cannot match); None when empty."""
        sizes = self.index.block_sizes
        return sizes[0] if sizes else None

    def max_block_tokens(self) -> int | None:
        """The largest block size in the index; None when empty."""
        sizes = self.index.block_sizes
        return sizes[-1] if sizes else None

    def spread_tokens(self) -> int:
        return self.cfg.spread_tokens or (self.min_block_tokens() or 0)

    def match(self, tokens: Sequence[int], key: str | None = None) -> dict[str, int]:
        """Each instance's longest held prefix; the last token is left out (vLLM recomputes it). With the
        request ``key`` (whose tokens must not change: :meth:`forget_tokens`) the prompt's block chain keys and
        the answer are memoized; the answer is reused while the index's ``version`` is unchanged."""
        t0 = time.perf_counter()
        try:
            if key is None:
                return self.index.match(tokens, limit=len(tokens) - 1)
            memo = self._memo.get(key)
            if memo is None:
                memo = self._memo[key] = _Memo({})
                if len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
            else:
                self._memo.move_to_end(key)
                if memo.version == self.index.version:
                    return dict(memo.answer)
            answer = self.index.match_chains(tokens, memo.chains, limit=len(tokens) - 1)
            memo.version, memo.answer = self.index.version, answer
            return dict(answer)
        finally:
            self.metrics.match_latency.observe(time.perf_counter() - t0)

    def forget_tokens(self, key: str) -> None:
        """The tokens cached for ``key`` were replaced: drop its memoized chain keys and answer."""
        self._memo.pop(key, None)

    # --- background ---

    def add_hint(self, instance: str, tokens: Sequence[int], chunk_tokens: int) -> int:
        return self.index.add_hint(instance, tokens, chunk_tokens)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sub in self.subscribers:
            for kind in _SUB_KINDS:
                value = getattr(sub.stats, kind)
                if isinstance(value, int):
                    out[kind] = out.get(kind, 0) + value
        for f in dataclasses.fields(self.index.stats):
            out[f.name] = getattr(self.index.stats, f.name)
        out["aged_out"] = self.index.aged_out
        out["hints"] = self.index.hints
        return out

    def maintain(self) -> None:
        """Expire aged entries, export gauges and counter deltas, log new drops (rate-limited)."""
        self.index.expire()
        m = self.metrics
        m.index_blocks.set(len(self.index))
        for medium, n in self.index.media_entries().items():
            m.index_entries.labels(medium).set(n)
        now = self._wall()
        for sub in self.subscribers:
            for instance, ts in sub.stats.last_event_ts.items():
                m.event_lag.labels(instance).set(max(0.0, now - ts))
        for kind, value in self.counters().items():
            delta = value - self._seen.get(kind, 0)
            if delta > 0:
                m.kv_events.labels(kind).inc(delta)
                if kind in _INDEX_DROPS:
                    self.events.warn(f"kv_{kind}", "[kvcache] %s (%d)", _INDEX_DROPS[kind], delta)
            self._seen[kind] = value

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.maintain()
            except Exception as exc:  # never let a bug stop expiry
                self.events.warn("index_maintenance", "[kvcache] event index maintenance failed: %s", exc)
