"""The seed's routing step on the ``lookup`` path: one ``/lookup`` to the LMCache controller, then the choice.

The call goes through the ``lookup`` breaker and the retry policy, all inside the routing deadline
(``asyncio.timeout_at``), so the request never waits past the cap. Every outcome is counted
(``kvgate_kvcache_routing_lookups_total``): ``breaker_open``, ``pool_wait`` (``max_conns_per_host`` saturated,
not a controller failure), ``timeout``, ``bad_response``, ``error``, ``empty`` (no instance holds a prefix),
``routed`` or ``no_match`` (:meth:`.choice.RouteChoice.apply`). The decision goes to the client in the
``x-kvgate-kvcache`` header, without prompt text.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kvgate.chain import RequestContext
from kvgate.filters.kvcache.choice import RouteChoice, predicted
from kvgate.filters.kvcache.errors import CircuitOpenError, DecodeError, KVCacheError, PoolTimeout
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.lmcache_client import LMCacheClient, LookupResult
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.resilience import CircuitBreaker, RetryPolicy, Sleep, retry_call

log = logging.getLogger("kvgate.filters.kvcache")


class LookupRoute:
    def __init__(
        self,
        lmcache: LMCacheClient,
        breaker: CircuitBreaker,
        retry: RetryPolicy,
        choice: RouteChoice,
        metrics: KVCacheMetrics,
        events: FilterEvents,
        *,
        max_conns_per_host: int = 0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.lmcache = lmcache
        self.breaker = breaker
        self.retry = retry
        self.choice = choice
        self.metrics = metrics
        self.events = events
        self.max_conns_per_host = max_conns_per_host  # named in the pool-wait warning
        self._sleep = sleep

    async def route(self, ctx: RequestContext, tokens: list[int], deadline: float) -> LookupResult | None:
        """Look ``tokens`` up and set the preferred endpoint when an instance holds a usable prefix; the
        controller's answer (``None`` when the call failed or was skipped: the request is proxied unrouted)."""
        m = self.metrics
        breaker = self.breaker
        if not breaker.would_allow():
            m.routing_lookups.count("breaker_open").n += 1
            return None
        t0 = time.perf_counter()
        outcome: str | None = None
        try:
            async with asyncio.timeout_at(deadline):
                lookup = await retry_call(
                    lambda: breaker.call(lambda: self.lmcache.lookup(tokens, deadline=deadline), deadline=deadline),
                    self.retry,
                    deadline=deadline,
                    sleep=self._sleep,
                )
        except CircuitOpenError:
            outcome = "breaker_open"
        except PoolTimeout:
            outcome = "pool_wait"  # max_conns_per_host saturated: not a controller failure
            self.events.pool_wait(self.max_conns_per_host)
        except TimeoutError:
            outcome = "timeout"
            log.debug("[kvcache] routing lookup failed: timed out after %.0fms", (time.perf_counter() - t0) * 1e3)
        except DecodeError as exc:
            outcome = "bad_response"
            log.debug("[kvcache] routing lookup failed: %s", exc)
        except KVCacheError as exc:
            outcome = "error"
            log.debug("[kvcache] routing lookup failed: %s", exc)
        finally:
            m.routing_lookup_latency.observe(time.perf_counter() - t0)
        if outcome is not None:
            m.routing_lookups.count(outcome).n += 1
            return None
        if not lookup.layout:
            log.debug("[kvcache] routing lookup returned empty instance")
            outcome, choice = "empty", None
        else:
            outcome, choice = self.choice.apply(ctx, lookup.matches, len(tokens), 0, tokens)
        m.routing_lookups.count(outcome).n += 1
        if ctx.decisions:  # decision label for clients and benchmarks: which instance was preferred and why
            label = f"{outcome};lookup_ms={(time.perf_counter() - t0) * 1e3:.1f}" + predicted(choice)
            ctx.response_headers.append((b"x-kvgate-kvcache", label.encode()))
        return lookup
