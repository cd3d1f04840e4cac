"""Clusters at run time: endpoint state (in-flight, passive cooldown, active health) and LB picks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from kvgate.config import Cluster, Endpoint
from kvgate.metrics import Metrics
from kvgate.routing.balancers import Balancer, RingHash, make_balancer

log = logging.getLogger("kvgate.cluster")


class EndpointState:
    __slots__ = ("active_healthy", "cluster", "config", "cooldown_until", "fail_streak", "in_flight", "index",
                 "ok_streak")

    def __init__(self, cluster: str, index: int, config: Endpoint):
        self.cluster = cluster
        self.index = index
        self.config = config
        self.in_flight = 0
        self.cooldown_until = 0.0  # monotonic seconds; passive health
        self.active_healthy = True
        self.fail_streak = 0
        self.ok_streak = 0

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def healthy(self, now: float | None = None) -> bool:
        if not self.active_healthy:
            return False
        return (now if now is not None else time.monotonic()) >= self.cooldown_until

    def __repr__(self) -> str:
        return f"EndpointState({self.cluster}/{self.id} in_flight={self.in_flight})"


class ClusterState:
    def __init__(self, config: Cluster, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.name = config.name
        self.endpoints = [EndpointState(config.name, i, ep) for i, ep in enumerate(config.endpoints)]
        self._by_id = {ep.id: ep for ep in self.endpoints}
        self.balancer: Balancer = make_balancer(config.lb_policy)
        self._metrics = metrics
        self._clock = clock
        for ep in self.endpoints:
            metrics.endpoint_healthy.labels(self.name, ep.id).set(1)

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self._by_id.get(endpoint_id)

    def healthy_endpoints(self) -> list[EndpointState]:
        now = self._clock()
        return [ep for ep in self.endpoints if ep.healthy(now)]

    def pick(self, key: str | None = None, exclude: set[str] | frozenset[str] = frozenset()) -> EndpointState | None:
        now = self._clock()
        cands = [ep for ep in self.endpoints if ep.id not in exclude and ep.healthy(now)]
        if isinstance(self.balancer, RingHash):
            picked = self.balancer.pick_from([e.id for e in self.endpoints], cands, key)
        else:
            picked = self.balancer.pick(cands, key)
        return picked  # type: ignore[return-value]

    def mark_failed(self, ep: EndpointState) -> None:
        """Passive health: cool the endpoint down for its ``health_check_interval`` (ms)."""
        interval = ep.config.llm_meta.health_check_interval / 1000.0
        if interval <= 0:
            return
        ep.cooldown_until = self._clock() + interval
        self._metrics.endpoint_healthy.labels(self.name, ep.id).set(0)
        log.warning("endpoint %s/%s cooled down for %.1fs after failures", self.name, ep.id, interval)

    def mark_ok(self, ep: EndpointState) -> None:
        if ep.cooldown_until:
            ep.cooldown_until = 0.0
        if ep.active_healthy:
            self._metrics.endpoint_healthy.labels(self.name, ep.id).set(1)

    def acquire(self, ep: EndpointState) -> None:
        ep.in_flight += 1
        self._metrics.in_flight.labels(self.name, ep.id).set(ep.in_flight)

    def release(self, ep: EndpointState) -> None:
        ep.in_flight = max(0, ep.in_flight - 1)
        self._metrics.in_flight.labels(self.name, ep.id).set(ep.in_flight)


class ClusterManager:
    def __init__(self, clusters: list[Cluster], metrics: Metrics):
        self.metrics = metrics
        self._clusters = {c.name: ClusterState(c, metrics) for c in clusters}
        self._tasks: list[asyncio.Task[None]] = []

    def get(self, name: str) -> ClusterState | None:
        return self._clusters.get(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._clusters.values())

    async def start_health_checks(self, session_factory: Callable[[], aiohttp.ClientSession]) -> None:
        for cluster in self._clusters.values():
            hc = cluster.config.health_check
            if hc is None:
                continue
            for ep in cluster.endpoints:
                self._tasks.append(asyncio.create_task(self._check_loop(cluster, ep, session_factory),
                                                       name=f"health:{cluster.name}/{ep.id}"))

    async def _check_loop(self, cluster: ClusterState, ep: EndpointState,
                          session_factory: Callable[[], aiohttp.ClientSession]) -> None:
        hc = cluster.config.health_check
        assert hc is not None
        url = ep.base_url + hc.path
        while True:
            ok = False
            try:
                async with session_factory().get(url, timeout=aiohttp.ClientTimeout(total=hc.timeout)) as resp:
                    ok = 200 <= resp.status < 300
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                ok = False
            if ok:
                ep.ok_streak += 1
                ep.fail_streak = 0
                if not ep.active_healthy and ep.ok_streak >= hc.healthy_threshold:
                    ep.active_healthy = True
                    log.info("endpoint %s/%s passed active health checks", cluster.name, ep.id)
            else:
                ep.fail_streak += 1
                ep.ok_streak = 0
                if ep.active_healthy and ep.fail_streak >= hc.unhealthy_threshold:
                    ep.active_healthy = False
                    log.warning("endpoint %s/%s failed %d active health checks", cluster.name, ep.id, ep.fail_streak)
            self.metrics.endpoint_healthy.labels(cluster.name, ep.id).set(1 if ep.healthy() else 0)
            await asyncio.sleep(hc.interval)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
