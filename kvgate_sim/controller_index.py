"""The KV index of the simulated LMCache 0.5.6 controller (SIMULATOR: test and benchmark tool).

Pure, no I/O, not thread-safe (callers that share it across threads hold a lock). It mirrors the
real controller's ``RegistryTree`` + ``KVController.lookup``:

- workers are registered as ``(instance_id, worker_id)``; instances keep their first-registration
  order, workers their order inside the instance, and each worker holds one key set per location
  (a location's set is dropped when it becomes empty, and re-created at the end when used again);
- re-registering a registered worker only clears its keys (ip/port/times are kept, like 0.5.6);
- KV ops for unregistered workers are dropped;
- ``lookup`` cuts tokens into 256-token chunks (the trailing partial chunk is hashed too), walks the
  chained hashes, credits each chunk to the FIRST holder in (instance, worker, location) order and
  records ``layout_info[instance] = (location, end_token)``; it stops at the first chunk nobody has.

Instead of the real controller's scan over all workers per chunk, a reverse index
``chunk_hash -> holders`` plus a cached first holder per key make a lookup O(chunks) dict look-ups;
the first holder is the one with the smallest (instance rank, worker rank, location rank), which
reproduces the scan order exactly (recomputed only when the first holder loses the key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE, KVOp, lmcache_chunk_hashes

Holder = tuple[str, int, str]  # (instance_id, worker_id, location)
Rank = tuple[int, int, int]  # (instance rank, worker rank, location rank): smaller = scanned first
LayoutInfo = dict[str, tuple[str, int]]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """The real controller's ``WorkerInfo`` (field order as on the wire)."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None
    registration_time: float
    last_heartbeat_time: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Worker:
    worker_id: int
    rank: int
    ip: str
    port: int
    peer_init_url: str | None
    registration_time: float
    last_heartbeat_time: float
    kv: dict[str, set[int]] = field(default_factory=dict)  # location -> keys, insertion-ordered
    loc_rank: dict[str, int] = field(default_factory=dict)  # location -> rank while its set exists

    def key_count(self) -> int:
        return sum(len(keys) for keys in self.kv.values())


@dataclass(slots=True)
class _Instance:
    instance_id: str
    rank: int
    workers: dict[int, _Worker] = field(default_factory=dict)  # insertion-ordered


