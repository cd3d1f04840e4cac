"""SIMULATOR: the LMCache CPU tier (256-token chunks, LRU with pins, compression accounting, KVOp batches)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kvgate_sim.profiles import KV_BYTES_PER_TOKEN_LLAMA3_8B
from kvgate_sim.protocol import DEFAULT_LOCATION, LMCACHE_CHUNK_SIZE, KVOp, OpSink, lmcache_chunk_hashes


@dataclass(slots=True)
class _Chunk:
    compressed: bool = False
    method: str | None = None
    pinned_until: float = -math.inf


class LMCacheTier:
    """Simulated LMCache ``LocalCPUBackend`` of one worker: LRU chunks, pins, compression, admit/evict ops."""

    def __init__(
        self,
        instance_id: str,
        capacity_chunks: int,
        *,
        clock: Callable[[], float],
        sink: OpSink | None = None,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
        kv_bytes_per_token: int = KV_BYTES_PER_TOKEN_LLAMA3_8B,
        location: str = DEFAULT_LOCATION,
        pin_timeout_s: float = 300.0,
        compression_ratio: float = 0.5,
        worker_id: int = 0,
    ):
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.location = location
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_size * kv_bytes_per_token
        self.compressed_bytes = int(self.chunk_bytes * compression_ratio)
        self.capacity_bytes = capacity_chunks * self.chunk_bytes
        self.used_bytes = 0
        self.pin_timeout_s = pin_timeout_s
        self.sink = sink
        self._clock = clock
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._seq = 0
        self.admits = 0
        self.evictions = 0
        # KV-event hooks (set by the engine core when it publishes events): positions (within the keys passed to
        # ``store``) of newly admitted chunks, and keys of removed chunks, in order. None = not recorded.
        self.admitted_log: list[tuple[int, int]] | None = None
        self.removed_log: list[int] | None = None

    # -- introspection
    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: int) -> bool:
        return key in self._chunks

    def keys(self) -> list[int]:
        """Stored chunk keys, least recently used first."""
        return list(self._chunks)

    def is_pinned(self, key: int) -> bool:
        c = self._chunks.get(key)
        return c is not None and c.pinned_until > self._clock()

    def is_compressed(self, key: int) -> bool:
        c = self._chunks.get(key)
        return c is not None and c.compressed

    # -- internals
    def _size(self, c: _Chunk) -> int:
        return self.compressed_bytes if c.compressed else self.chunk_bytes

    def _emit(self, ops: list[KVOp]) -> None:
        if ops and self.sink is not None:
            self.sink(self.instance_id, self.worker_id, self.location, ops)

    def _op(self, op_type: Literal["admit", "evict"], key: int) -> KVOp:
        self._seq += 1
        return KVOp(op_type, key, self._seq)

    def _remove(self, key: int, ops: list[KVOp]) -> None:
        c = self._chunks.pop(key)
        self.used_bytes -= self._size(c)
        self.evictions += 1
        ops.append(self._op("evict", key))
        if self.removed_log is not None:
            self.removed_log.append(key)

    def _make_room(self, needed: int, ops: list[KVOp], protect: set[int] | frozenset[int] = frozenset()) -> bool:
        if self.used_bytes + needed <= self.capacity_bytes:
            return True
        now = self._clock()
        victims: list[int] = []
        freed = 0
        for key, c in self._chunks.items():
            if c.pinned_until > now or key in protect:
                continue
            victims.append(key)
            freed += self._size(c)
            if self.used_bytes - freed + needed <= self.capacity_bytes:
                break
        if self.used_bytes - freed + needed > self.capacity_bytes:
            return False
        for key in victims:
            self._remove(key, ops)
        return True

    # -- key-level API (used by the engine and by hash-only benchmarks)
    def lookup(self, keys: Sequence[int]) -> int:
        """Number of leading ``keys`` stored (LMCache's prefix lookup); no LRU update."""
        n = 0
        for k in keys:
            if k not in self._chunks:
                break
            n += 1
        return n

    def touch(self, keys: Sequence[int]) -> None:
        for k in keys:
            if k in self._chunks:
                self._chunks.move_to_end(k)

    def store(self, keys: Sequence[int]) -> int:
        """Store full chunks; returns the number newly admitted (stops when nothing more can be evicted)."""
        ops: list[KVOp] = []
        admitted = 0
        protect = set(keys)
        log = self.admitted_log
        for pos, k in enumerate(keys):
            if k in self._chunks:
                continue
            if not self._make_room(self.chunk_bytes, ops, protect):
                break
            self._chunks[k] = _Chunk()
            self.used_bytes += self.chunk_bytes
            self.admits += 1
            admitted += 1
            ops.append(self._op("admit", k))
            if log is not None:
                log.append((pos, k))
        self._emit(ops)
        return admitted

    def pin_keys(self, keys: Sequence[int], timeout_s: float | None = None) -> int:
        until = self._clock() + (self.pin_timeout_s if timeout_s is None else timeout_s)
        n = self.lookup(keys)
        for k in keys[:n]:
            c = self._chunks[k]
            c.pinned_until = max(c.pinned_until, until)
        return n

    def unpin_keys(self, keys: Sequence[int]) -> int:
        n = 0
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and c.pinned_until > -math.inf:
                c.pinned_until = -math.inf
                n += 1
        return n

    def compress_keys(self, keys: Sequence[int], method: str) -> int:
        n = 0
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and not c.compressed:
                self.used_bytes -= self.chunk_bytes - self.compressed_bytes
                c.compressed, c.method = True, method
                n += 1
        return n

    def decompress_keys(self, keys: Sequence[int], method: str) -> int:
        ops: list[KVOp] = []
        n = 0
        protect = set(keys)
        for k in keys:
            c = self._chunks.get(k)
            if c is None or not c.compressed:
                continue
            if not self._make_room(self.chunk_bytes - self.compressed_bytes, ops, protect):
                break
            self.used_bytes += self.chunk_bytes - self.compressed_bytes
            c.compressed, c.method = False, None
            n += 1
        self._emit(ops)
        return n

    def evict_keys(self, keys: Sequence[int]) -> int:
        """Drop the given chunks unless pinned; returns chunks evicted."""
        ops: list[KVOp] = []
        now = self._clock()
        for k in keys:
            c = self._chunks.get(k)
            if c is not None and c.pinned_until <= now:
                self._remove(k, ops)
        self._emit(ops)
        return len(ops)

    def clear_all(self) -> int:
        """Drop every unpinned chunk (pinned chunks survive until their pin expires, like LMCache)."""
        now = self._clock()
        ops: list[KVOp] = []
        for k in [k for k, c in self._chunks.items() if c.pinned_until <= now]:
            self._remove(k, ops)
        self._emit(ops)
        return len(ops)

    # -- token-level WorkerControl operations
    def _keys(self, tokens: Sequence[int]) -> list[int]:
        return lmcache_chunk_hashes(tokens, self.chunk_size)

    def _loc_ok(self, location: str | None) -> bool:
        return location is None or location == self.location

    def clear(self, location: str) -> int:
        return self.clear_all() * self.chunk_size if self._loc_ok(location) else 0

    def pin(self, tokens: Sequence[int], location: str) -> int:
        return self.pin_keys(self._keys(tokens)) * self.chunk_size if self._loc_ok(location) else 0

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.compress_keys(self._keys(tokens), method) * self.chunk_size if self._loc_ok(location) else 0

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int:
        return self.decompress_keys(self._keys(tokens), method) * self.chunk_size if self._loc_ok(location) else 0

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int:
        return self.evict_keys(self._keys(tokens)) * self.chunk_size if self._loc_ok(location) else 0

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        if not self._loc_ok(location):
            return []
        keys = self._keys(tokens)
        return [(k, self.chunk_size) for k in keys[: self.lookup(keys)]]

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        if not self._loc_ok(location):
            return 0
        keys = self._keys(tokens)
        self.store(keys)
        return self.lookup(keys) * self.chunk_size

    def health(self) -> int:
        return 0
