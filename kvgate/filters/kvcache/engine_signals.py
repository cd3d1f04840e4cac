"""Engine-side load signals: a background scraper of each engine's Prometheus ``/metrics`` (issue 13).

Pixiu's strategy decides from the *gateway process's* CPU and memory (:mod:`.signals`); compress and evict
exist for the *engines'* KV memory. :class:`EngineScraper` polls every instance's vLLM ``/metrics`` (and,
optionally, LMCache's own ``/metrics``) every ``interval`` seconds with a per-scrape ``timeout``, off the
request path, and keeps one :class:`EngineSnapshot` per instance:

* ``vllm:kv_cache_usage_perc`` (vLLM >= 0.10; the deprecated ``vllm:gpu_cache_usage_perc`` when the new name
  is absent) — GPU KV-cache usage, 0..1;
* ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``;
* LMCache 0.5.6's CPU tier: ``lmcache:local_cache_usage`` (bytes allocated by the local CPU backend) and
  ``lmcache:pinned_memory_objs_count``. LMCache exports no capacity, so the usage *ratio* needs the
  configured ``max_local_cpu_size`` (``ScrapeTarget.lmcache_capacity_bytes``). Real vLLM shows LMCache's
  gauges on its own ``/metrics`` only in Prometheus multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, or
  ``--api-server-count > 1``); otherwise LMCache's internal API server (``internal_api_server_enabled``)
  serves them, which a target names as ``lmcache_metrics_url``.

Series with several label sets (DP ranks, TP workers) are summed for counts and bytes and maxed for the
usage ratio. Parsing uses ``prometheus_client.parser``. A scrape that times out, is refused, answers non-200
or does not parse leaves the previous values in place (their age grows: ``EngineSnapshot.stale``), is counted
per instance and reason, and is logged once per outage (WARNING on the first failure, INFO on recovery). A
dead endpoint never blocks anything: every scrape is bounded by ``timeout`` and scrapes run concurrently.
When only ``lmcache_metrics_url`` fails, the engine's values are used and the LMCache ones are None (unknown)
that round, counted as ``lmcache_<reason>`` and logged once per outage.

:class:`EngineSignals` is the read side. ``sample(instance)`` returns a :class:`~.signals.LoadSnapshot`
(``cpu_usage`` = the engine's load ratio, ``memory_usage`` = its KV usage), so the seed's ``make_decision``
can be fed per instance without change; ``snapshot(instance)`` gives everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvgate.filters.kvcache.signals import LoadSnapshot
from kvgate.redact import redact_url

log = logging.getLogger("kvgate.kvcache.engine_signals")

KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_DEPRECATED = "vllm:gpu_cache_usage_perc"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
LMCACHE_CPU_USAGE = "lmcache:local_cache_usage"  # bytes (LMCache 0.5.6 ``observability.py``)
LMCACHE_PINNED = "lmcache:pinned_memory_objs_count"
MAX_BODY = 4 * 1024 * 1024  # a /metrics page larger than this is refused (``too_large``)

FAILURE_REASONS = ("timeout", "connect", "status", "parse", "too_large")


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One engine: its cluster endpoint id, vLLM ``/metrics`` URL and optional LMCache metrics URL/capacity."""

    instance: str
    metrics_url: str
    lmcache_metrics_url: str = ""
    lmcache_capacity_bytes: int = 0  # LMCache ``max_local_cpu_size`` in bytes; 0 = unknown (no ratio)
    max_num_seqs: int = 0  # the engine's ``--max-num-seqs``; 0 = unknown (load from waiting only)


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """The last good values of one instance. ``at`` = clock time of the last successful scrape (None = never)."""

    instance: str
    kv_usage: float | None = None
    running: float | None = None
    waiting: float | None = None
    lmcache_cpu_bytes: float | None = None
    lmcache_cpu_usage: float | None = None  # bytes / configured capacity, clamped [0, 1]
    lmcache_pinned_objs: float | None = None
    at: float | None = None
    consecutive_failures: int = 0
    last_error: str = ""
    lmcache_failures: int = 0  # consecutive failures of ``lmcache_metrics_url`` (LMCache values None meanwhile)

    def age(self, now: float) -> float:
        return math.inf if self.at is None else max(0.0, now - self.at)

    def stale(self, now: float, max_age: float) -> bool:
        return self.age(now) > max_age

    def load(self, max_num_seqs: int = 0) -> float:
        """Load ratio in [0, 1]: running / max_num_seqs when known, else 1 as soon as requests wait."""
        running, waiting = self.running or 0.0, self.waiting or 0.0
        if waiting > 0:
            return 1.0
        if max_num_seqs > 0:
            return _clamp(running / max_num_seqs)
        return 0.0

    @property
    def inflight(self) -> float:
        return (self.running or 0.0) + (self.waiting or 0.0)


