"""Shared resources of one gateway instance, handed to filter factories."""

from __future__ import annotations

import aiohttp

from kvgate.cluster import ClusterManager
from kvgate.config import GatewayConfig
from kvgate.metrics import Metrics


class Runtime:
    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.clusters = ClusterManager(config.clusters, self.metrics)
        self._aux: aiohttp.ClientSession | None = None

    def aux_session(self) -> aiohttp.ClientSession:
        """A pooled client for the active health checks. Lazily created.

        No connection cap: one probe per endpoint per interval needs none, and a hidden per-host cap made
        queued calls time out. The kvcache filter builds its own pool from its ``max_conns_per_host`` /
        ``max_idle_conns`` keys (``kvgate.filters.kvcache.pool``).
        """
        if self._aux is None or self._aux.closed:
            self._aux = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
                auto_decompress=True,
            )
        return self._aux

    async def close(self) -> None:
        await self.clusters.close()
        if self._aux is not None and not self._aux.closed:
            await self._aux.close()
