"""A tiny in-memory ``WorkerControl`` for controller tests (SIMULATOR test helper)."""

from __future__ import annotations

from collections.abc import Sequence

from kvgate_sim.protocol import DEFAULT_LOCATION, LMCACHE_CHUNK_SIZE, KVOp, OpSink, lmcache_chunk_hashes


class FakeWorker:
    """Holds full 256-token chunks per location and reports admit/evict ops to its sinks."""

    def __init__(self, instance_id: str, worker_id: int = 0, sinks: Sequence[OpSink] = ()) -> None:
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.sinks: list[OpSink] = list(sinks)
        self.store: dict[str, dict[int, None]] = {}
        self.pinned: set[int] = set()
        self.calls: list[tuple[str, object]] = []
        self.health_code = 0
        self.fail: set[str] = set()  # method names that raise

    def _check(self, name: str) -> None:
        self.calls.append((name, None))
        if name in self.fail:
            raise RuntimeError(f"{name} failed on purpose")

    def _emit(self, location: str, ops: list[KVOp]) -> None:
        if ops:
            for sink in self.sinks:
                sink(self.instance_id, self.worker_id, location, ops)

    # ---- test drivers
    def admit_hashes(self, hashes: Sequence[int], location: str = DEFAULT_LOCATION) -> None:
        keys = self.store.setdefault(location, {})
        ops = []
        for h in hashes:
            if h not in keys:
                keys[h] = None
                ops.append(KVOp("admit", h))
        self._emit(location, ops)

    def evict_hashes(self, hashes: Sequence[int], location: str = DEFAULT_LOCATION) -> int:
        keys = self.store.get(location, {})
        ops = []
        for h in hashes:
            if h in keys:
                del keys[h]
                ops.append(KVOp("evict", h))
        self._emit(location, ops)
        return len(ops) * LMCACHE_CHUNK_SIZE

    def store_tokens(self, tokens: Sequence[int], location: str = DEFAULT_LOCATION) -> int:
        hashes = lmcache_chunk_hashes(tokens)
        self.admit_hashes(hashes, location)
        return len(hashes) * LMCACHE_CHUNK_SIZE

    def held_prefix(self, tokens: Sequence[int], location: str) -> list[int]:
        keys = self.store.get(location, {})
        out = []
        for h in lmcache_chunk_hashes(tokens):
            if h not in keys:
                break
            out.append(h)
        return out

    # ---- WorkerControl
    def clear(self, location: str) -> int:
        self._check("clear")
        victims = [h for h in self.store.get(location, {}) if h not in self.pinned]
        return self.evict_hashes(victims, location)

    def pin(self, tokens: Sequence[int], location: str) -> int:
        self._check("pin")
        held = self.held_prefix(tokens, location)
        self.pinned.update(held)
        return len(held) * LMCACHE_CHUNK_SIZE

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int:
        self._check("compress")
        return len(self.held_prefix(tokens, location)) * LMCACHE_CHUNK_SIZE

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int:
        self._check("decompress")
        return len(self.held_prefix(tokens, location)) * LMCACHE_CHUNK_SIZE

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int:
        self._check("evict")
        hashes = lmcache_chunk_hashes(tokens)
        locations = list(self.store) if location is None else [location]
        return max([self.evict_hashes(hashes, loc) for loc in locations] or [0])

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        keys = self.store.get(location, {})
        return [(h, LMCACHE_CHUNK_SIZE) for h in lmcache_chunk_hashes(tokens) if h in keys]

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        return self.store_tokens(tokens, location)

    def health(self) -> int:
        self._check("health")
        return self.health_code
