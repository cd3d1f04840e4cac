"""A ``BlockIndex`` whose non-GPU entries expire: age limits for tiers that never report removals.

LMCache 0.5.6 publishes a ``BlockStored`` (medium ``cpu``) for every chunk it stores but never a removal when
it evicts one (docs/local-routing.md §4), so CPU-tier holders learned from events go stale. Holders learned
from the controller's ``/lookup`` (``add_hint``, medium ``LOOKUP``) are hints too. Every entry stored in a
medium other than GPU is therefore remembered with its store time; ``expire(now)`` removes those not stored
again within their medium's ttl (through the index's own ``apply_removed``). GPU entries are authoritative
(vLLM reports every eviction) and never age.

Pure: no I/O; the caller passes the clock (``clock``) and calls ``expire`` (the filter does so periodically).
"""

from __future__ import annotations

import time
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence

from kvgate.routing.block_index import BlockHash, BlockIndex, iter_chain_keys

HINT_MEDIUM = "LOOKUP"
_GPU = "GPU"


def _name(medium: str | None) -> str:
    return medium.upper() if medium else _GPU


class AgingBlockIndex(BlockIndex):
    def __init__(
        self,
        ttls: Mapping[str, float],
        *,
        max_blocks: int = 500_000,
        max_block_sizes: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ttls``: medium name -> seconds (0 = never). Media not listed use the ``"*"`` entry (default 0)."""
        super().__init__(max_blocks=max_blocks, max_block_sizes=max_block_sizes)
        self._ttls = {k.upper(): v for k, v in ttls.items()}
        self._clock = clock
        # instance -> (block_size, engine hash) -> (stored at, medium), oldest first
        self._aging: dict[str, OrderedDict[tuple[int, BlockHash], tuple[float, str]]] = {}
        self.aging_counts: Counter[str] = Counter()  # entries per aging medium
        self.aged_out = 0
        self.hints = 0

    def ttl(self, medium: str | None) -> float:
        name = _name(medium)
        if name == _GPU:
            return 0.0
        return self._ttls.get(name, self._ttls.get("*", 0.0))

    def apply_stored(
        self,
        instance: str,
        block_hashes: Sequence[BlockHash],
        parent_block_hash: BlockHash | None,
        token_ids: Sequence[int],
        block_size: int,
        medium: str | None = None,
    ) -> int:
        done = super().apply_stored(instance, block_hashes, parent_block_hash, token_ids, block_size, medium)
        if done and self.ttl(medium) > 0:
            name = _name(medium)
            now = self._clock()
            aging = self._aging.setdefault(instance, OrderedDict())
            for h in block_hashes[:done]:
                k = (block_size, h)
                old = aging.pop(k, None)
                if old is None:
                    self.aging_counts[name] += 1
                else:
                    self.aging_counts[old[1]] -= 1
                    self.aging_counts[name] += 1
                aging[k] = (now, name)
        return done

    def apply_removed(self, instance: str, block_hashes: Iterable[BlockHash], medium: str | None = None) -> int:
        hashes = list(block_hashes)
        aging = self._aging.get(instance)
        if aging:
            for h in hashes:
                for size in self.block_sizes:
                    old = aging.pop((size, h), None)
                    if old is not None:
                        self.aging_counts[old[1]] -= 1
        return super().apply_removed(instance, hashes, medium)

    def clear_instance(self, instance: str) -> int:
        for _, name in (self._aging.pop(instance, None) or {}).values():
            self.aging_counts[name] -= 1
        return super().clear_instance(instance)

    def add_hint(self, instance: str, token_ids: Sequence[int], chunk_tokens: int) -> int:
        """A holder confirmed by ``/lookup``: ``instance`` holds the first ``len(token_ids)`` tokens (whole
        chunks are kept). Indexed as medium ``LOOKUP`` with synthetic engine hashes derived from the chain."""
        n = len(token_ids) // chunk_tokens * chunk_tokens
        if n <= 0:
            return 0
        keys = self.chain_keys(token_ids[:n], chunk_tokens)
        hashes: list[BlockHash] = [b"lookup:" + k.to_bytes(8, "little", signed=True) for k in keys]
        self.hints += 1
        return self.apply_stored(instance, hashes, None, token_ids[:n], chunk_tokens, HINT_MEDIUM)

    def expire(self, now: float | None = None) -> int:
        """Remove the aging entries whose ttl has passed; returns how many."""
        now = self._clock() if now is None else now
        dropped = 0
        live = [self.ttl(m) for m, n in self.aging_counts.items() if n > 0]
        floor = min((t for t in live if t > 0), default=0.0)
        for instance in list(self._aging):
            aging = self._aging[instance]
            stale: list[tuple[int, BlockHash]] = []
            for k, (at, name) in aging.items():  # store-time order: younger than every ttl -> so is the rest
                if now - at < floor:
                    break
                ttl = self.ttl(name)
                if ttl > 0 and now - at >= ttl:
                    stale.append(k)
            for size, h in stale:
                _, name = aging.pop((size, h))
                self.aging_counts[name] -= 1
                self._remove_one(instance, size, h)
                dropped += 1
            if not aging:
                del self._aging[instance]
        self.aged_out += dropped
        return dropped

    def _remove_one(self, instance: str, size: int, h: BlockHash) -> None:
        rec = self._engine.get(instance, {}).pop((size, h), None)
        if rec is not None:
            self._drop_holder(instance, size, rec[0], rec[1])
            self.stats.removed_blocks += 1

    def match_chains(
        self, token_ids: Sequence[int], chains: MutableMapping[int, array[int]], limit: int | None = None
    ) -> dict[str, int]:
        """``match(token_ids, limit=limit)`` (all media) with each block size's chain keys memoized in ``chains``:
        the keys of a prompt never change, so a repeated prompt costs dict lookups instead of hashing every
        block again. ``chains`` must belong to this ``token_ids`` and ``limit``; missing sizes are filled."""
        n = len(token_ids) if limit is None else min(limit, len(token_ids))
        best: dict[str, int] = {}
        for size, blocks in self._blocks.items():
            if not blocks or n < size:
                continue
            keys = chains.get(size)
            if keys is None:
                keys = chains[size] = array("q", iter_chain_keys(token_ids[: n // size * size], size))
            active: set[str] | None = None
            matched = 0
            for key in keys:
                entry = blocks.get(key)
                if entry is None:
                    break
                holders = entry.holders.keys()
                if active is None:
                    active = set(holders)
                elif not holders >= active:
                    for gone in active.difference(holders):
                        best[gone] = max(best.get(gone, 0), matched)
                    active.intersection_update(holders)
                if not active:
                    break
                matched += size
            for inst in active or ():
                best[inst] = max(best.get(inst, 0), matched)
        return {i: t for i, t in best.items() if t > 0}

    def media_entries(self) -> dict[str, int]:
        """Held entries (instance x block) per medium: GPU = all entries minus the aging ones."""
        total = sum(self.blocks_of(i) for i in self.instances())
        out = {m: n for m, n in self.aging_counts.items() if n > 0}
        out[_GPU] = max(0, total - sum(out.values()))
        return out
