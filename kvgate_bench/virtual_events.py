"""The gateway's KV-event index, as the virtual-time runner models it (TEST AND BENCHMARK TOOL).

The virtual runner keeps prompts as hash chains only (no token ids), so it cannot feed kvgate's
:class:`~kvgate.routing.block_index.BlockIndex` (which rebuilds its keys from the events' token ids). Both key
blocks by a chain over the prefix, so a prefix held in the engine's cache is matched identically by either
(``tests/sim/test_kv_events.py`` proves the real index reproduces the engines' caches over real ZMQ). This
model therefore indexes the engines' own chained hashes, applies the same events in the same order (one batch
per engine step, applied when the step is computed, no transport delay) and answers each instance's longest
held prefix over both tiers, as ``BlockIndex.match(ids, limit=len(ids) - 1)`` does. Stale CPU entries (LMCache
in-process mode announces no CPU eviction) are kept, as in the gateway. The lookup costs nothing in virtual
time (the gateway's in-process match is ~0.2 ms, see docs/local-routing.md).
"""

from __future__ import annotations

from kvgate.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvgate_sim.engine_model import Prompt
from kvgate_sim.kv_events import u64


class HashEventIndex:
    """instance holders per (block size, engine hash), fed by the simulated engines' KV events."""

    def __init__(self, block_size: int = 16, chunk_size: int = 256) -> None:
        self.block_size = block_size
        self.chunk_size = chunk_size
        self._holders: dict[int, dict[int, set[str]]] = {}  # block size -> hash -> instances
        self._owned: dict[str, dict[int, int]] = {}  # instance -> hash -> block size
        self.events = 0

    def apply(self, instance: str, events: list[KVEvent]) -> None:
        owned = self._owned.setdefault(instance, {})
        for ev in events:
            self.events += 1
            if isinstance(ev, BlockStored):
                table = self._holders.setdefault(ev.block_size, {})
                for h in ev.block_hashes:
                    assert isinstance(h, int)
                    table.setdefault(h, set()).add(instance)
                    owned[h] = ev.block_size
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert isinstance(h, int)
                    size = owned.pop(h, None)
                    if size is not None:
                        self._drop(size, h, instance)
            elif isinstance(ev, AllBlocksCleared):
                for h, size in owned.items():
                    self._drop(size, h, instance)
                owned.clear()

    def _drop(self, size: int, h: int, instance: str) -> None:
        table = self._holders.get(size, {})
        holders = table.get(h)
        if holders is not None:
            holders.discard(instance)
            if not holders:
                del table[h]

    def _walk(self, hashes: list[int], unit: int, limit: int, best: dict[str, int]) -> None:
        table = self._holders.get(unit)
        if not table:
            return
        active: set[str] | None = None
        matched = 0
        for i in range(min(len(hashes), limit // unit)):
            holders = table.get(u64(hashes[i]))
            if not holders:
                break
            if active is None:
                active = set(holders)
            elif not holders >= active:
                for gone in active - holders:
                    best[gone] = max(best.get(gone, 0), matched)
                active &= holders
            if not active:
                break
            matched = (i + 1) * unit
        for inst in active or ():
            best[inst] = max(best.get(inst, 0), matched)

    def match(self, prompt: Prompt) -> dict[str, int]:
        """Each instance's longest held prefix in tokens over both tiers (the last token is never counted)."""
        limit = prompt.num_tokens - 1
        best: dict[str, int] = {}
        self._walk(prompt.block_hashes(self.block_size), self.block_size, limit, best)
        self._walk(prompt.chunk_hashes(self.chunk_size), self.chunk_size, limit, best)
        return {i: t for i, t in best.items() if t > 0}