class EngineSignals(Protocol):
    """Per-instance engine signals (the read side used by the strategy, management and replication)."""

    def snapshot(self, instance: str) -> EngineSnapshot | None: ...

    def sample(self, instance: str) -> LoadSnapshot: ...

    def instances(self) -> list[str]: ...


def _clamp(x: float) -> float:
    return 0.0 if x != x or x < 0 else min(1.0, x)


def parse_metrics(text: str) -> dict[str, float]:
    """The engine gauges found in a Prometheus text page (see the module docstring for aggregation).

    Raises ``ValueError`` when the page does not parse. Non-finite values are ignored."""
    sums: dict[str, float] = {}
    maxes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in (KV_USAGE, KV_USAGE_DEPRECATED, RUNNING, WAITING, LMCACHE_CPU_USAGE, LMCACHE_PINNED):
                continue
            v = float(s.value)
            if not math.isfinite(v):
                continue
            if s.name in (KV_USAGE, KV_USAGE_DEPRECATED):
                maxes[s.name] = max(maxes.get(s.name, -math.inf), v)
            else:
                sums[s.name] = sums.get(s.name, 0.0) + v
    out = dict(sums)
    if KV_USAGE in maxes:
        out[KV_USAGE] = _clamp(maxes[KV_USAGE])
    elif KV_USAGE_DEPRECATED in maxes:
        out[KV_USAGE] = _clamp(maxes[KV_USAGE_DEPRECATED])
    return out


class StaticEngineSignals:
    """Fixed snapshots (tests, virtual-time runs)."""

    def __init__(self, snapshots: Mapping[str, EngineSnapshot] | None = None, max_num_seqs: int = 0):
        self.snapshots: dict[str, EngineSnapshot] = dict(snapshots or {})
        self.max_num_seqs = max_num_seqs

    def snapshot(self, instance: str) -> EngineSnapshot | None:
        return self.snapshots.get(instance)

    def sample(self, instance: str) -> LoadSnapshot:
        s = self.snapshots.get(instance)
        if s is None:
            return LoadSnapshot(0.0, 0.0)
        return LoadSnapshot(s.load(self.max_num_seqs), s.kv_usage or 0.0)

    def instances(self) -> list[str]:
        return list(self.snapshots)


