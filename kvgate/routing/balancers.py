"""Load-balancing policies (pure: no I/O, injectable randomness), shared by the proxy and virtual-time replay."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class EndpointView(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def weight(self) -> int: ...


E = TypeVar("E", bound=EndpointView)


class Balancer:
    """Every policy gets the same inputs: the usable candidates and the request's hash key (``None`` without one).

    Policies that do not hash ignore the key; what a policy needs beyond that is given at construction
    (:func:`make_balancer`), so callers never test for a concrete policy.
    """

    name = "base"
    keyed = True  # reads the request's hash key (the others are not handed one: no header scan per request)

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        raise NotImplementedError


class RoundRobin(Balancer):
    """Cycles over the candidates; the cursor advances on every pick (as in Pixiu)."""

    name = "round_robin"
    keyed = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        if not candidates:
            return None
        ep = candidates[self._next % len(candidates)]
        self._next += 1
        return ep


class RandomPick(Balancer):
    name = "random"
    keyed = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        return self._rng.choice(candidates) if candidates else None


class WeightedRandom(Balancer):
    name = "weighted_random"
    keyed = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        if not candidates:
            return None
        weights = [max(0, c.weight) for c in candidates]
        if sum(weights) <= 0:
            return self._rng.choice(candidates)
        return self._rng.choices(list(candidates), weights=weights, k=1)[0]


class LeastRequest(Balancer):
    """Fewest in-flight requests; ties rotate so that an idle fleet is not herded onto one endpoint."""

    name = "least_request"
    keyed = False

    def __init__(self) -> None:
        self._rr = 0

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        if not candidates:
            return None
        low = min(c.in_flight for c in candidates)
        tied = [c for c in candidates if c.in_flight == low]
        ep = tied[self._rr % len(tied)]
        self._rr += 1
        return ep


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class RingHash(Balancer):
    """Consistent hash ring (160 virtual nodes per endpoint) on a request key, e.g. a session header.

    Without a key the pick falls back to round robin. Unhealthy endpoints are skipped clockwise, so
    only the keys of a failed endpoint move. ``members``: every endpoint id of the cluster, healthy or not
    (the ring is then built once); without it the ring is built over the candidates of each pick.
    ``MaglevHashing`` maps here too (same contract: stable key → endpoint with minimal disruption),
    documented in docs/architecture.md.
    """

    name = "ring_hash"
    VNODES = 160

    def __init__(self, members: Sequence[str] | None = None) -> None:
        self._members = tuple(members) if members is not None else None
        self._ring_ids: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []
        self._fallback = RoundRobin()

    def _build(self, ids: tuple[str, ...]) -> None:
        pts = sorted((_h64(f"{eid}#{v}"), eid) for eid in ids for v in range(self.VNODES))
        self._points = [p for p, _ in pts]
        self._owners = [o for _, o in pts]
        self._ring_ids = ids

    def pick_from(self, all_ids: Sequence[str], candidates: Sequence[E], key: str | None) -> E | None:
        if not candidates:
            return None
        if not key:
            return self._fallback.pick(candidates)
        ids = tuple(all_ids)
        if ids != self._ring_ids:
            self._build(ids)
        usable = {c.id: c for c in candidates}
        i = bisect.bisect_left(self._points, _h64(key))
        n = len(self._points)
        for step in range(n):
            owner = self._owners[(i + step) % n]
            if owner in usable:
                return usable[owner]
        return None

    def pick(self, candidates: Sequence[E], key: str | None = None) -> E | None:
        members = self._members if self._members is not None else [c.id for c in candidates]
        return self.pick_from(members, candidates, key)


def make_balancer(policy: str, rng: random.Random | None = None, *, members: Sequence[str] | None = None) -> Balancer:
    """The balancer for ``policy``; ``members`` (all endpoint ids of the cluster) fixes a hash ring's membership."""
    if policy == "round_robin":
        return RoundRobin()
    if policy == "random":
        return RandomPick(rng)
    if policy == "weighted_random":
        return WeightedRandom(rng)
    if policy == "least_request":
        return LeastRequest()
    if policy in ("ring_hash", "maglev"):
        return RingHash(members)
    raise ValueError(f"unknown load-balancing policy {policy!r}")
