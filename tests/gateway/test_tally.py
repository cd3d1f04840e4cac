"""kvgate.tally: per-request metric updates published into prometheus_client before each collection."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kvgate.config import parse_config
from kvgate.metrics import LATENCY_BUCKETS, Metrics
from kvgate.runtime import Runtime
from kvgate.tally import Tally

from .conftest import gateway_config


def test_a_collection_sees_the_counts_of_the_cells() -> None:
    m = Metrics()
    cell = m.requests.count("llm", "a", "200")
    assert m.requests.count("llm", "a", "200") is cell  # one cell per label set
    for _ in range(3):
        cell.n += 1
    assert (
        m.registry.get_sample_value("kvgate_requests_total", {"cluster": "llm", "endpoint": "a", "status": "200"}) == 3
    )
    cell.n += 2
    assert b'kvgate_requests_total{cluster="llm",endpoint="a",status="200"} 5.0' in m.render()


def test_a_histogram_cell_exposes_what_direct_observes_would() -> None:
    """Pins the prometheus_client internals the flush writes to (its histogram's bucket and sum values)."""
    values = [0.0, 0.0004, 0.001, 0.0011, 0.003, 0.07, 0.5, 2.5, 29.0, 61.0, 500.0, -1.0]
    direct_reg, tally_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("lat", "h", ["ep"], buckets=LATENCY_BUCKETS, registry=direct_reg)
    tally = Tally(tally_reg)
    via = Histogram("lat", "h", ["ep"], buckets=LATENCY_BUCKETS, registry=tally_reg)
    cell = tally.histogram(via.labels("a"), LATENCY_BUCKETS)
    for v in values:
        direct.labels("a").observe(v)
        cell.observe(v)

    def samples(reg: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(reg).decode().splitlines() if not line.startswith("lat_created")]

    assert samples(tally_reg) == samples(direct_reg)
    cell.observe(0.002)  # a second flush adds to the first
    direct.labels("a").observe(0.002)
    assert samples(tally_reg) == samples(direct_reg)


def test_observe_both_records_the_value_in_each_histogram() -> None:
    """One bucket search for two histograms with the same buckets; others take their own (exposition as if
    each had been observed directly)."""
    direct_reg, tally_reg = CollectorRegistry(), CollectorRegistry()
    tally = Tally(tally_reg)
    cells, directs = [], []
    for name, buckets in (("ttfb", LATENCY_BUCKETS), ("lat", LATENCY_BUCKETS), ("coarse", (0.01, 1.0))):
        directs.append(Histogram(name, "h", buckets=buckets, registry=direct_reg))
        cells.append(tally.histogram(Histogram(name, "h", buckets=buckets, registry=tally_reg), buckets))
    for v in (0.0004, 0.003, 0.5, 61.0):
        cells[0].observe_both(cells[1], v)  # same buckets
        cells[0].observe_both(cells[2], v)  # other buckets: 0 observed twice, 2 once
        for d in (directs[0], directs[0], directs[1], directs[2]):
            d.observe(v)

    def samples(reg: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(reg).decode().splitlines() if "_created" not in line]

    assert samples(tally_reg) == samples(direct_reg)


def test_in_flight_is_sampled_from_the_endpoints_at_collection() -> None:
    rt = Runtime(parse_config(gateway_config([("a", 1), ("b", 2)])))
    cluster = rt.clusters.get("llm")
    assert cluster is not None
    a = cluster.get("a")
    assert a is not None
    cluster.acquire(a)
    cluster.acquire(a)
    labels = {"cluster": "llm", "endpoint": "a"}
    assert rt.metrics.registry.get_sample_value("kvgate_endpoint_in_flight", labels) == 2
    cluster.release(a)
    assert rt.metrics.registry.get_sample_value("kvgate_endpoint_in_flight", labels) == 1
    assert rt.metrics.registry.get_sample_value("kvgate_endpoint_in_flight", {"cluster": "llm", "endpoint": "b"}) == 0


async def test_run_flushes_on_its_interval_and_once_more_when_stopped() -> None:
    reg = CollectorRegistry()
    tally = Tally(reg)
    counter = Counter("c", "c", ["k"], registry=reg)
    cell = tally.counter(counter.labels("x"))
    task = asyncio.create_task(tally.run(0.01))
    cell.n += 1
    for _ in range(200):  # bounded wait for the first interval
        if counter.labels("x")._value.get() == 1:
            break
        await asyncio.sleep(0.01)
    assert counter.labels("x")._value.get() == 1  # read without a collection: the interval flushed it
    cell.n += 4
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert counter.labels("x")._value.get() == 5
