"""SIMULATOR: the engine's Prometheus ``/metrics``: vLLM 0.32's names (and the deprecated pre-0.10 ones), the
latency histograms, and LMCache 0.5.6's CPU-tier series when the tier is on.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvgate_sim.engine_driver import SimEngine

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class EngineCollector:
    """Reads the model's counters at scrape time (new vLLM names and the deprecated pre-0.10 ones)."""

    def __init__(self, engine: SimEngine, model_name: str):
        self.engine = engine
        self.labels = [model_name, "0"]
        self.created = time.time()

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        m = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
        m.add_metric(self.labels, value, created=self.created)
        return m

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        m = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
        m.add_metric(self.labels, value)
        return m

    def collect(self) -> list[Metric]:
        st = self.engine.core.stats()
        rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        c, g = self._counter, self._gauge
        return [
            g("vllm:num_requests_running", "Number of requests in model execution batches.", st.num_running),
            g("vllm:num_requests_waiting", "Number of requests waiting to be processed.", st.num_waiting),
            g("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st.kv_cache_usage_perc),
            c(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                st.prefix_cache_queries,
            ),
            c(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                st.prefix_cache_hits,
            ),
            c(
                "vllm:external_prefix_cache_queries",
                "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
                "number of queried tokens.",
                st.external_prefix_cache_queries,
            ),
            c(
                "vllm:external_prefix_cache_hits",
                "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
                "number of cached tokens.",
                st.external_prefix_cache_hits,
            ),
            c("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens),
            c(
                "vllm:prompt_tokens_cached",
                "Number of cached prompt tokens (local + external).",
                st.prompt_tokens_cached,
            ),
            c("vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens),
            c("vllm:num_preemptions", "Cumulative number of preemption from the engine.", st.num_preemptions),
            # deprecated names (vLLM < 0.10), still scraped by production-stack's router
            g(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage (deprecated name).",
                st.kv_cache_usage_perc,
            ),
            c(
                "vllm:gpu_prefix_cache_queries",
                "GPU prefix cache queries, in terms of number of queried tokens (deprecated name).",
                st.prefix_cache_queries,
            ),
            c(
                "vllm:gpu_prefix_cache_hits",
                "GPU prefix cache hits, in terms of number of cached tokens (deprecated name).",
                st.prefix_cache_hits,
            ),
            g("vllm:gpu_prefix_cache_hit_rate", "GPU prefix cache block hit rate (V0 name).", rate),
            *self._lmcache(),
        ]

    def _lmcache(self) -> list[Metric]:
        """LMCache 0.5.6's CPU-tier gauges (names and labels of ``lmcache/observability.py``), when enabled.

        Real vLLM shows them on its ``/metrics`` only in Prometheus multiprocess mode; the simulator always
        does. ``lmcache:local_cache_usage`` is bytes (LMCache exports no capacity)."""
        tier = self.engine.core.tier
        if tier is None:
            return []
        names = ["model_name", "worker_id", "role", "served_model_name"]
        values = [self.labels[0], str(tier.worker_id), "worker", self.labels[0]]
        pinned = sum(1 for k in tier.keys() if tier.is_pinned(k))
        out: list[Metric] = []
        for name, doc, value in (
            ("lmcache:local_cache_usage", "Local cache usage (bytes) of lmcache", tier.used_bytes),
            ("lmcache:pinned_memory_objs_count", "The number of pinned memory objects", pinned),
            ("lmcache:active_memory_objs_count", "The number of active memory objects", len(tier)),
        ):
            m = GaugeMetricFamily(name, doc, labels=names)
            m.add_metric(values, value)
            out.append(m)
        ev = CounterMetricFamily(
            "lmcache:local_cpu_evict_count", "Total number of evict in local cpu backend", labels=names
        )
        ev.add_metric(values, tier.evictions, created=self.created)
        out.append(ev)
        return out


class EngineMetrics:
    """One engine's registry: the model's counters read at scrape time plus the TTFT and e2e histograms the
    server observes (labels ``model_name``, ``engine="0"``)."""

    content_type = CONTENT_TYPE_LATEST.encode()

    def __init__(self, engine: SimEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = ["model_name", "engine"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        ).labels(model_name, "0")
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            registry=self.registry,
            buckets=E2E_BUCKETS,
        ).labels(model_name, "0")

    def exposition(self) -> bytes:
        """The text format of every series (the ``/metrics`` body)."""
        return generate_latest(self.registry)
