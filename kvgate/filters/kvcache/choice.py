"""The routing hint: from a prefix-match map (``/lookup`` or the event index) to the preferred endpoint.

:meth:`RouteChoice.apply` adds the planned replicas (``replication.enabled``, :mod:`.managed`), lets
:func:`kvgate.routing.prefix.choose_prefix_endpoint` pick among the route cluster's endpoints, sets
``ctx.params[PREFERRED_ENDPOINT_PARAM]`` and counts the rejections and the predicted matched tokens.
:meth:`RouteChoice.index_decision` does so for the event index and adds the ``x-kvgate-kvcache`` decision header;
:meth:`RouteChoice.place_cold` is ``cold_placement: lru`` for a request that got no hint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, RequestContext
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.managed import CacheManagement
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.routing.prefix import ColdPlacement, PrefixChoice, choose_prefix_endpoint
from kvgate.runtime import Runtime

if TYPE_CHECKING:  # imported when index_source needs it: the lookup path loads no ZMQ
    from kvgate.filters.kvcache.event_index import EventIndex

log = logging.getLogger("kvgate.filters.kvcache")


def predicted(choice: PrefixChoice | None) -> str:
    """The decision header's predicted matched tokens: for the chosen instance and for the best one."""
    if choice is None or choice.endpoint_id is None:
        return ""
    return f";matched={choice.matched_tokens};best={choice.best_tokens}"


class RouteChoice:
    """See the module docstring. ``event_index``: the filter's (``index_source: events | both``), else ``None``."""

    def __init__(
        self,
        config: KVCacheConfig,
        runtime: Runtime,
        *,
        metrics: KVCacheMetrics,
        management: CacheManagement | None,
        event_index: EventIndex | None,
        cold: ColdPlacement | None,
    ) -> None:
        self.cfg = config
        self.runtime = runtime
        self.metrics = metrics
        self.management = management
        self.event_index = event_index
        self.cold = cold

    def from_index(self, ctx: RequestContext, index: EventIndex, tokens: Sequence[int], key: str) -> None:
        """``index_source: events | both``: match the event index (in memory, no controller call)."""
        t0 = time.perf_counter()
        self.index_decision(ctx, index.match(tokens, key), len(tokens), t0, tokens)

    def index_decision(
        self,
        ctx: RequestContext,
        matches: Mapping[str, int],
        num_tokens: int,
        t0: float,
        tokens: Sequence[int] | None = None,
    ) -> None:
        assert self.event_index is not None
        if not matches:
            outcome, choice = "empty", None
        else:
            outcome, choice = self.apply(ctx, matches, num_tokens, self.event_index.spread_tokens(), tokens)
        self.metrics.routing_lookups.count(outcome).n += 1
        if ctx.decisions:
            label = f"{outcome};source=events;match_ms={(time.perf_counter() - t0) * 1e3:.2f}" + predicted(choice)
            ctx.response_headers.append((b"x-kvgate-kvcache", label.encode()))

    def place_cold(self, ctx: RequestContext) -> None:
        """``cold_placement: lru``: no usable cached prefix, so spread the new prefix (see ColdPlacement)."""
        assert self.cold is not None
        cluster = self.runtime.clusters.get(ctx.cluster_name) if ctx.cluster_name else None
        if cluster is None:
            return
        target = self.cold.pick(cluster.endpoints)
        if target is None:
            return
        ctx.params[PREFERRED_ENDPOINT_PARAM] = target
        self.metrics.cold_placements.labels(target).inc()
        if ctx.decisions:
            ctx.response_headers.append((b"x-kvgate-kvcache-cold", target.encode()))

    def apply(
        self,
        ctx: RequestContext,
        matches: Mapping[str, int],
        num_tokens: int,
        spread_tokens: int = 0,
        tokens: Sequence[int] | None = None,
    ) -> tuple[str, PrefixChoice]:
        cluster = self.runtime.clusters.get(ctx.cluster_name) if ctx.cluster_name else None
        mgmt = self.management
        if mgmt is not None and mgmt.planner is not None and tokens is not None and cluster is not None:
            matches = mgmt.on_route(ctx, tokens, matches, cluster.endpoints, spread_tokens)
        choice = choose_prefix_endpoint(
            matches,
            cluster.endpoints if cluster is not None else None,
            min_match_tokens=self.cfg.min_match_tokens,
            max_imbalance_abs=self.cfg.max_imbalance_abs,
            max_imbalance_rel=self.cfg.max_imbalance_rel,
            min_match_ratio=self.cfg.min_match_ratio,
            num_tokens=num_tokens,
            spread_tokens=spread_tokens,
        )
        for reason, n in choice.rejected.items():
            self.metrics.routing_rejected.labels(reason).inc(n)
        if choice.endpoint_id is None:
            log.debug("[kvcache] routing lookup found no eligible instance (rejected: %s)", dict(choice.rejected))
            return "no_match", choice
        ctx.params[PREFERRED_ENDPOINT_PARAM] = choice.endpoint_id
        self.metrics.predicted_chosen.observe(choice.matched_tokens)
        self.metrics.predicted_best.observe(choice.best_tokens)
        log.debug("[kvcache] routing preferred endpoint set: %s (%d tokens)", choice.endpoint_id, choice.matched_tokens)
        return "routed", choice
