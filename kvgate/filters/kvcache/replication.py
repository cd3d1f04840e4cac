"""Hot-prefix replication planner (issue 13). Pure: no I/O, injected clock.

When a prefix is hot *and* every instance holding it is overloaded (the load guard rejected the holder, or
its in-flight count is out of balance with the least-loaded endpoint), routing can only choose between a
cache hit on a queue and a cold prefill elsewhere. Replication makes a second instance a holder: the planner
answers "warm instance X with prefix P" and the filter sends P there once as a 1-token prefill
(``max_tokens: 1``) through the gateway's own upstream client (or LMCache ``/move`` with ``should_copy``
where P2P is available). Later requests are routed among all holders by load.

The gateway keeps its own record of replicas (:meth:`ReplicaPlanner.holders`): LMCache's ``/lookup`` credits
each chunk to the *first* registered holder only, so a replica never shows up there. With the event index
the replica's own KV events make it a holder as well; the record covers the gap until they arrive.

Bounds: at most ``max_replicas`` extra holders per prefix, at most one warm-up in flight per prefix, a
global token bucket (``rate`` warm-ups per second, ``burst``), at most ``max_keys`` prefixes recorded (the
least recently planned forgotten first), and replicas age out after ``replica_ttl`` unless confirmed again.
Every refusal carries a reason for the metrics (``replications_total{result}``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    max_replicas: int = 3  # extra holders per prefix the gateway creates
    rate: float = 2.0  # warm-ups per second (token bucket refill)
    burst: int = 4
    replica_ttl: float = 120.0  # a replica not confirmed again within this is forgotten
    pending_timeout: float = 30.0  # a warm-up not confirmed within this is dropped (frees the slot)
    max_keys: int = 1024
    max_imbalance_abs: int = 2  # overload test (as the load guard): holder - least >= abs ...
    max_imbalance_rel: float = 1.5  # ... and holder > rel × least

    def __post_init__(self) -> None:
        if self.max_replicas < 0 or self.burst < 1 or self.rate <= 0 or self.max_keys < 1:
            raise ValueError("max_replicas must be >= 0, burst and max_keys >= 1, rate > 0")
        if self.replica_ttl <= 0 or self.pending_timeout <= 0 or self.max_imbalance_rel < 1:
            raise ValueError("replica_ttl and pending_timeout must be > 0, max_imbalance_rel >= 1")


@dataclass(frozen=True, slots=True)
class Warm:
    """Send ``key``'s prefix to ``instance`` once (1-token prefill); ``source`` is the overloaded holder."""

    key: str
    instance: str
    source: str


@dataclass(slots=True)
class _Entry:
    replicas: dict[str, float] = field(default_factory=dict)  # instance -> expires
    pending: tuple[str, float] | None = None  # (instance, deadline)


def is_overloaded(holder_load: float, least_load: float, abs_gap: int, rel: float) -> bool:
    """The load guard's test: ``holder - least >= abs_gap`` and ``holder > rel × least``."""
    return holder_load - least_load >= abs_gap and holder_load > rel * least_load


