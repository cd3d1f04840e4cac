"""Prometheus metrics of one gateway instance (its own registry: several gateways may share a process).

With ``kvgate serve --workers N`` every worker process writes its values to prometheus_client's multiprocess
directory (``PROMETHEUS_MULTIPROC_DIR``) and :meth:`Metrics.render` in any worker reports the sum over all
workers (gauges: see :data:`MULTIPROC_MODES`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from kvgate.tally import CountCell, HistogramCell, Tally

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

M = TypeVar("M", Counter, Gauge, Histogram)
C = TypeVar("C", CountCell, HistogramCell)


class Family(Generic[M]):
    """A labelled metric whose children are looked up once per label set: prometheus_client's ``.labels()``
    validates the values and takes a lock on every call, which the request path should not pay per request.
    The request path's own updates go through :mod:`kvgate.tally` cells (:meth:`count`, :meth:`histogram`)."""

    __slots__ = ("_cells", "_children", "metric", "tally")

    def __init__(self, metric: M, tally: Tally) -> None:
        self.metric: M = metric
        self.tally = tally
        self._children: dict[tuple[str, ...], M] = {}
        self._cells: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def count(self, *values: str) -> CountCell:
        """The tally cell of a counter child (``cell.n += 1``), made once per label set."""
        cell: CountCell | None = self._cells.get(values)
        return cell if cell is not None else self._new_cell(values, self.tally.counter)

    def histogram(self, *values: str) -> HistogramCell:
        """The tally cell of a histogram child (``cell.observe(v)``), made once per label set."""
        cell: HistogramCell | None = self._cells.get(values)
        return cell if cell is not None else self._new_cell(values, self.tally.histogram)

    def _new_cell(self, values: tuple[str, ...], make: Callable[[Any], C]) -> C:
        cell = self._cells[values] = make(self.labels(*values))
        return cell


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process is one of several workers (else None)."""
    return os.environ.get(MULTIPROC_ENV) or None


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tally = t = Tally(r)  # registered first: a collection flushes it before reading the metrics
        self.requests = Family(
            Counter(
                "kvgate_requests",
                "Client requests by route cluster, endpoint and status",
                ["cluster", "endpoint", "status"],
                registry=r,
            ),
            t,
        )
        self.in_flight = Family(
            Gauge(
                "kvgate_endpoint_in_flight",
                "In-flight requests per endpoint",
                ["cluster", "endpoint"],
                registry=r,
                multiprocess_mode="livesum",  # several workers: the sum over the live ones
            ),
            t,
        )
        self.upstream_latency = Family(
            Histogram(
                "kvgate_upstream_latency_seconds",
                "Upstream request duration (until the body ends)",
                ["cluster", "endpoint"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            t,
        )
        self.upstream_ttfb = Family(
            Histogram(
                "kvgate_upstream_ttfb_seconds",
                "Time to the first upstream body byte",
                ["cluster", "endpoint"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            t,
        )
        self.upstream_attempts = Family(
            Counter(
                "kvgate_upstream_attempts",
                "Upstream attempts by outcome (ok, status_error, network_error, timeout)",
                ["cluster", "endpoint", "outcome"],
                registry=r,
            ),
            t,
        )
        self.preferred = Family(
            Counter(
                "kvgate_preferred_endpoint_decisions",
                "Preferred-endpoint decisions: honored, absent, unknown_id, unhealthy",
                ["cluster", "outcome"],
                registry=r,
            ),
            t,
        )
        self.endpoint_healthy = Family(
            Gauge(
                "kvgate_endpoint_healthy",
                "1 if the endpoint is usable",
                ["cluster", "endpoint"],
                registry=r,
                multiprocess_mode="all",  # several workers: one series per worker (label pid), own breakers each
            ),
            t,
        )
        self.ejections = Family(
            Counter(
                "kvgate_endpoint_ejections",
                "Endpoints taken out of rotation, by cause (connection, timeout, broken, consecutive_5xx)",
                ["cluster", "endpoint", "cause"],
                registry=r,
            ),
            t,
        )
        self.local_replies = Family(
            Counter(
                "kvgate_local_replies", "Requests answered by the gateway itself", ["status", "reason"], registry=r
            ),
            t,
        )

    def render(self) -> bytes:
        """The exposition text: this gateway's registry, or with several workers the aggregate of all of them
        (prometheus_client's multiprocess collector over ``PROMETHEUS_MULTIPROC_DIR``)."""
        self.tally.flush()  # this worker's pending updates (others flush theirs every second)
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
