"""Per-request metric updates kept as plain Python numbers and published into prometheus_client in batches.

prometheus_client validates and takes a lock on every ``inc`` / ``observe`` / ``set`` (~1 µs each, and a
request through the proxy makes seven). The request path instead bumps a number on a *cell* bound once to a
labelled child; :meth:`Tally.flush` adds what accumulated to the children. It runs before every collection
of the registry (a scrape, or ``registry.get_sample_value`` in tests: :class:`Tally` registers itself as the
registry's first collector) and, with ``--workers N`` (prometheus_client's multiprocess files, which another
worker's scrape reads), once a second from :meth:`Tally.run`, as Envoy flushes its stats on an interval.

Cells are not thread-safe: they are updated and flushed on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

FLUSH_INTERVAL_S = 1.0


class CountCell:
    """A counter child's pending increments: ``cell.n += 1`` on the request path."""

    __slots__ = ("child", "n")

    def __init__(self, child: Counter):
        self.child = child
        self.n = 0

    def flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self.child.inc(n)


class HistogramCell:
    """A histogram child's pending observations, counted per bucket (``observe`` is a bisect and two adds)."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram, bounds: tuple[float, ...]):
        self.child = child
        self.bounds = bounds  # the histogram's finite upper bounds, ascending (the last bucket is +Inf)
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # prometheus: the first bucket with value <= le
        self.total += value

    def observe_both(self, other: HistogramCell, value: float) -> None:
        """``observe(value)`` here and on ``other``: one bucket search when both have the same buckets."""
        if other.bounds is not self.bounds:  # Tally.histogram shares one tuple between equal bounds
            other.observe(value)
            return self.observe(value)
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.total += value
        other.counts[i] += 1
        other.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.total = self.total, 0.0
        # prometheus_client has no batched observe: add to the child's bucket and sum values directly (its
        # ValueClass, the in-memory or the multiprocess one). tests/gateway/test_tally.py pins the exposition.
        child: Any = self.child
        child._sum.inc(total)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)


class Tally:
    """The cells of one registry, flushed before each of its collections and every second under workers."""

    def __init__(self, registry: CollectorRegistry):
        self._cells: list[CountCell | HistogramCell] = []
        self._samplers: list[Callable[[], None]] = []
        self._bounds: dict[tuple[float, ...], tuple[float, ...]] = {}  # one tuple per distinct bucket layout
        registry.register(_FlushFirst(self))

    def counter(self, child: Counter) -> CountCell:
        cell = CountCell(child)
        self._cells.append(cell)
        return cell

    def histogram(self, child: Histogram, bounds: Iterable[float] | None = None) -> HistogramCell:
        """A cell of a histogram child; its buckets are the child's own unless ``bounds`` are given."""
        if bounds is None:
            bounds = child._upper_bounds  # prometheus_client's (flush() writes its internals too)
        finite = tuple(b for b in bounds if b != float("inf"))
        cell = HistogramCell(child, self._bounds.setdefault(finite, finite))
        self._cells.append(cell)
        return cell

    def sample(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` at every flush (gauges read from the gateway's own state, e.g. in-flight counts)."""
        self._samplers.append(fn)

    def flush(self) -> None:
        for cell in self._cells:
            cell.flush()
        for fn in self._samplers:
            fn()

    async def run(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush every ``interval_s`` until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                self.flush()
        finally:
            with contextlib.suppress(Exception):
                self.flush()


class _FlushFirst:
    """A collector that yields nothing: collecting it flushes the tally. Registered before the metrics, so a
    collection sees the flushed values."""

    def __init__(self, tally: Tally):
        self._tally = tally

    def collect(self) -> Iterable[Metric]:
        self._tally.flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()