class ReplicaPlanner:
    def __init__(self, policy: ReplicationPolicy | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.policy = policy or ReplicationPolicy()
        self._clock = clock
        self._keys: OrderedDict[str, _Entry] = OrderedDict()
        self._tokens = float(self.policy.burst)
        self._refilled = clock()

    # -- record
    def holders(self, key: str, confirmed_within: float | None = None) -> list[str]:
        """Instances the gateway made holders of ``key`` (confirmed, not expired); with ``confirmed_within``
        only those confirmed at most that many seconds ago (an event index knows the older ones itself)."""
        e = self._keys.get(key)
        if e is None:
            return []
        now = self._clock()
        for inst in [i for i, exp in e.replicas.items() if exp <= now]:
            del e.replicas[inst]
        if confirmed_within is None:
            return list(e.replicas)
        since = now + self.policy.replica_ttl - confirmed_within  # expires = confirmed + replica_ttl
        return [i for i, exp in e.replicas.items() if exp >= since]

    def confirm(self, warm: Warm, ok: bool) -> None:
        """The warm-up finished: record the replica on success; free the pending slot either way."""
        e = self._keys.get(warm.key)
        if e is None:
            return
        if e.pending is not None and e.pending[0] == warm.instance:
            e.pending = None
        if ok:
            e.replicas[warm.instance] = self._clock() + self.policy.replica_ttl

    def forget_instance(self, instance: str) -> None:
        for e in self._keys.values():
            e.replicas.pop(instance, None)
            if e.pending is not None and e.pending[0] == instance:
                e.pending = None

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    # -- planning
    def _take_token(self, now: float) -> bool:
        p = self.policy
        self._tokens = min(float(p.burst), self._tokens + (now - self._refilled) * p.rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def plan(
        self,
        key: str,
        *,
        hot: bool,
        holders: Sequence[str],
        candidates: Sequence[str],
        load: Mapping[str, float],
    ) -> tuple[Warm | None, str]:
        """Whether to warm a new holder of ``key``; returns ``(warm or None, reason)``.

        ``holders``: instances known to hold the prefix (index / ``/lookup``; the planner adds its own
        replicas). ``candidates``: healthy endpoints of the route's cluster, in config order. ``load``:
        in-flight requests per instance. Reasons: ``planned``, ``not_hot``, ``no_holder``,
        ``not_overloaded``, ``pending``, ``max_replicas``, ``no_candidate``, ``rate_limited``.
        """
        if not hot:
            return None, "not_hot"
        all_holders = list(dict.fromkeys([*holders, *self.holders(key)]))
        live = [h for h in all_holders if h in candidates]
        if not live:
            return None, "no_holder"
        others = [c for c in candidates if c not in all_holders]
        if not others:
            return None, "no_candidate"
        least = min(load.get(c, 0.0) for c in candidates)
        p = self.policy
        if not all(is_overloaded(load.get(h, 0.0), least, p.max_imbalance_abs, p.max_imbalance_rel) for h in live):
            return None, "not_overloaded"
        now = self._clock()
        e = self._keys.get(key)
        if e is not None:
            if e.pending is not None and e.pending[1] > now:
                return None, "pending"
            e.pending = None
            if len(self.holders(key)) >= p.max_replicas:
                return None, "max_replicas"
        elif p.max_replicas == 0:
            return None, "max_replicas"
        if not self._take_token(now):
            return None, "rate_limited"
        target = min(others, key=lambda c: (load.get(c, 0.0), candidates.index(c)))
        source = max(live, key=lambda h: load.get(h, 0.0))
        if e is None:
            e = self._keys[key] = _Entry()
            while len(self._keys) > p.max_keys:
                self._keys.popitem(last=False)
        self._keys.move_to_end(key)
        e.pending = (target, now + p.pending_timeout)
        return Warm(key, target, source), "planned"


class LoadedEndpoint(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    def healthy(self) -> bool: ...


def plan_for_matches(
    planner: ReplicaPlanner,
    key: str,
    *,
    hot: bool,
    matches: Mapping[str, int],
    spread_tokens: int,
    min_tokens: int,
    endpoints: Sequence[LoadedEndpoint],
) -> tuple[Warm | None, str]:
    """:meth:`ReplicaPlanner.plan` from a routing decision's inputs: the holders are the instances whose match is
    within ``spread_tokens`` of the best (and at least ``min_tokens``, one LMCache chunk); the candidates are the
    healthy endpoints, loaded by their in-flight requests. Shared by the filter and the virtual replay."""
    best = max(matches.values(), default=0)
    cut = max(min_tokens, best - spread_tokens)
    holders = [inst for inst, n in matches.items() if n >= cut]
    healthy = [ep for ep in endpoints if ep.healthy()]
    return planner.plan(
        key,
        hot=hot,
        holders=holders,
        candidates=[ep.id for ep in healthy],
        load={ep.id: float(ep.in_flight) for ep in healthy},
    )


def credit_replicas(matches: Mapping[str, int], replicas: Sequence[str], shared_tokens: int) -> Mapping[str, int]:
    """``matches`` with each replica credited with the replicated prefix: the shared prefix's length, at most the
    best match (``matches`` itself when there is nothing to add). Shared by the filter and the virtual replay."""
    if not replicas or not matches:
        return matches
    credit = min(max(matches.values()), shared_tokens)
    out = dict(matches)
    for r in replicas:
        if out.get(r, 0) < credit:
            out[r] = credit
    return out
