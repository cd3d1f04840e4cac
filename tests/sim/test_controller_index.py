"""ControllerIndex: LMCache 0.5.6 lookup semantics, registration order, op handling, stats."""

from __future__ import annotations

import random

from kvgate_sim.controller_index import ControllerIndex
from kvgate_sim.protocol import KVOp, lmcache_chunk_hashes

CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def admit(idx: ControllerIndex, inst: str, hashes: list[int], loc: str = CPU, wid: int = 0) -> bool:
    return idx.apply_ops(inst, wid, loc, [KVOp("admit", h) for h in hashes])


def evict(idx: ControllerIndex, inst: str, hashes: list[int], loc: str = CPU, wid: int = 0) -> bool:
    return idx.apply_ops(inst, wid, loc, [KVOp("evict", h) for h in hashes])


def test_600_tokens_two_chunks_held_gives_512() -> None:
    idx = ControllerIndex()
    idx.register("instA", 0)
    t = toks(600)
    admit(idx, "instA", lmcache_chunk_hashes(t))  # workers store full chunks only: 2
    assert idx.lookup(t) == {"instA": (CPU, 512)}


def test_two_instances_and_eviction() -> None:
    idx = ControllerIndex()
    idx.register("instA", 0)
    idx.register("instB", 0)
    t = toks(800, 1)
    h = lmcache_chunk_hashes(t)
    admit(idx, "instA", h[:2])
    admit(idx, "instB", h[:3])
    assert idx.lookup(t) == {"instA": (CPU, 512), "instB": (CPU, 768)}
    evict(idx, "instA", [h[1]])
    assert idx.lookup(t) == {"instA": (CPU, 256), "instB": (CPU, 768)}
    assert list(idx.lookup(t)) == ["instA", "instB"]  # key order = first credit order


def test_short_prompt_and_empty() -> None:
    idx = ControllerIndex()
    idx.register("instA", 0)
    t = toks(255)
    admit(idx, "instA", lmcache_chunk_hashes(toks(512)))
    assert idx.lookup(t) == {}
    assert idx.lookup([]) == {}


def test_trailing_partial_chunk_is_hashed_and_credited() -> None:
    # a worker that stored the partial chunk hash (save_unfull_chunk) is credited up to len(tokens)
    idx = ControllerIndex()
    idx.register("instA", 0)
    t = toks(300, 2)
    admit(idx, "instA", lmcache_chunk_hashes(t, save_unfull_chunk=True))
    assert idx.lookup(t) == {"instA": (CPU, 300)}


def test_first_registered_is_credited_and_stop_at_gap() -> None:
    idx = ControllerIndex()
    idx.register("late", 0)
    idx.register("early", 0)
    t = toks(1024, 3)
    h = lmcache_chunk_hashes(t)
    admit(idx, "early", h)  # admitted first, but registered second
    admit(idx, "late", h[:2])
    assert idx.lookup(t) == {"late": (CPU, 512), "early": (CPU, 1024)}
    evict(idx, "early", [h[2]])  # gap at chunk 2: chunk 3 is not reached
    assert idx.lookup(t) == {"late": (CPU, 512)}  # chunks 0-1 go to "late"; "early" is never credited


def test_location_order_and_recreated_location() -> None:
    idx = ControllerIndex()
    idx.register("A", 0)
    t = toks(256, 4)
    h = lmcache_chunk_hashes(t)
    admit(idx, "A", h, DISK)
    admit(idx, "A", h, CPU)
    assert idx.lookup(t) == {"A": (DISK, 256)}
    evict(idx, "A", h, DISK)  # DISK set emptied → dropped; re-created after CPU
    admit(idx, "A", h, DISK)
    assert idx.lookup(t) == {"A": (CPU, 256)}
    assert idx.locations("A", 0) == [CPU, DISK]


def test_worker_order_within_instance() -> None:
    idx = ControllerIndex()
    idx.register("A", 1)
    idx.register("A", 0)
    idx.register("B", 0)
    t = toks(256, 5)
    h = lmcache_chunk_hashes(t)
    admit(idx, "B", h)
    admit(idx, "A", h, DISK, wid=0)
    admit(idx, "A", h, CPU, wid=1)
    assert idx.find(h[0]) == ("A", 1, CPU)  # worker 1 registered first in A
    assert idx.worker_ids("A") == [0, 1]


def test_unregistered_ops_dropped_and_reregistration_clears() -> None:
    idx = ControllerIndex()
    t = toks(512, 6)
    h = lmcache_chunk_hashes(t)
    assert not admit(idx, "A", h)
    idx.register("A", 0, ip="127.0.0.1", port=1, now=10.0)
    assert idx.lookup(t) == {}
    admit(idx, "A", h)
    admit(idx, "A", h, DISK)
    assert idx.key_count("A") == 4
    assert idx.register("A", 0, ip="10.0.0.9", port=2, now=20.0) is False
    assert idx.lookup(t) == {}
    assert idx.key_count() == 0
    info = idx.worker_info("A", 0)
    assert info is not None and (info.ip, info.port, info.registration_time) == ("127.0.0.1", 1, 10.0)


