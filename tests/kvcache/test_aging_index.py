"""AgingBlockIndex: non-GPU entries (LMCache CPU tier, /lookup hints) expire; GPU entries never do."""

from __future__ import annotations

from kvgate.routing.aging_index import HINT_MEDIUM, AgingBlockIndex

TOKENS = list(range(1000, 1064))  # 4 blocks of 16


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(cpu_ttl: float = 10.0, hint_ttl: float = 5.0) -> tuple[AgingBlockIndex, Clock]:
    clock = Clock()
    return AgingBlockIndex({"*": cpu_ttl, HINT_MEDIUM: hint_ttl}, clock=clock), clock


def test_cpu_entries_age_out_gpu_entries_stay() -> None:
    idx, clock = make()
    idx.apply_stored("gpu-holder", [1, 2, 3, 4], None, TOKENS, 16, "GPU")
    idx.apply_stored("cpu-holder", [11, 12], None, TOKENS[:32], 16, "cpu")
    assert idx.match(TOKENS) == {"gpu-holder": 64, "cpu-holder": 32}
    assert idx.media_entries() == {"GPU": 4, "CPU": 2}
    clock.t += 9.9
    assert idx.expire() == 0
    clock.t += 0.2
    assert idx.expire() == 2 and idx.aged_out == 2
    assert idx.match(TOKENS) == {"gpu-holder": 64}
    assert idx.media_entries() == {"GPU": 4}


def test_restore_refreshes_the_age() -> None:
    idx, clock = make()
    idx.apply_stored("c", [11], None, TOKENS[:16], 16, "cpu")
    clock.t += 8
    idx.apply_stored("c", [11], None, TOKENS[:16], 16, "cpu")  # stored again: a new life
    clock.t += 8
    assert idx.expire() == 0 and idx.match(TOKENS) == {"c": 16}
    clock.t += 3
    assert idx.expire() == 1 and idx.match(TOKENS) == {}


def test_hints_have_their_own_ttl_and_whole_chunks() -> None:
    idx, clock = make(cpu_ttl=100.0, hint_ttl=5.0)
    tokens = list(range(600))
    assert idx.add_hint("lm", tokens, 256) == 2  # 512 tokens = 2 whole chunks; the partial one is dropped
    assert idx.match(tokens) == {"lm": 512}
    assert idx.media_entries() == {"LOOKUP": 2, "GPU": 0}
    clock.t += 5
    assert idx.expire() == 2 and idx.match(tokens) == {}


def test_clear_and_removal_drop_aging_records() -> None:
    idx, clock = make()
    idx.apply_stored("c", [11, 12], None, TOKENS[:32], 16, "cpu")
    idx.apply_removed("c", [12])
    assert idx.aging_counts["CPU"] == 1
    idx.clear_instance("c")
    assert idx.aging_counts["CPU"] == 0
    clock.t += 50
    assert idx.expire() == 0 and idx.stats.unknown_removals == 0


def test_zero_ttl_never_ages() -> None:
    idx, clock = make(cpu_ttl=0.0)
    idx.apply_stored("c", [11], None, TOKENS[:16], 16, "cpu")
    clock.t += 1e6
    assert idx.expire() == 0 and idx.match(TOKENS) == {"c": 16}


def test_match_chains_equals_match_and_memoizes() -> None:
    import random
    from array import array

    rng = random.Random(5)
    idx, _ = make()
    base = [rng.randrange(50) for _ in range(700)]
    h = iter(range(10**6))
    for inst in ("a", "b", "c"):
        for size, medium in ((16, "GPU"), (256, "cpu")):
            n = rng.randrange(0, len(base)) // size * size
            if n:
                idx.apply_stored(inst, [next(h) for _ in range(n // size)], None, base[:n], size, medium)
    for trial in range(50):
        cut = rng.randrange(1, len(base))
        prompt = base[:cut] + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        chains: dict[int, array[int]] = {}
        expected = idx.match(prompt, limit=len(prompt) - 1)
        assert idx.match_chains(prompt, chains, limit=len(prompt) - 1) == expected, trial
        assert set(chains) == {s for s in idx.block_sizes if s <= len(prompt) - 1}
        assert idx.match_chains(prompt, chains, limit=len(prompt) - 1) == expected  # from the memo
