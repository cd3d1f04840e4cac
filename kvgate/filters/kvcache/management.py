"""Per-instance cache management decisions from engine signals (issue 13). Pure: no I/O, injected clock.

The seed decides once, from the gateway process's CPU and memory, and acts on a configured (or the best
matched) instance. Here every decision names the instance it is for, using that instance's engine
snapshot (:mod:`.engine_signals`). The seed's thresholds keep their meaning, applied to the engine:

* ``memory_threshold`` — an instance is *under memory pressure* when its memory ratio (the larger of vLLM's
  ``kv_cache_usage_perc`` and LMCache's CPU-tier usage when known) is ``>= memory_threshold`` (0 = never);
* ``load_threshold`` — an instance is *loaded* when its load ratio (running / max_num_seqs, 1 while requests
  wait) is ``>= load_threshold`` (0 = never);
* ``hot_content_threshold`` — a prefix is *hot* when the request key was seen that many times within
  ``hot_window`` (the caller passes the count from :class:`~.hotstats.HotStats`; 0 = never).

Rules, for a request whose prefix is held by ``holders`` (from ``/lookup`` or the event index):

* **evict** (``enable_eviction``) the prefix on a holder under memory pressure — never a hot or pinned one;
* **compress** (``enable_compression``) it on a loaded holder (the seed's rule, per instance), never a pinned
  prefix;
* **pin** (``enable_pinning``) a hot prefix on each holder that is *not* under memory pressure, for
  ``pin_ttl`` seconds, while the pinned chunks of that instance stay within ``max_pinned_share`` (default 0.2,
  as vLLM's pinned-prefix work) of its LMCache capacity (``capacity_chunks``; unknown capacity → no pin).
  A pin already held is renewed (a new ``pin`` action) once half its TTL has passed and the prefix is still hot
  (not on an instance under pressure: there it lapses);
* **unpin** a pinned prefix that cooled (seen again but below the threshold); **lapse** pins whose TTL passed
  (``expire()``). LMCache 0.5.6 has no unpin route: its pins time out by themselves, so an executor may only
  drop its record for ``unpin``/``lapse``; the record is what the share cap counts.

A stale or missing snapshot gives no decision for that instance (``skipped`` says why). Every decision and
skip carries a reason for the metrics (``management_decisions_total{action, reason}``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvgate.filters.kvcache.engine_signals import EngineSnapshot

ActionKind = Literal["pin", "unpin", "lapse", "compress", "evict"]


@dataclass(frozen=True, slots=True)
class ManagementPolicy:
    enable_pinning: bool = False
    enable_compression: bool = False
    enable_eviction: bool = False
    memory_threshold: float = 0.0
    load_threshold: float = 0.0
    hot_content_threshold: int = 0
    pin_ttl: float = 300.0
    max_pinned_share: float = 0.2
    max_age: float = 5.0  # snapshots older than this are not used
    default_capacity_chunks: int = 0  # LMCache capacity of an instance not in ``capacity_chunks``

    def __post_init__(self) -> None:
        for name in ("memory_threshold", "load_threshold", "max_pinned_share"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1")
        if self.hot_content_threshold < 0 or self.pin_ttl <= 0 or self.max_age <= 0:
            raise ValueError("hot_content_threshold must be >= 0, pin_ttl and max_age > 0")


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    instance: str
    key: str
    reason: str
    chunks: int = 0


@dataclass(frozen=True, slots=True)
class Skip:
    action: str
    instance: str
    reason: str  # no_signals, memory_pressure, pin_cap, capacity_unknown, hot, pinned


@dataclass(slots=True)
class Decisions:
    actions: list[Action] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass(slots=True)
class _Pin:
    chunks: int
    pinned_at: float
    expires: float


def memory_ratio(s: EngineSnapshot) -> float:
    """The larger of GPU KV usage and LMCache CPU-tier usage (when known)."""
    return max(s.kv_usage or 0.0, s.lmcache_cpu_usage or 0.0)


class CacheManager:
    """Keeps the pin record and turns one request's view (holders, hotness, signals) into actions."""

    def __init__(
        self,
        policy: ManagementPolicy,
        *,
        capacity_chunks: Mapping[str, int] | None = None,
        max_num_seqs: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.policy = policy
        self.capacity_chunks = dict(capacity_chunks or {})
        self.max_num_seqs = dict(max_num_seqs or {})
        self._clock = clock
        self._pins: dict[str, dict[str, _Pin]] = {}  # instance -> key -> pin

    # -- pin record
    def pinned_chunks(self, instance: str) -> int:
        return sum(p.chunks for p in self._pins.get(instance, {}).values())

    def pinned_share(self, instance: str) -> float:
        cap = self.capacity(instance)
        return self.pinned_chunks(instance) / cap if cap > 0 else 0.0

    def capacity(self, instance: str) -> int:
        return self.capacity_chunks.get(instance, self.policy.default_capacity_chunks)

    def is_pinned(self, instance: str, key: str) -> bool:
        p = self._pins.get(instance, {}).get(key)
        return p is not None and p.expires > self._clock()

    def pins(self) -> dict[str, list[str]]:
        return {i: sorted(k) for i, k in self._pins.items() if k}

    def expire(self) -> list[Action]:
        """Drop pins whose TTL passed; returns one ``lapse`` per dropped pin."""
        now = self._clock()
        out: list[Action] = []
        for inst, pins in self._pins.items():
            for key in [k for k, p in pins.items() if p.expires <= now]:
                out.append(Action("lapse", inst, key, "ttl", pins.pop(key).chunks))
        return out

    def forget_instance(self, instance: str) -> None:
        """An engine left or restarted: its pins are gone."""
        self._pins.pop(instance, None)

    # -- decisions
    def _load(self, s: EngineSnapshot) -> float:
        return s.load(self.max_num_seqs.get(s.instance, 0))

    def decide(
        self,
        key: str,
        holders: Sequence[str],
        signals: Mapping[str, EngineSnapshot | None],
        hot_count: int,
        prefix_chunks: int,
    ) -> Decisions:
        """Actions for the prefix ``key`` (``prefix_chunks`` LMCache chunks long) held by ``holders``."""
        pol, now = self.policy, self._clock()
        out = Decisions(actions=self.expire())
        hot = pol.hot_content_threshold > 0 and hot_count >= pol.hot_content_threshold
        for inst in dict.fromkeys(holders):
            pin = self._pins.get(inst, {}).get(key)
            snap = signals.get(inst)
            if pin is not None and pol.enable_pinning and not hot:
                del self._pins[inst][key]
                out.actions.append(Action("unpin", inst, key, "cooled", pin.chunks))
                pin = None
            if snap is None or snap.at is None or snap.stale(now, pol.max_age):
                out.skipped.append(Skip("any", inst, "no_signals"))
                continue
            pressure = pol.memory_threshold > 0 and memory_ratio(snap) >= pol.memory_threshold
            loaded = pol.load_threshold > 0 and self._load(snap) >= pol.load_threshold
            if pol.enable_pinning and hot:
                self._decide_pin(out, inst, key, pin, pressure, prefix_chunks, now)
            if pol.enable_compression and loaded:
                if pin is not None:
                    out.skipped.append(Skip("compress", inst, "pinned"))
                else:
                    out.actions.append(Action("compress", inst, key, "high_load"))
            if pol.enable_eviction and pressure:
                if hot or pin is not None:
                    out.skipped.append(Skip("evict", inst, "hot" if hot else "pinned"))
                else:
                    out.actions.append(Action("evict", inst, key, "memory_threshold"))
        return out

    def _decide_pin(
        self,
        out: Decisions,
        inst: str,
        key: str,
        pin: _Pin | None,
        pressure: bool,
        chunks: int,
        now: float,
    ) -> None:
        pol = self.policy
        if pressure:  # never pin on an instance that is itself under memory pressure
            out.skipped.append(Skip("pin", inst, "memory_pressure"))
            return
        if pin is not None:
            if now - pin.pinned_at >= pol.pin_ttl / 2:
                pin.pinned_at, pin.expires = now, now + pol.pin_ttl
                out.actions.append(Action("pin", inst, key, "renew", pin.chunks))
            return
        cap = self.capacity(inst)
        if cap <= 0:
            out.skipped.append(Skip("pin", inst, "capacity_unknown"))
            return
        limit = math.floor(pol.max_pinned_share * cap)
        if chunks <= 0 or self.pinned_chunks(inst) + chunks > limit:
            out.skipped.append(Skip("pin", inst, "pin_cap"))
            return
        self._pins.setdefault(inst, {})[key] = _Pin(chunks, now, now + pol.pin_ttl)
        out.actions.append(Action("pin", inst, key, "hot_content", chunks))

    def pin_failed(self, instance: str, key: str) -> None:
        """The executor could not pin: drop the record so the share cap does not count it."""
        self._pins.get(instance, {}).pop(key, None)
