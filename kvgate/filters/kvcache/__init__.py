"""``dgp.filter.ai.kvcache``: KV-cache-aware routing hints and LMCache cache management.

A Python reimplementation of Dubbo-go-Pixiu's filter with its defects fixed; see
``docs/kvcache-filter.md``. Importing this package registers the filter kind.
"""

from __future__ import annotations

from kvgate.chain import HttpFilter, register_filter
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.runtime import Runtime

FILTER_NAME = "dgp.filter.ai.kvcache"

__all__ = ["FILTER_NAME", "KVCacheConfig", "KVCacheFilter", "create_kvcache_filter"]


@register_filter(FILTER_NAME, KVCacheConfig)
def create_kvcache_filter(config: KVCacheConfig, runtime: Runtime) -> HttpFilter:
    """Factory used by the filter chain (``enabled: false`` → a filter whose decode is a no-op)."""
    return KVCacheFilter(config, runtime)
