"""Prometheus metrics of one gateway instance (its own registry: several gateways may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvgate_requests",
            "Client requests by route cluster, endpoint and status",
            ["cluster", "endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "kvgate_endpoint_in_flight", "In-flight requests per endpoint", ["cluster", "endpoint"], registry=r
        )
        self.upstream_latency = Histogram(
            "kvgate_upstream_latency_seconds",
            "Upstream request duration (until the body ends)",
            ["cluster", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "kvgate_upstream_ttfb_seconds",
            "Time to the first upstream body byte",
            ["cluster", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "kvgate_upstream_attempts",
            "Upstream attempts by outcome (ok, status_error, network_error, timeout)",
            ["cluster", "endpoint", "outcome"],
            registry=r,
        )
        self.preferred = Counter(
            "kvgate_preferred_endpoint_decisions",
            "Preferred-endpoint decisions: honored, absent, unknown_id, unhealthy",
            ["cluster", "outcome"],
            registry=r,
        )
        self.endpoint_healthy = Gauge(
            "kvgate_endpoint_healthy", "1 if the endpoint is usable", ["cluster", "endpoint"], registry=r
        )
        self.ejections = Counter(
            "kvgate_endpoint_ejections",
            "Endpoints taken out of rotation, by cause (connection, timeout, broken, consecutive_5xx)",
            ["cluster", "endpoint", "cause"],
            registry=r,
        )
        self.local_replies = Counter(
            "kvgate_local_replies", "Requests answered by the gateway itself", ["status", "reason"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
