"""Counters scraped around a real-time benchmark run (TEST AND BENCHMARK TOOL).

The engines' prefix-cache counters from vLLM ``/metrics`` (:func:`parse_hit_counters`, :func:`scrape_counters`)
give a mode's hit rate (:func:`hit_rate_from`):
``(Δ vllm:prefix_cache_hits_total + Δ vllm:external_prefix_cache_hits_total) / Δ vllm:prefix_cache_queries_total``;
:func:`scrape_gateway_routing` reads the gateway's kvcache routing outcomes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import aiohttp

_METRIC_RE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf|-Inf)\s*$")
_HIT_METRICS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_hits_total",
)


def parse_hit_counters(text: str) -> dict[str, float]:
    """The three prefix-cache counters from a vLLM ``/metrics`` page (summed over label sets)."""
    out = dict.fromkeys(_HIT_METRICS, 0.0)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _METRIC_RE.match(line)
        if m and m.group(1) in out:
            with contextlib.suppress(ValueError):
                out[m.group(1)] += float(m.group(2))
    return out


async def scrape_counters(session: aiohttp.ClientSession, urls: Sequence[str]) -> dict[str, float]:
    """Sum of :func:`parse_hit_counters` over the engines at ``urls``."""
    total = dict.fromkeys(_HIT_METRICS, 0.0)
    for url in urls:
        async with session.get(url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
        for k, v in parse_hit_counters(text).items():
            total[k] += v
    return total


def hit_rate_from(before: dict[str, float], after: dict[str, float]) -> float:
    """Engine-counter hit rate between two scrapes (0.0 without queries)."""
    q = after[_HIT_METRICS[0]] - before[_HIT_METRICS[0]]
    hits = (after[_HIT_METRICS[1]] - before[_HIT_METRICS[1]]) + (after[_HIT_METRICS[2]] - before[_HIT_METRICS[2]])
    return hits / q if q > 0 else 0.0


async def scrape_gateway_routing(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """``kvgate_kvcache_routing_lookups_total`` by outcome (empty when the filter is absent)."""
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with session.get(admin_url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("kvgate_kvcache_routing_lookups_total{"):
                m = re.match(r'.*outcome="([^"]+)".*\}\s+([0-9.eE+-]+)', line)
                if m:
                    out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out
