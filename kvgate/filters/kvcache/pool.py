"""The kvcache filter's HTTP connection pool: Pixiu's ``max_conns_per_host`` / ``max_idle_conns`` keys honoured.

Pixiu builds one Go ``http.Transport`` for the controller and tokenizer calls from these keys. kvgate builds
one aiohttp session per filter the same way:

* ``max_conns_per_host`` (0 = no limit, as in Go): at most this many requests in flight per host. The cap is
  a :class:`HostSlots` semaphore *in front of* aiohttp (whose own pool is unlimited), so the wait for a slot
  is visible: when the caller's deadline passes while waiting, :class:`PoolTimeout` is raised. That is a
  local queueing verdict, not a controller failure, so the circuit breakers do not count it (a saturated
  pool used to open the lookup breaker for everyone).
* ``max_idle_conns`` (total) / ``max_idle_conns_per_host``: idle keep-alive connections beyond these are
  closed on release, oldest first (:class:`IdleCappedConnector`). 0 = no cap (Go's default of 2 idle
  connections per host would churn connections at a gateway's concurrency, so kvgate does not copy it).

The connector hooks aiohttp's ``_release`` (a private method, stable since aiohttp 3.0); tests cover it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvgate.filters.kvcache.errors import PoolTimeout

POOL_GUARD = 0.005  # s: a pool wait gives up this much before the caller's deadline, so it is seen as a pool wait


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_conns_per_host: int = 0
    max_idle_conns: int = 0
    max_idle_conns_per_host: int = 0


class HostSlots:
    """At most ``limit`` concurrent requests per host (0 = unlimited)."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._sems: dict[str, asyncio.Semaphore] = {}
        self.waits = 0  # requests that had to wait for a slot

    @asynccontextmanager
    async def slot(self, host: str, deadline: float | None) -> AsyncIterator[None]:
        """Hold one slot for ``host``; raises :class:`PoolTimeout` if none frees up before ``deadline`` (loop time)."""
        if not self.limit:
            yield
            return
        sem = self._sems.get(host)
        if sem is None:
            sem = self._sems[host] = asyncio.Semaphore(self.limit)
        if sem.locked():
            self.waits += 1
            try:
                if deadline is None:
                    await sem.acquire()
                else:
                    async with asyncio.timeout_at(deadline - POOL_GUARD):
                        await sem.acquire()
            except TimeoutError:
                raise PoolTimeout(
                    f"[kvcache] no free connection to {host} (max_conns_per_host={self.limit}) before the deadline"
                ) from None
        else:
            await sem.acquire()
        try:
            yield
        finally:
            sem.release()


class IdleCappedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that keeps at most ``max_idle_per_host`` / ``max_idle`` idle connections."""

    def __init__(self, *, max_idle: int = 0, max_idle_per_host: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_idle = max(0, max_idle)
        self.max_idle_per_host = max(0, max_idle_per_host)

    def idle_count(self) -> int:
        return sum(len(d) for d in self._conns.values())

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        if self.max_idle_per_host:
            conns = self._conns.get(key)
            while conns and len(conns) > self.max_idle_per_host:
                self._close_oldest(key)
                conns = self._conns.get(key)
        if self.max_idle:
            while self._conns and self.idle_count() > self.max_idle:
                oldest = min(self._conns, key=lambda k: self._conns[k][0][1] if self._conns[k] else float("inf"))
                self._close_oldest(oldest)

    def _close_oldest(self, key: Any) -> None:
        conns = self._conns[key]
        proto, _ = conns.popleft()
        if not conns:
            del self._conns[key]
        proto.close()


def make_session(limits: PoolLimits) -> aiohttp.ClientSession:
    """An aiohttp session for controller/tokenizer calls; the per-host cap is :class:`HostSlots`' job."""
    connector = IdleCappedConnector(
        max_idle=limits.max_idle_conns,
        max_idle_per_host=limits.max_idle_conns_per_host,
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=True)
