"""Cache-management strategy: Pixiu's ``MakeDecision`` rules and ordered execution.

Rules (from one load snapshot):

* compress if ``enable_compression`` and ``load_threshold > 0`` and ``cpu >= load_threshold``;
* evict if ``enable_eviction`` and ``memory_threshold > 0`` and ``memory >= memory_threshold``;
* pin if ``enable_pinning`` and the request key is hot (``hot_content_threshold`` > 0).

Execution order is always compress → pin → evict, stopping at the first error. Targets are the
configured ``*_instance_id`` / ``*_location`` / ``compress_method`` (sent verbatim, as in Pixiu); when an
instance id is left empty we use the instance with the longest lookup match (and its location)
instead of sending "" — and skip the action if there is no such instance.

A 404/405 answer (e.g. ``/evict``, which real LMCache 0.5.6 does not serve, or a proxy in front of the
controller during a rollout) marks the action unsupported for a back-off: it is skipped (result
``unsupported``) until ``UNSUPPORTED_BACKOFF_BASE`` seconds have passed, then the next decision re-probes it;
each further 404/405 doubles the back-off up to ``UNSUPPORTED_BACKOFF_MAX``. A successful re-probe clears it.
Every 404/405 goes to ``on_unsupported(action, exc, strikes, backoff)``; ``strikes == 1`` is the first one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from kvgate.filters.kvcache.config import CacheStrategyConfig
from kvgate.filters.kvcache.errors import CircuitOpenError, NotSupportedError
from kvgate.filters.kvcache.lmcache_client import ActionResult, LMCacheClient, LookupResult
from kvgate.filters.kvcache.signals import LoadSnapshot

ACTION_ORDER = ("compress", "pin", "evict")
UNSUPPORTED_BACKOFF_BASE = 30.0  # seconds before the first re-probe of a route that answered 404/405
UNSUPPORTED_BACKOFF_MAX = 1800.0  # cap of the doubling back-off


def unsupported_backoff(strikes: int) -> float:
    """Back-off after the ``strikes``-th consecutive 404/405 (1-based): 30 s, 60 s, ... capped at 30 min."""
    return min(UNSUPPORTED_BACKOFF_BASE * 2.0 ** max(0, strikes - 1), UNSUPPORTED_BACKOFF_MAX)


@dataclass(slots=True)
class _Disabled:
    retry_at: float
    strikes: int


@dataclass(frozen=True, slots=True)
class Decision:
    compress: bool = False
    pin: bool = False
    evict: bool = False
    reason: str = ""  # Pixiu: the last applicable rule sets it

    def actions(self) -> list[str]:
        return [a for a in ACTION_ORDER if getattr(self, a)]

    def __bool__(self) -> bool:
        return self.compress or self.pin or self.evict


def make_decision(cfg: CacheStrategyConfig, load: LoadSnapshot, hot: bool) -> Decision:
    compress = cfg.enable_compression and cfg.load_threshold > 0 and load.cpu_usage >= cfg.load_threshold
    evict = cfg.enable_eviction and cfg.memory_threshold > 0 and load.memory_usage >= cfg.memory_threshold
    pin = cfg.enable_pinning and cfg.hot_content_threshold > 0 and hot
    reason = "hot_content" if pin else "memory_threshold" if evict else "high_load" if compress else ""
    return Decision(compress=compress, pin=pin, evict=evict, reason=reason)


@dataclass(frozen=True, slots=True)
class Target:
    instance_id: str
    location: str


def resolve_target(instance_id: str, location: str, lookup: LookupResult | None) -> Target | None:
    """Configured id (verbatim) or the best-matched instance; location from config, else from the lookup."""
    if not instance_id:
        best = lookup.best() if lookup is not None else None
        if best is None or best[1].matched_tokens <= 0:
            return None
        instance_id = best[0]
    if not location and lookup is not None and instance_id in lookup.layout:
        location = lookup.layout[instance_id].location
    return Target(instance_id, location)


Runner = Callable[[Callable[[], Awaitable[ActionResult]]], Awaitable[ActionResult]]


class StrategyExecutor:
    """Runs a :class:`Decision` against the controller. ``run`` applies retry + the management breaker."""

    def __init__(
        self,
        cfg: CacheStrategyConfig,
        client: LMCacheClient,
        run: Runner,
        on_result: Callable[[str, str], None] = lambda action, result: None,
        on_unsupported: Callable[[str, NotSupportedError, int, float], None] = lambda action, exc, n, b: None,
        on_supported: Callable[[str], None] = lambda action: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.client = client
        self._run = run
        self._on_result = on_result
        self._on_unsupported = on_unsupported
        self._on_supported = on_supported
        self._clock = clock
        self._disabled: dict[str, _Disabled] = {}

    @property
    def unsupported(self) -> set[str]:
        """Actions whose route answered 404/405 and that have not succeeded since (skipped or re-probing)."""
        return set(self._disabled)

    def _call(
        self, action: str, tokens: Sequence[int], target: Target, deadline: float | None
    ) -> Callable[[], Awaitable[ActionResult]]:
        c, cfg = self.client, self.cfg
        if action == "compress":
            return lambda: c.compress(
                tokens, target.instance_id, target.location, cfg.compress_method, deadline=deadline
            )
        if action == "pin":
            return lambda: c.pin(tokens, target.instance_id, target.location, deadline=deadline)
        return lambda: c.evict(tokens, target.instance_id, deadline=deadline)

    def _target(self, action: str, lookup: LookupResult | None) -> Target | None:
        cfg = self.cfg
        if action == "compress":
            return resolve_target(cfg.compress_instance_id, cfg.compress_location, lookup)
        if action == "pin":
            return resolve_target(cfg.pin_instance_id, cfg.pin_location, lookup)
        return resolve_target(cfg.evict_instance_id, "", lookup)

    async def run_action(
        self, action: str, tokens: Sequence[int], target: Target | None, deadline: float | None = None
    ) -> str:
        """One action on ``target``: ``ok``, ``unsupported`` (404/405 back-off) or ``no_target``; other failures
        raise (the caller counts them)."""
        disabled = self._disabled.get(action)
        if disabled is not None and self._clock() < disabled.retry_at:
            return "unsupported"
        if target is None:
            return "no_target"
        try:
            await self._run(self._call(action, tokens, target, deadline))
        except NotSupportedError as exc:
            strikes = disabled.strikes + 1 if disabled is not None else 1
            backoff = unsupported_backoff(strikes)
            self._disabled[action] = _Disabled(self._clock() + backoff, strikes)
            self._on_unsupported(action, exc, strikes, backoff)
            return "unsupported"
        if disabled is not None:
            del self._disabled[action]
            self._on_supported(action)
        return "ok"

    async def execute(
        self, decision: Decision, tokens: Sequence[int], lookup: LookupResult | None, deadline: float | None = None
    ) -> list[tuple[str, str]]:
        """Execute in order; returns ``[(action, result)]``. Re-raises the first real error (stopping)."""
        done: list[tuple[str, str]] = []

        def note(action: str, result: str) -> None:
            done.append((action, result))
            self._on_result(action, result)

        for action in decision.actions():
            target = self._target(action, lookup)
            try:
                result = await self.run_action(action, tokens, target, deadline)
            except CircuitOpenError:
                note(action, "breaker_open")
                raise
            except TimeoutError:
                note(action, "timeout")
                raise
            except Exception:
                note(action, "error")
                raise
            note(action, result)
        return done