class _ScrapeError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(slots=True)
class ScrapeStats:
    """Counters per (instance, result) — ``ok`` or a failure reason — for the filter's metrics."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, instance: str, result: str) -> None:
        key = (instance, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def get(self, instance: str, result: str) -> int:
        return self.counts.get((instance, result), 0)


class EngineScraper:
    """Polls every target's ``/metrics`` in the background (see the module docstring).

    ``start()`` launches the loop (call from a running event loop), ``aclose()`` stops it and closes the
    session it owns. ``scrape_once()`` runs one round (tests, virtual time). ``max_age`` (default 3 ×
    interval) is when ``sample`` stops trusting a snapshot: a stale instance reads as zero load and zero
    KV usage, so nothing is decided from old numbers. ``on_result(instance, result)`` is called per scrape.
    """

    def __init__(
        self,
        targets: Iterable[ScrapeTarget],
        *,
        interval: float = 1.0,
        timeout: float = 0.5,
        max_age: float | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str, str], None] = lambda instance, result: None,
    ):
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        self.interval = interval
        self.timeout = timeout
        self.max_age = max_age if max_age is not None else 3 * interval
        self._targets: dict[str, ScrapeTarget] = {}
        self._snapshots: dict[str, EngineSnapshot] = {}
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._on_result = on_result
        self._task: asyncio.Task[None] | None = None
        self.stats = ScrapeStats()
        self.update_targets(targets)

    # -- targets
    def update_targets(self, targets: Iterable[ScrapeTarget]) -> None:
        """Replace the target set; snapshots of instances that left are dropped."""
        new = {t.instance: t for t in targets}
        self._targets = new
        for gone in set(self._snapshots) - set(new):
            del self._snapshots[gone]
        for inst in new:
            self._snapshots.setdefault(inst, EngineSnapshot(inst))

    # -- read side (EngineSignals)
    def instances(self) -> list[str]:
        return list(self._targets)

    def snapshot(self, instance: str) -> EngineSnapshot | None:
        return self._snapshots.get(instance)

    def fresh(self, instance: str) -> EngineSnapshot | None:
        """The snapshot if it is not older than ``max_age``, else None."""
        s = self._snapshots.get(instance)
        if s is None or s.stale(self._clock(), self.max_age):
            return None
        return s

    def sample(self, instance: str) -> LoadSnapshot:
        s = self.fresh(instance)
        t = self._targets.get(instance)
        if s is None or t is None:
            return LoadSnapshot(0.0, 0.0)
        return LoadSnapshot(s.load(t.max_num_seqs), s.kv_usage or 0.0)

    # -- scraping
    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=0)
            )
            self._own_session = True
        return self._session

    async def _fetch(self, url: str) -> str:
        session = self._get_session()
        try:
            async with asyncio.timeout(self.timeout):
                async with session.get(url, headers={"Accept": "text/plain"}) as resp:
                    if resp.status != 200:
                        raise _ScrapeError("status", f"status {resp.status}")
                    body = await resp.content.read(MAX_BODY + 1)
        except TimeoutError:
            raise _ScrapeError("timeout", f"no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise _ScrapeError("connect", type(exc).__name__) from None
        if len(body) > MAX_BODY:
            raise _ScrapeError("too_large", f"page larger than {MAX_BODY} bytes")
        return body.decode("utf-8", "replace")

    async def _page(self, url: str) -> dict[str, float] | _ScrapeError:
        try:
            return self._parse(await self._fetch(url))
        except _ScrapeError as exc:
            return exc

    async def _scrape(self, t: ScrapeTarget) -> None:
        prev = self._snapshots.get(t.instance, EngineSnapshot(t.instance))
        if t.lmcache_metrics_url:  # both pages at once: one round stays bounded by one timeout
            values, lm = await asyncio.gather(self._page(t.metrics_url), self._page(t.lmcache_metrics_url))
        else:
            values, lm = await self._page(t.metrics_url), None
        if t.instance not in self._targets:  # removed while scraping
            return
        if isinstance(values, _ScrapeError):
            self._failed(t, prev, values)
            return
        if prev.consecutive_failures:
            log.info("[kvcache] engine metrics of %s answer again", t.instance)
        cpu_bytes: float | None = None
        pinned: float | None = None
        lm_failures = 0
        if isinstance(lm, _ScrapeError):  # the engine answered: use its values; LMCache's are unknown this round
            lm_failures = prev.lmcache_failures + 1
            if lm_failures == 1:
                log.warning(
                    "[kvcache] LMCache metrics of %s failed (%s: %s) at %s (logged once per outage)",
                    t.instance,
                    lm.reason,
                    lm,
                    redact_url(t.lmcache_metrics_url),
                )
            self.stats.add(t.instance, f"lmcache_{lm.reason}")
            self._on_result(t.instance, f"lmcache_{lm.reason}")
        else:
            merged = {**(lm or {}), **values}
            cpu_bytes, pinned = merged.get(LMCACHE_CPU_USAGE), merged.get(LMCACHE_PINNED)
        ratio = (
            _clamp(cpu_bytes / t.lmcache_capacity_bytes)
            if cpu_bytes is not None and t.lmcache_capacity_bytes > 0
            else None
        )
        self._snapshots[t.instance] = EngineSnapshot(
            t.instance,
            kv_usage=values.get(KV_USAGE),
            running=values.get(RUNNING),
            waiting=values.get(WAITING),
            lmcache_cpu_bytes=cpu_bytes,
            lmcache_cpu_usage=ratio,
            lmcache_pinned_objs=pinned,
            at=self._clock(),
            lmcache_failures=lm_failures,
        )
        self.stats.add(t.instance, "ok")
        self._on_result(t.instance, "ok")

    @staticmethod
    def _parse(text: str) -> dict[str, float]:
        try:
            return parse_metrics(text)
        except Exception as exc:  # the parser raises ValueError and others on garbage
            raise _ScrapeError("parse", type(exc).__name__) from None

    def _failed(self, t: ScrapeTarget, prev: EngineSnapshot, exc: _ScrapeError) -> None:
        if t.instance not in self._targets:
            return
        if prev.consecutive_failures == 0:
            log.warning(
                "[kvcache] engine metrics of %s failed (%s: %s) at %s; keeping the last values until they age "
                "out (logged once per outage)",
                t.instance,
                exc.reason,
                exc,
                redact_url(t.metrics_url),
            )
        self._snapshots[t.instance] = replace(
            prev, consecutive_failures=prev.consecutive_failures + 1, last_error=exc.reason
        )
        self.stats.add(t.instance, exc.reason)
        self._on_result(t.instance, exc.reason)

    async def scrape_once(self) -> None:
        """Scrape every target concurrently; never raises for a target's failure."""
        await asyncio.gather(*(self._scrape(t) for t in list(self._targets.values())))

    async def _loop(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.scrape_once()
            except Exception:  # pragma: no cover - defensive: a bug must not kill the loop
                log.exception("[kvcache] engine metrics scrape round failed")
            await asyncio.sleep(max(0.0, self.interval - (self._clock() - started)))

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="kvcache-engine-scraper")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
