from __future__ import annotations

from dataclasses import dataclass

from kvgate.routing.prefix import choose_prefix_endpoint


@dataclass
class Ep:
    id: str
    in_flight: int = 0
    ok: bool = True

    def healthy(self) -> bool:
        return self.ok


def test_longest_match_wins() -> None:
    eps = [Ep("a"), Ep("b"), Ep("c")]
    c = choose_prefix_endpoint({"a": 256, "b": 768, "c": 512}, eps)
    assert c.endpoint_id == "b" and c.matched_tokens == 768 and not c.rejected


def test_zero_match_never_wins_and_min_match() -> None:
    eps = [Ep("a"), Ep("b")]
    c = choose_prefix_endpoint({"a": 0, "b": 0}, eps)
    assert c.endpoint_id is None and c.rejected["below_min_match"] == 2
    c = choose_prefix_endpoint({"a": 256, "b": 512}, eps, min_match_tokens=600)
    assert c.endpoint_id is None
    c = choose_prefix_endpoint({"a": 256, "b": 512}, eps, min_match_tokens=512)
    assert c.endpoint_id == "b"


def test_tie_broken_by_in_flight_then_config_order() -> None:
    eps = [Ep("a", in_flight=3), Ep("b", in_flight=1), Ep("c", in_flight=1)]
    assert choose_prefix_endpoint({"c": 512, "a": 512, "b": 512}, eps).endpoint_id == "b"
    eps = [Ep("a", 2), Ep("b", 2), Ep("c", 2)]
    assert choose_prefix_endpoint({"c": 512, "b": 512}, eps).endpoint_id == "b"
    # longer match beats lower load
    eps = [Ep("a", 0), Ep("b", 50)]
    assert choose_prefix_endpoint({"a": 256, "b": 512}, eps).endpoint_id == "b"


def test_unknown_and_unhealthy_instances_ignored_and_counted() -> None:
    eps = [Ep("a"), Ep("b", ok=False)]
    c = choose_prefix_endpoint({"ghost": 4096, "b": 1024, "a": 256}, eps)
    assert c.endpoint_id == "a" and c.matched_tokens == 256
    assert c.rejected == {"unknown_instance": 1, "unhealthy": 1}
    c = choose_prefix_endpoint({"ghost": 4096}, eps)
    assert c.endpoint_id is None and c.rejected == {"unknown_instance": 1}


def test_without_cluster_view_deterministic() -> None:
    assert choose_prefix_endpoint({"z": 512, "y": 512, "x": 256}, None).endpoint_id == "y"
    assert choose_prefix_endpoint({"z": 0}, None).endpoint_id is None
    assert choose_prefix_endpoint({}, None).endpoint_id is None


def test_load_guard_drops_hint_for_an_overloaded_holder() -> None:
    eps = [Ep("a", in_flight=10), Ep("b", in_flight=1), Ep("c", in_flight=2, ok=False)]
    # off by default (Pixiu): the holder wins whatever its load
    assert choose_prefix_endpoint({"a": 512}, eps).endpoint_id == "a"
    c = choose_prefix_endpoint({"a": 512}, eps, max_imbalance_abs=8, max_imbalance_rel=1.5)
    assert c.endpoint_id is None and c.rejected["overloaded"] == 1
    # both conditions must hold: abs gap below the threshold keeps the hint
    assert choose_prefix_endpoint({"a": 512}, eps, max_imbalance_abs=10).endpoint_id == "a"
    # relative: 10 vs 8 is within 1.5x, so the hint stays even with a small abs threshold
    eps2 = [Ep("a", in_flight=10), Ep("b", in_flight=8)]
    assert choose_prefix_endpoint({"a": 512}, eps2, max_imbalance_abs=1, max_imbalance_rel=1.5).endpoint_id == "a"
    # unhealthy endpoints do not count as "least loaded"
    eps3 = [Ep("a", in_flight=3), Ep("b", in_flight=0, ok=False)]
    assert choose_prefix_endpoint({"a": 512}, eps3, max_imbalance_abs=2).endpoint_id == "a"


