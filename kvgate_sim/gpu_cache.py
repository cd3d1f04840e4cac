"""SIMULATOR: vLLM's GPU prefix cache (16-token chained block hashes, free-queue LRU, null block)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class GPUPrefixCache:
    """vLLM v1 block pool with prefix caching (simulated; block ids only, no tensors)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._hash: list[int | None] = [None] * num_blocks
        self._ref: list[int] = [0] * num_blocks
        self._cached: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.evictions = 0
        # KV-event hook (set by the engine core when it publishes events): hashes of cached blocks evicted for
        # reuse, in order. None = not recorded.
        self.evicted_log: list[int] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def match(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes`` (at most ``max_blocks``); no side effects."""
        out: list[int] = []
        cached = self._cached
        for i in range(min(max_blocks, len(hashes))):
            b = cached.get(hashes[i])
            if b is None:
                break
            out.append(b)
        return out

    def num_free_in(self, blocks: Sequence[int]) -> int:
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Sequence[int]) -> None:
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out: list[int] = []
        free, hashes, cached, ref = self._free, self._hash, self._cached, self._ref
        for _ in range(n):
            b, _v = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                    if self.evicted_log is not None:
                        self.evicted_log.append(h)
                hashes[b] = None
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def cache(self, block: int, block_hash: int) -> bool:
        """Enter a full block into the prefix cache; False when the hash is cached already (by another block)."""
        if block_hash not in self._cached and self._hash[block] is None:
            self._cached[block_hash] = block
            self._hash[block] = block_hash
            return True
        return False

    def free(self, blocks: Sequence[int]) -> None:
        """Release a request's blocks, tail first, so chain tails sit nearer the eviction end."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def eviction_order(self) -> list[int]:
        """Free blocks, next to be reallocated first (for tests and debugging)."""
        return list(self._free)

    def block_hash(self, block: int) -> int | None:
        return self._hash[block]

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def reset(self) -> bool:
        """vLLM's reset_prefix_cache: only when no block is in use."""
        if len(self._free) != self.num_blocks - 1:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        return True
