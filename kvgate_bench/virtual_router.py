"""The routing decision of one gateway mode, replayed without HTTP (TEST AND BENCHMARK TOOL).

Same code as the gateway: the mode's balancer from :func:`~kvgate.routing.balancers.make_balancer` over
per-engine in-flight counts (:class:`VEndpoint`), and for kvcache modes the controller lookup (or the
KV-event index model) + :func:`~kvgate.routing.prefix.choose_prefix_endpoint`, whose choice replaces the pick
(:class:`VirtualRouter`). Used by the virtual-time runner (:mod:`kvgate_bench.virtual`).
"""

from __future__ import annotations

from collections.abc import Mapping

from kvgate.routing.balancers import make_balancer
from kvgate.routing.prefix import ColdPlacement, choose_prefix_endpoint
from kvgate_bench.modes import Mode
from kvgate_bench.virtual_events import HashEventIndex
from kvgate_bench.virtual_manage import PlannedWarm, VirtualManagement
from kvgate_bench.virtual_requests import GPU_BLOCK_SIZE, VRequest
from kvgate_sim.controller_index import ControllerIndex
from kvgate_sim.engine_model import EngineCore, Prompt


class VEndpoint:
    """Endpoint view for the balancers and the prefix chooser: id, in-flight, weight, health."""

    __slots__ = ("core", "id", "in_flight", "index", "weight")

    def __init__(self, index: int, core: EngineCore) -> None:
        self.index = index
        self.id = core.instance_id
        self.core = core
        self.in_flight = 0
        self.weight = 1

    def healthy(self) -> bool:
        """Simulated engines never fail."""
        return True


class VirtualRouter:
    """The routing decision of one gateway mode, replayed without HTTP."""

    def __init__(
        self,
        mode: Mode,
        endpoints: list[VEndpoint],
        index: ControllerIndex,
        min_match_tokens: int = 0,
        events: HashEventIndex | None = None,
    ):
        if not mode.virtual_supported:
            raise ValueError(f"{mode.name} has no virtual-time equivalent")
        self.mode = mode
        self.endpoints = endpoints
        self.by_id = {e.id: e for e in endpoints}
        self.index = index
        self.events = events
        if mode.prefix == "events" and events is None:
            raise ValueError(f"{mode.name} needs the KV-event index")
        self.balancer = make_balancer(mode.balancer)
        kv = dict(mode.kvcache or {})
        self.min_match_tokens = int(kv.get("min_match_tokens", min_match_tokens))
        self.max_imbalance_abs = int(kv.get("max_imbalance_abs", 0))
        self.max_imbalance_rel = float(kv.get("max_imbalance_rel", 1.5))
        self.min_match_ratio = float(kv.get("min_match_ratio", 0.0))
        self.cold = ColdPlacement() if kv.get("cold_placement") == "lru" else None
        # the filter's holder spread: the event index's smallest block size unless kv_events.spread_tokens
        # is set; none with /lookup
        spread = int((kv.get("kv_events") or {}).get("spread_tokens", 0) or 0)
        self.spread_tokens = (spread or GPU_BLOCK_SIZE) if mode.prefix == "events" else 0
        self.seen: set[int] = set()
        self.outcomes: dict[str, int] = {}
        self.manage: VirtualManagement | None = None
        self.warms: list[PlannedWarm] = []  # planned by the last route(), for the runner to submit

    def matches(self, prompt: Prompt) -> dict[str, int]:
        """Each instance's held prefix of ``prompt`` in the mode's routing index (events model or controller)."""
        if self.mode.prefix == "events":
            assert self.events is not None
            return self.events.match(prompt)
        layout = self.index.lookup_hashes(prompt.chunk_hashes(self.index.chunk_size), prompt.num_tokens)
        return {iid: end for iid, (_loc, end) in layout.items()}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def route(self, v: VRequest) -> VEndpoint:
        """Balancer pick, replaced by the longest-prefix holder when the mode looks the prompt up."""
        picked = self.balancer.pick(self.endpoints)
        assert isinstance(picked, VEndpoint)
        prefix = self.mode.prefix
        if prefix == "none":
            return picked
        if prefix == "seed" and v.key not in self.seen:
            self.seen.add(v.key)
            self._count("no_tokens")
            return self._cold(picked)
        matches: Mapping[str, int] = self.matches(v.prompt)
        if not matches:
            self._count("empty")
            return self._cold(picked)
        mgmt = self.manage
        if mgmt is not None and mgmt.planner is not None:  # the filter's RouteChoice.apply
            matches = mgmt.add_replicas(v.prompt, matches)
            warm = mgmt.consider_replica(v.prompt, matches, self.spread_tokens)
            if warm is not None:
                self.warms.append(warm)
        choice = choose_prefix_endpoint(
            matches,
            self.endpoints,
            min_match_tokens=self.min_match_tokens,
            max_imbalance_abs=self.max_imbalance_abs,
            max_imbalance_rel=self.max_imbalance_rel,
            min_match_ratio=self.min_match_ratio,
            num_tokens=v.num_tokens,
            spread_tokens=self.spread_tokens,
        )
        if choice.endpoint_id is None:
            self._count("no_match")
            return self._cold(picked)
        self._count("routed")
        if mgmt is not None and choice.endpoint_id in mgmt.replicas_of(v.prompt):
            self._count("routed_replica")
        return self.by_id[choice.endpoint_id]

    def _cold(self, picked: VEndpoint) -> VEndpoint:
        """The kvcache filter's ``cold_placement: lru`` (same :class:`ColdPlacement` code), else the LB pick."""
        if self.cold is None:
            return picked
        target = self.cold.pick(self.endpoints)
        return self.by_id[target] if target is not None else picked
