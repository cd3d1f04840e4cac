"""EventIndex.match memoizes its answer per request key, stamped with the index version: every mutation kind
(store, re-store in a new medium, removal, clear, expiry, hint) must invalidate it, so a memoized answer always
equals a fresh ``match`` on the index as it is now."""

from __future__ import annotations

import random
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from kvgate.filters.kvcache.config import KVEventsConfig
from kvgate.filters.kvcache.event_index import EventIndex
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.routing.aging_index import AgingBlockIndex


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock) -> EventIndex:
    metrics = KVCacheMetrics.for_registry(CollectorRegistry())
    events = FilterEvents(metrics, controller_url="", tokenizer_url="")
    cfg = KVEventsConfig.model_validate({"cpu_ttl": 10.0, "hint_ttl": 5.0})
    return EventIndex(cfg, metrics, events, clock=clock)


def fresh(ei: EventIndex, tokens: list[int]) -> dict[str, int]:
    return ei.index.match(tokens, limit=len(tokens) - 1)


def test_every_mutation_kind_invalidates_the_memoized_answer() -> None:
    clock = Clock()
    ei = make(clock)
    idx: AgingBlockIndex = ei.index
    tokens = list(range(1000, 1000 + 16 * 8 + 5))

    def later(seconds: float) -> int:
        clock.t += seconds
        return idx.expire()

    assert ei.match(tokens, "k") == {}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("store GPU", lambda: idx.apply_stored("a", [1, 2, 3], None, tokens[:48], 16, "GPU")),
        ("store child", lambda: idx.apply_stored("a", [4], 3, tokens[48:64], 16, "GPU")),
        ("store other instance", lambda: idx.apply_stored("b", [11, 12], None, tokens[:32], 16, "cpu")),
        ("new block size", lambda: idx.apply_stored("c", [21], None, tokens[:64], 64, "GPU")),
        ("same blocks, new medium", lambda: idx.apply_stored("a", [1], None, tokens[:16], 16, "cpu")),
        ("remove tail", lambda: idx.apply_removed("a", [4])),
        ("remove middle", lambda: idx.apply_removed("a", [2])),
        ("clear", lambda: idx.clear_instance("c")),
        ("hint", lambda: ei.add_hint("d", tokens[:128], 64)),
        ("expire cpu", lambda: later(7)),
        ("expire hint", lambda: later(7)),
        ("forget instance", lambda: idx.clear_instance("a")),
    ]
    seen = [ei.match(tokens, "k")]
    for name, step in steps:
        before = idx.version
        step()
        want = fresh(ei, tokens)
        assert ei.match(tokens, "k") == want, name
        assert ei.match(tokens, "k") == want, name  # answered from the memo
        if want != seen[-1]:
            assert idx.version != before, name
        seen.append(want)
    assert len({tuple(sorted(s.items())) for s in seen}) >= 8  # the steps did change the answers


def test_refreshing_a_held_block_keeps_the_memo() -> None:
    ei = make(Clock())
    tokens = list(range(64))
    ei.index.apply_stored("a", [1, 2], None, tokens[:32], 16, "GPU")
    answer = ei.match(tokens, "k")
    v = ei.index.version
    ei.index.apply_stored("a", [1, 2], None, tokens[:32], 16, "GPU")  # vLLM re-sends what it holds
    assert ei.index.version == v
    assert ei.match(tokens, "k") == answer == {"a": 32}


def test_answers_are_copies() -> None:
    ei = make(Clock())
    tokens = list(range(64))
    ei.index.apply_stored("a", [1, 2], None, tokens[:32], 16, "GPU")
    ei.match(tokens, "k")["a"] = 0
    assert ei.match(tokens, "k") == {"a": 32}


def test_randomized_memo_equals_fresh_match() -> None:
    rng = random.Random(9)
    clock = Clock()
    ei = make(clock)
    idx = ei.index
    base = [rng.randrange(40) for _ in range(600)]
    prompts = {
        f"p{i}": base[: rng.randrange(20, 600)] + [rng.randrange(40) for _ in range(rng.randrange(0, 30))]
        for i in range(12)
    }
    held: dict[str, list[tuple[int, int]]] = {}  # instance -> (block size, last stored hash)
    h = iter(range(1, 10**7))
    for trial in range(600):
        op = rng.randrange(7)
        inst = rng.choice("abcd")
        size = rng.choice((16, 64))
        if op <= 2:  # store a chain (from scratch or continuing one the instance holds)
            n = rng.randrange(1, 6)
            chain = [c for c in held.get(inst, []) if c[0] == size]
            start_blocks = 0
            parent = None
            if chain and rng.random() < 0.5:
                parent = chain[-1][1]
                start_blocks = sum(1 for c in chain)
            lo = start_blocks * size
            if lo + n * size <= len(base):
                hs = [next(h) for _ in range(n)]
                medium = rng.choice(("GPU", "cpu", None))
                done = idx.apply_stored(inst, hs, parent, base[lo : lo + n * size], size, medium)
                held.setdefault(inst, []).extend((size, x) for x in hs[:done])
        elif op == 3 and held.get(inst):  # remove some of its blocks
            victims = rng.sample(held[inst], k=min(len(held[inst]), rng.randrange(1, 4)))
            idx.apply_removed(inst, [x for _, x in victims])
            held[inst] = [c for c in held[inst] if c not in victims]
        elif op == 4 and rng.random() < 0.3:
            idx.clear_instance(inst)
            held.pop(inst, None)
        elif op == 5:
            clock.t += rng.choice((0.5, 3.0, 6.0))
            idx.expire()
        else:
            key = rng.choice(list(prompts))
            ei.add_hint(inst, prompts[key][: rng.randrange(0, len(prompts[key]) + 1)], 64)
        for key in rng.sample(list(prompts), k=4):
            assert ei.match(prompts[key], key) == fresh(ei, prompts[key]), (trial, key)