def test_cold_placement_spreads_new_prefixes() -> None:
    from kvgate.routing.prefix import ColdPlacement

    cold = ColdPlacement()
    eps = [Ep("a"), Ep("b"), Ep("c")]
    # all idle: rotate by least recently used, config order first
    assert [cold.pick(eps) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    # load first: a busy endpoint is skipped even if it is the least recently used
    eps[0].in_flight = 2
    assert cold.pick(eps) == "b"
    # unhealthy endpoints are never chosen; nothing healthy → None
    assert cold.pick([Ep("x", ok=False)]) is None


def test_min_match_ratio_ignores_a_shared_system_prompt_alone() -> None:
    eps = [Ep("a"), Ep("b")]
    # a new conversation: only the shared 1,024-token system prompt is cached (credited to "a")
    c = choose_prefix_endpoint({"a": 1024}, eps, min_match_ratio=0.5, num_tokens=3100)
    assert c.endpoint_id is None and c.rejected["below_min_ratio"] == 1
    # the next turn of a conversation: most of the prompt is cached on "b"
    c = choose_prefix_endpoint({"a": 1024, "b": 2816}, eps, min_match_ratio=0.5, num_tokens=3300)
    assert c.endpoint_id == "b" and c.matched_tokens == 2816
    # off by default
    assert choose_prefix_endpoint({"a": 1024}, eps, num_tokens=3100).endpoint_id == "a"


# --- load spread among the holders of the useful prefix (event index, issue 9) ---


def test_spread_picks_least_loaded_holder_within_one_block() -> None:
    eps = [Ep("a", 5), Ep("b", 1), Ep("c", 0)]
    matches = {"a": 512, "b": 496, "c": 256}
    # without spread: the seed rule (longest match wins even when loaded)
    assert choose_prefix_endpoint(matches, eps).endpoint_id == "a"
    # within one 16-token block: a and b hold the useful prefix; b is less loaded; c is too short
    choice = choose_prefix_endpoint(matches, eps, spread_tokens=16)
    assert (choice.endpoint_id, choice.matched_tokens, choice.best_tokens) == ("b", 496, 512)


def test_spread_equal_load_prefers_longer_then_config_order() -> None:
    eps = [Ep("a", 1), Ep("b", 1)]
    assert choose_prefix_endpoint({"a": 496, "b": 512}, eps, spread_tokens=16).endpoint_id == "b"
    assert choose_prefix_endpoint({"a": 512, "b": 512}, eps, spread_tokens=16).endpoint_id == "a"


def test_spread_hot_prefix_alternates_with_load() -> None:
    a, b = Ep("a", 0), Ep("b", 0)
    picks = []
    for _ in range(4):
        chosen = choose_prefix_endpoint({"a": 1024, "b": 1024}, [a, b], spread_tokens=16).endpoint_id
        picks.append(chosen)
        (a if chosen == "a" else b).in_flight += 1
    assert picks == ["a", "b", "a", "b"]


def test_spread_never_picks_unhealthy_and_keeps_guards() -> None:
    eps = [Ep("a", 0, ok=False), Ep("b", 4), Ep("c", 0)]
    choice = choose_prefix_endpoint({"a": 512, "b": 512}, eps, spread_tokens=16)
    assert choice.endpoint_id == "b" and choice.rejected["unhealthy"] == 1
    # min_match_ratio and the load guard still apply
    assert (
        choose_prefix_endpoint({"b": 100}, eps, spread_tokens=16, min_match_ratio=0.5, num_tokens=1000).endpoint_id
        is None
    )
    guarded = choose_prefix_endpoint({"b": 512}, eps, spread_tokens=16, max_imbalance_abs=2, max_imbalance_rel=1.5)
    assert guarded.endpoint_id is None and guarded.rejected["overloaded"] == 1