def test_deregister_moves_instance_to_the_end() -> None:
    idx = ControllerIndex()
    idx.register("A", 0)
    idx.register("B", 0)
    t = toks(256, 7)
    h = lmcache_chunk_hashes(t)
    admit(idx, "A", h)
    admit(idx, "B", h)
    assert idx.lookup(t) == {"A": (CPU, 256)}
    assert idx.deregister("A", 0)
    assert not idx.deregister("A", 0)
    assert idx.instance_ids() == ["B"]
    idx.register("A", 0)
    admit(idx, "A", h)
    assert idx.lookup(t) == {"B": (CPU, 256)}


def test_lookup_hashes_matches_lookup() -> None:
    idx = ControllerIndex()
    for i in range(3):
        idx.register(f"i{i}", 0)
    rng = random.Random(8)
    t = toks(2000, 9)
    h = lmcache_chunk_hashes(t)
    for i in range(3):
        admit(idx, f"i{i}", h[: rng.randrange(len(h) + 1)])
    full = lmcache_chunk_hashes(t, save_unfull_chunk=True)
    assert idx.lookup_hashes(full, len(t)) == idx.lookup(t)
    assert idx.lookup_hashes(h[:3], 768) == idx.lookup(t[:768])


def test_random_against_naive_scan() -> None:
    """Reverse index == the real controller's scan over instances/workers/locations."""
    rng = random.Random(10)
    idx = ControllerIndex()
    # naive model: ordered dict instance -> ordered dict worker -> ordered dict location -> set
    naive: dict[str, dict[int, dict[str, set[int]]]] = {}
    prompts = [toks(rng.randrange(200, 1600), 100 + i) for i in range(6)]
    pool = sorted({h for p in prompts for h in lmcache_chunk_hashes(p)})
    for _ in range(600):
        inst, wid, loc = rng.choice("ABCD"), rng.randrange(2), rng.choice([CPU, DISK])
        r = rng.random()
        if r < 0.08:
            idx.register(inst, wid)
            if inst in naive and wid in naive[inst]:
                naive[inst][wid].clear()
            else:
                naive.setdefault(inst, {})[wid] = {}
        elif r < 0.12:
            idx.deregister(inst, wid)
            if inst in naive and wid in naive[inst]:
                del naive[inst][wid]
                if not naive[inst]:
                    del naive[inst]
        else:
            kind = "admit" if r < 0.7 else "evict"
            keys = rng.sample(pool, rng.randrange(1, 6))
            idx.apply_ops(inst, wid, loc, [KVOp(kind, k) for k in keys])  # type: ignore[arg-type]
            if inst in naive and wid in naive[inst]:
                s = naive[inst][wid].setdefault(loc, set())
                (s.update if kind == "admit" else s.difference_update)(keys)
                if not s:
                    del naive[inst][wid][loc]
        for p in prompts:
            expect: dict[str, tuple[str, int]] = {}
            for i, h in enumerate(lmcache_chunk_hashes(p, save_unfull_chunk=True)):
                hit = next(
                    ((i_, l_) for i_, ws in naive.items() for w in ws.values() for l_, s in w.items() if h in s), None
                )
                if hit is None:
                    break
                expect[hit[0]] = (hit[1], min((i + 1) * 256, len(p)))
            assert idx.lookup(p) == expect
            assert list(idx.lookup(p)) == list(expect)


def test_stats_and_infos() -> None:
    idx = ControllerIndex()
    idx.register("A", 0, "127.0.0.1", 5000, None, now=1.0)
    idx.register("A", 1, "127.0.0.2", 5001, "127.0.0.2:7000", now=2.0)
    idx.register("B", 0, "127.0.0.3", 5002, now=3.0)
    h = lmcache_chunk_hashes(toks(1024, 11))
    admit(idx, "A", h[:3])
    admit(idx, "A", h[:1], DISK, wid=1)
    assert idx.key_stats() == {
        "total_key_count": 4,
        "total_instance_count": 2,
        "total_worker_count": 3,
        "instances": [
            {"instance_id": "A", "key_count": 4, "worker_count": 2},
            {"instance_id": "B", "key_count": 0, "worker_count": 1},
        ],
    }
    assert [(i.instance_id, i.worker_id) for i in idx.worker_infos("all")] == [("A", 0), ("A", 1), ("B", 0)]
    assert [i.worker_id for i in idx.worker_infos("all", [1])] == [1]
    assert idx.worker_infos("nope") == []
    assert idx.worker_infos("A", [1])[0].peer_init_url == "127.0.0.2:7000"
    assert idx.instance_by_ip("127.0.0.3") == "B"
    assert idx.instance_by_ip("127.0.0.9") is None
    assert idx.heartbeat("B", 0, now=9.0)
    assert idx.worker_infos("B")[0].last_heartbeat_time == 9.0
    assert idx.keys("A", 0, CPU) == frozenset(h[:3])
