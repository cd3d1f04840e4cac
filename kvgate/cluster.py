"""Clusters at run time: endpoint state (in-flight, passive cooldown, active health) and LB picks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import aiohttp

from kvgate.config import Cluster, Endpoint
from kvgate.metrics import Metrics
from kvgate.routing.balancers import Balancer, make_balancer
from kvgate.tasks import cancel_and_wait

log = logging.getLogger("kvgate.cluster")


class EndpointState:
    __slots__ = (
        "active_healthy",
        "base_url",
        "cluster",
        "config",
        "consecutive_5xx",
        "cooldown_reason",
        "cooldown_s",
        "cooldown_until",
        "ejections",
        "fail_streak",
        "id",
        "in_flight",
        "index",
        "ok_streak",
        "weight",
    )

    def __init__(self, cluster: str, index: int, config: Endpoint):
        self.cluster = cluster
        self.index = index
        self.config = config
        # copied once: the config never changes, and these are read on every request (a pydantic attribute
        # read, let alone a property that formats the URL, costs several times a slot's)
        self.id: str = config.id
        self.weight: int = config.weight
        self.base_url: str = config.base_url
        self.in_flight = 0
        self.cooldown_until = 0.0  # monotonic seconds; passive health
        self.cooldown_reason = ""  # why the endpoint is cooling down (shown in 503 answers)
        self.cooldown_s = 0.0  # length of the current cooldown
        self.ejections = 0  # consecutive ejections without a success in between (back-off exponent)
        self.consecutive_5xx = 0  # 5xx answers from distinct requests since the last non-5xx answer
        self.active_healthy = True
        self.fail_streak = 0
        self.ok_streak = 0

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
        self.balancer: Balancer = make_balancer(config.lb_policy, members=[ep.id for ep in self.endpoints])
        self._metrics = metrics
        self._clock = clock
        for ep in self.endpoints:
            metrics.endpoint_healthy.labels(self.name, ep.id).set(1)
        self._in_flight_gauges = [(ep, metrics.in_flight.labels(self.name, ep.id)) for ep in self.endpoints]
        metrics.tally.sample(self._sample_in_flight)

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self._by_id.get(endpoint_id)

    def healthy_endpoints(self) -> list[EndpointState]:
        now = self._clock()
        return [ep for ep in self.endpoints if ep.healthy(now)]

    def pick(self, key: str | None = None, exclude: set[str] | frozenset[str] = frozenset()) -> EndpointState | None:
        now = self._clock()
        cands = [ep for ep in self.endpoints if ep.id not in exclude and ep.healthy(now)]
        return self.balancer.pick(cands, key)

    def _eject(self, ep: EndpointState, base_s: float, reason: str) -> None:
        """Cool ``ep`` down for ``base_s`` × 2^(ejections) (capped), like Envoy's ejection-time multiplier."""
        cap = self.config.max_ejection_time
        od = self.config.outlier_detection
        if od is not None and reason.startswith("consecutive"):
            cap = od.max_ejection_time
        length = min(base_s * 2**ep.ejections, max(cap, base_s))
        ep.ejections += 1
        ep.cooldown_until = self._clock() + length
        ep.cooldown_s = length
        ep.cooldown_reason = reason
        self._metrics.endpoint_healthy.labels(self.name, ep.id).set(0)
        self._metrics.ejections.labels(self.name, ep.id, reason.split(" ", 1)[0]).inc()
        log.warning(
            "endpoint %s/%s cooled down for %.1fs after %s (ejection %d in a row)",
            self.name,
            ep.id,
            length,
            reason,
            ep.ejections,
        )

    def mark_failed(self, ep: EndpointState, reason: str = "connection failure") -> None:
        """Passive health after a transport failure (no answer: connect error, timeout, broken connection):
        cool the endpoint down for ``health_check_interval`` (ms), doubled per failed ejection in a row."""
        interval = ep.config.llm_meta.health_check_interval / 1000.0
        if interval <= 0:
            return
        self._eject(ep, interval, reason)

    def mark_answered(self, ep: EndpointState, status: int) -> None:
        """The endpoint answered: it is alive. Only outlier detection (N consecutive 5xx, counted once per
        request by the caller) may eject it; any other answer resets the 5xx streak and the back-off."""
        if status < 500:
            if ep.ejections or ep.consecutive_5xx or ep.cooldown_until:  # else nothing to reset
                self.mark_ok(ep)
            return
        ep.consecutive_5xx += 1
        od = self.config.outlier_detection
        if od is not None and ep.consecutive_5xx >= od.consecutive_5xx:
            n = ep.consecutive_5xx
            ep.consecutive_5xx = 0
            self._eject(ep, od.base_ejection_time, f"consecutive_5xx ({n} answers with status {status})")

    def mark_ok(self, ep: EndpointState) -> None:
        ep.ejections = 0
        ep.consecutive_5xx = 0
        if ep.cooldown_until:  # it was ejected (the gauge went to 0 then): usable again
            ep.cooldown_until = 0.0
            ep.cooldown_reason = ""
            if ep.active_healthy:
                self._metrics.endpoint_healthy.labels(self.name, ep.id).set(1)

    def unavailable_reason(self) -> str:
        """Why no endpoint is usable, for the 503 message (which endpoints, after what, for how long)."""
        now = self._clock()
        parts = []
        for ep in self.endpoints:
            if not ep.active_healthy:
                parts.append(f"{ep.id} failed {ep.fail_streak} active health checks")
            elif ep.cooldown_until > now:
                parts.append(
                    f"{ep.id} cooling down for {ep.cooldown_until - now:.1f}s more (of {ep.cooldown_s:.1f}s) "
                    f"after {ep.cooldown_reason}"
                )
        return "; ".join(parts) or "no endpoint available"

    def acquire(self, ep: EndpointState) -> None:
        ep.in_flight += 1  # kvgate_endpoint_in_flight is sampled from it at each metrics flush (kvgate.tally)

    def release(self, ep: EndpointState) -> None:
        if ep.in_flight > 0:
            ep.in_flight -= 1

    def _sample_in_flight(self) -> None:
        for ep, gauge in self._in_flight_gauges:
            gauge.set(ep.in_flight)


class ClusterManager:
    def __init__(self, clusters: list[Cluster], metrics: Metrics):
        self.metrics = metrics
        self._clusters = {c.name: ClusterState(c, metrics) for c in clusters}
        self._tasks: list[asyncio.Task[None]] = []

    def get(self, name: str) -> ClusterState | None:
        return self._clusters.get(name)

    def __iter__(self) -> Iterator[ClusterState]:
        return iter(self._clusters.values())

    async def start_health_checks(
        self, session_factory: Callable[[], aiohttp.ClientSession], schemes: dict[str, str] | None = None
    ) -> None:
        """``schemes``: cluster name → the scheme its proxy filter uses (``health_check.scheme`` wins)."""
        for cluster in self._clusters.values():
            hc = cluster.config.health_check
            if hc is None:
                continue
            scheme = hc.scheme or (schemes or {}).get(cluster.name, "http")
            for ep in cluster.endpoints:
                self._tasks.append(
                    asyncio.create_task(
                        self._check_loop(cluster, ep, session_factory, scheme), name=f"health:{cluster.name}/{ep.id}"
                    )
                )

    async def _check_loop(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        session_factory: Callable[[], aiohttp.ClientSession],
        scheme: str = "http",
    ) -> None:
        hc = cluster.config.health_check
        assert hc is not None
        url = f"{scheme}://{ep.base_url.split('://', 1)[1]}{hc.path}"
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
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