class ControllerIndex:
    """Registration order + per-(worker, location) chunk-key sets + reverse index for lookups."""

    def __init__(self, chunk_size: int = LMCACHE_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._instances: dict[str, _Instance] = {}
        self._holders: dict[int, dict[Holder, Rank]] = {}
        self._first: dict[int, tuple[Holder, Rank]] = {}  # key -> the holder a scan finds first (cached)
        self._next_rank = 0  # one counter for instance, worker and location ranks (only relative order matters)

    def _rank(self) -> int:
        self._next_rank += 1
        return self._next_rank

    # ------------------------------------------------------------------ registration
    def register(
        self,
        instance_id: str,
        worker_id: int,
        ip: str = "127.0.0.1",
        port: int = 0,
        peer_init_url: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Register a worker; returns False (and clears its keys, keeping its info) if it already was."""
        inst = self._instances.get(instance_id)
        if inst is not None and worker_id in inst.workers:
            self.clear_worker(instance_id, worker_id)
            return False
        if inst is None:
            inst = _Instance(instance_id, self._rank())
            self._instances[instance_id] = inst
        ts = time.time() if now is None else now
        inst.workers[worker_id] = _Worker(worker_id, self._rank(), ip, port, peer_init_url, ts, ts)
        return True

    def deregister(self, instance_id: str, worker_id: int) -> bool:
        """Forget a worker and its keys; an instance left without workers is removed."""
        inst = self._instances.get(instance_id)
        if inst is None or worker_id not in inst.workers:
            return False
        self.clear_worker(instance_id, worker_id)
        del inst.workers[worker_id]
        if not inst.workers:
            del self._instances[instance_id]
        return True

    def heartbeat(self, instance_id: str, worker_id: int, now: float | None = None) -> bool:
        w = self._worker(instance_id, worker_id)
        if w is None:
            return False
        w.last_heartbeat_time = time.time() if now is None else now
        return True

    def is_registered(self, instance_id: str, worker_id: int) -> bool:
        return self._worker(instance_id, worker_id) is not None

    def _worker(self, instance_id: str, worker_id: int) -> _Worker | None:
        inst = self._instances.get(instance_id)
        return None if inst is None else inst.workers.get(worker_id)

    # ------------------------------------------------------------------ KV state
    def apply_ops(self, instance_id: str, worker_id: int, location: str, ops: Iterable[KVOp]) -> bool:
        """Apply one admit/evict batch; False (ops dropped) when the worker is not registered."""
        inst = self._instances.get(instance_id)
        w = None if inst is None else inst.workers.get(worker_id)
        if inst is None or w is None:
            return False
        keys = w.kv.get(location)
        if keys is None:
            keys = w.kv[location] = set()
            w.loc_rank[location] = self._rank()
        holder: Holder = (instance_id, worker_id, location)
        rank: Rank = (inst.rank, w.rank, w.loc_rank[location])
        holders = self._holders
        for op in ops:
            key = op.key
            if op.op_type == "admit":
                if key not in keys:
                    keys.add(key)
                    holders.setdefault(key, {})[holder] = rank
                    first = self._first.get(key)
                    if first is None or rank < first[1]:
                        self._first[key] = (holder, rank)
            elif op.op_type == "evict":
                if key in keys:
                    keys.discard(key)
                    self._drop_holder(key, holder)
            else:
                raise ValueError(f"unknown op_type {op.op_type!r}")
        if not keys:
            del w.kv[location]
            del w.loc_rank[location]
        return True

    def _drop_holder(self, key: int, holder: Holder) -> None:
        hs = self._holders.get(key)
        if hs is None:
            return
        hs.pop(holder, None)
        if not hs:
            del self._holders[key]
            self._first.pop(key, None)
        elif self._first[key][0] == holder:
            self._first[key] = min(hs.items(), key=lambda item: item[1])

    def clear_worker(self, instance_id: str, worker_id: int, location: str | None = None) -> bool:
        """Drop a worker's keys (all locations, or one), like ``RegistryTree.clear_worker_kv``."""
        w = self._worker(instance_id, worker_id)
        if w is None:
            return False
        locations = list(w.kv) if location is None else [location]
        for loc in locations:
            keys = w.kv.pop(loc, None)
            w.loc_rank.pop(loc, None)
            if keys:
                holder = (instance_id, worker_id, loc)
                for key in keys:
                    self._drop_holder(key, holder)
        return True

    # ------------------------------------------------------------------ lookup
    def find(self, key: int) -> Holder | None:
        """The holder the real controller's scan would find first for ``key``."""
        first = self._first.get(key)
        return None if first is None else first[0]

    def lookup(self, tokens: Sequence[int]) -> LayoutInfo:
        """``KVController.lookup``: ``{instance_id: (location, end_token)}``."""
        hashes = lmcache_chunk_hashes(tokens, self.chunk_size, save_unfull_chunk=True)
        return self.lookup_hashes(hashes, len(tokens))

    def lookup_hashes(self, chunk_hashes: Sequence[int], num_tokens: int) -> LayoutInfo:
        """Same as :meth:`lookup` for callers that already hold the chained chunk hashes.

        ``chunk_hashes`` must be the lookup-side hashes (trailing partial chunk included when the
        caller wants it considered); chunk ``i`` ends at ``min((i + 1) * chunk_size, num_tokens)``.
        """
        layout: LayoutInfo = {}
        first = self._first
        size = self.chunk_size
        for i, key in enumerate(chunk_hashes):
            hit = first.get(key)
            if hit is None:
                break
            inst, _wid, loc = hit[0]
            layout[inst] = (loc, min((i + 1) * size, num_tokens))
        return layout

    # ------------------------------------------------------------------ queries
    def instance_ids(self) -> list[str]:
        """Registered instances in registration order."""
        return list(self._instances)

    def worker_ids(self, instance_id: str) -> list[int]:
        """Sorted worker ids of an instance (``[]`` if unknown), like ``RegistryTree.get_worker_ids``."""
        inst = self._instances.get(instance_id)
        return [] if inst is None else sorted(inst.workers)

    def registered_workers(self) -> list[tuple[str, int]]:
        """(instance_id, worker_id) pairs in scan order."""
        return [(i.instance_id, wid) for i in self._instances.values() for wid in i.workers]

    def instance_by_ip(self, ip: str) -> str | None:
        for inst in self._instances.values():
            if any(w.ip == ip for w in inst.workers.values()):
                return inst.instance_id
        return None

    def worker_info(self, instance_id: str, worker_id: int) -> WorkerInfo | None:
        w = self._worker(instance_id, worker_id)
        if w is None:
            return None
        return WorkerInfo(
            instance_id, w.worker_id, w.ip, w.port, w.peer_init_url, w.registration_time, w.last_heartbeat_time
        )

    def worker_infos(self, instance_id: str = "all", worker_ids: Sequence[int] | None = None) -> list[WorkerInfo]:
        """``/query_worker_info`` semantics: ``"all"`` = every worker in registration order, optionally
        filtered by worker id; otherwise the instance's workers (sorted ids, or the given ids in order)."""
        out: list[WorkerInfo] = []
        if instance_id == "all":
            for inst_id, wid in self.registered_workers():
                if not worker_ids or wid in worker_ids:
                    info = self.worker_info(inst_id, wid)
                    if info is not None:
                        out.append(info)
            return out
        inst = self._instances.get(instance_id)
        if inst is None:
            return out
        ids = list(worker_ids) if worker_ids else sorted(inst.workers)
        for wid in ids:
            info = self.worker_info(instance_id, wid)
            if info is not None:
                out.append(info)
        return out

    def keys(self, instance_id: str, worker_id: int, location: str) -> frozenset[int]:
        w = self._worker(instance_id, worker_id)
        return frozenset() if w is None else frozenset(w.kv.get(location, ()))

    def locations(self, instance_id: str, worker_id: int) -> list[str]:
        w = self._worker(instance_id, worker_id)
        return [] if w is None else list(w.kv)

    def key_count(self, instance_id: str | None = None, worker_id: int | None = None) -> int:
        """Keys held by one worker, one instance, or everybody (a key held twice counts twice)."""
        total = 0
        for inst in self._instances.values():
            if instance_id is not None and inst.instance_id != instance_id:
                continue
            for w in inst.workers.values():
                if worker_id is None or w.worker_id == worker_id:
                    total += w.key_count()
        return total

    def key_stats(self) -> dict[str, Any]:
        """``GET /controller/key-stats`` body."""
        instances = [
            {
                "instance_id": inst.instance_id,
                "key_count": sum(w.key_count() for w in inst.workers.values()),
                "worker_count": len(inst.workers),
            }
            for inst in self._instances.values()
        ]
        return {
            "total_key_count": sum(i["key_count"] for i in instances),
            "total_instance_count": len(instances),
            "total_worker_count": sum(i["worker_count"] for i in instances),
            "instances": instances,
        }
