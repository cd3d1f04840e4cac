"""Prefix-match endpoint choice for KV-cache-aware routing (pure: no I/O, no clock).

Input: matched-token counts per LMCache ``instance_id`` (from ``/lookup``) and the route's cluster
endpoints. The choice (fixing Pixiu's random-map-order pick):

* only instances that are endpoints of the cluster and healthy are eligible (others are counted
  as ``unknown_instance`` / ``unhealthy``);
* a match must be positive and at least ``min_match_tokens`` (else ``below_min_match``), and cover at
  least ``min_match_ratio`` of the prompt's ``num_tokens`` (else ``below_min_ratio``). The ratio
  keeps a ubiquitous shared system prompt from dragging every *new* conversation to the one
  instance LMCache credits for it (the controller credits only the first registered holder of a
  chunk, so the other holders are invisible);
* the longest match wins; ties go to the lower in-flight load, then to config order. With
  ``spread_tokens > 0`` (the event index: every holder is known) every eligible instance whose match is
  within ``spread_tokens`` of the longest is a holder of the useful prefix, and the least loaded of them
  wins (then the longer match, then config order), so a hot prefix spreads over its holders;
* load guard (off unless ``max_imbalance_abs > 0``): if the winner's in-flight count exceeds the
  least-loaded healthy endpoint's by at least ``max_imbalance_abs`` AND is more than
  ``max_imbalance_rel`` times it, the cache hint is dropped (``overloaded``) and the load balancer
  decides — SGLang's abs/rel imbalance gate, so a hot prefix cannot pile onto one engine.

Without a cluster view (``endpoints=None``) every positive match is eligible and ties go to the
lexicographically smallest id, so the result is still deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class PrefixEndpoint(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    def healthy(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PrefixChoice:
    endpoint_id: str | None
    matched_tokens: int = 0
    best_tokens: int = 0  # the longest match any instance reported (eligible or not)
    rejected: Counter[str] = field(default_factory=Counter)


def _default_healthy(ep: PrefixEndpoint) -> bool:
    return ep.healthy()


def choose_prefix_endpoint(
    matches: Mapping[str, int],
    endpoints: Sequence[PrefixEndpoint] | None,
    *,
    min_match_tokens: int = 0,
    healthy: Callable[[PrefixEndpoint], bool] = _default_healthy,
    max_imbalance_abs: int = 0,
    max_imbalance_rel: float = 1.5,
    min_match_ratio: float = 0.0,
    num_tokens: int = 0,
    spread_tokens: int = 0,
) -> PrefixChoice:
    """Pick the endpoint holding the longest cached prefix, or ``None`` (see module docstring)."""
    choice = _choose(
        matches,
        endpoints,
        min_match_tokens=min_match_tokens,
        healthy=healthy,
        max_imbalance_abs=max_imbalance_abs,
        max_imbalance_rel=max_imbalance_rel,
        min_match_ratio=min_match_ratio,
        num_tokens=num_tokens,
        spread_tokens=spread_tokens,
    )
    best = max(matches.values(), default=0)
    return PrefixChoice(choice.endpoint_id, choice.matched_tokens, best, choice.rejected)


def _choose(
    matches: Mapping[str, int],
    endpoints: Sequence[PrefixEndpoint] | None,
    *,
    min_match_tokens: int,
    healthy: Callable[[PrefixEndpoint], bool],
    max_imbalance_abs: int,
    max_imbalance_rel: float,
    min_match_ratio: float,
    num_tokens: int,
    spread_tokens: int,
) -> PrefixChoice:
    rejected: Counter[str] = Counter()
    floor = max(1, min_match_tokens)
    if min_match_ratio > 0 and num_tokens > 0:
        ratio_floor = min_match_ratio * num_tokens
        if all(n < ratio_floor for n in matches.values()):
            rejected["below_min_ratio"] += len(matches)
            return PrefixChoice(None, 0, 0, rejected)
        floor = max(floor, int(-(-ratio_floor // 1)))
    if endpoints is None:
        best_id: str | None = None
        best_n = 0
        for iid in sorted(matches):
            n = matches[iid]
            if n < floor:
                rejected["below_min_match"] += 1
                continue
            if n > best_n:
                best_id, best_n = iid, n
        return PrefixChoice(best_id, best_n if best_id else 0, 0, rejected)

    order = {ep.id: (i, ep) for i, ep in enumerate(endpoints)}
    eligible: list[tuple[int, int, PrefixEndpoint]] = []  # (matched, index, endpoint)
    for iid, n in matches.items():
        entry = order.get(iid)
        if entry is None:
            rejected["unknown_instance"] += 1
            continue
        index, ep = entry
        if n < floor:
            rejected["below_min_match"] += 1
            continue
        if not healthy(ep):
            rejected["unhealthy"] += 1
            continue
        eligible.append((n, index, ep))
    if not eligible:
        return PrefixChoice(None, 0, 0, rejected)
    top = max(n for n, _, _ in eligible)
    cut = top - spread_tokens if spread_tokens > 0 else top
    # (in_flight, -matched, index) among the holders of the useful prefix; without spread only the
    # longest match qualifies, so this is the seed rule (longest, then lower in-flight, then config order).
    n_best, _, best_ep = min(
        ((n, i, ep) for n, i, ep in eligible if n >= cut), key=lambda e: (e[2].in_flight, -e[0], e[1])
    )
    if max_imbalance_abs > 0:
        low = min((ep.in_flight for ep in endpoints if healthy(ep)), default=0)
        load = best_ep.in_flight
        if load - low >= max_imbalance_abs and load > max_imbalance_rel * low:
            rejected["overloaded"] += 1
            return PrefixChoice(None, 0, 0, rejected)
    return PrefixChoice(best_ep.id, n_best, 0, rejected)


class ColdPlacement:
    """Where a request with no usable cached prefix goes (``cold_placement: lru``).

    Among healthy endpoints: the fewest in-flight requests, then the one that least recently received
    a cold request, then config order. Spreading *new* prefixes this way (llm-d's "no-hit LRU" idea)
    keeps sessions evenly distributed, so that later cache-affine turns do not pile onto whichever
    engine a round-robin cursor happened to favour. Pure and deterministic; not thread-safe.
    """

    def __init__(self) -> None:
        self._seq = 0
        self._last: dict[str, int] = {}

    def pick(
        self, endpoints: Sequence[PrefixEndpoint], healthy: Callable[[PrefixEndpoint], bool] = _default_healthy
    ) -> str | None:
        best: tuple[int, int, int] | None = None
        best_id: str | None = None
        for index, ep in enumerate(endpoints):
            if not healthy(ep):
                continue
            rank = (ep.in_flight, self._last.get(ep.id, -1), index)
            if best is None or rank < best:
                best, best_id = rank, ep.id
        if best_id is not None:
            self._seq += 1
            self._last[best_id] = self._seq
        return best_id
