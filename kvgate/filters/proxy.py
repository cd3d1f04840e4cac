"""``dgp.filter.llm.proxy``: forward the request to an endpoint of the route's cluster.

Pick order: the load balancer first (its cursor advances, as in Pixiu), then the preferred endpoint
set by an earlier filter (``llm_preferred_endpoint_id``) replaces the pick if it exists in the cluster
and is healthy; otherwise the pick stays and the reason is counted. Retries and failover happen only
before any byte reached the client. Fixed Pixiu defects: fallback walks *all* other healthy
endpoints with wrap-around (not index+1), 4xx answers pass through instead of being retried and
marking the endpoint unhealthy, and ``timeout`` bounds the wait for response headers, not the
length of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvgate.chain import (
    PREFERRED_ENDPOINT_PARAM,
    UPSTREAM_ATTEMPTS_PARAM,
    FilterStatus,
    HttpFilter,
    RequestContext,
    UpstreamResponse,
    register_filter,
)
from kvgate.cluster import ClusterState, EndpointState
from kvgate.config import Duration
from kvgate.durations import parse_duration
from kvgate.errors import NoHealthyEndpoint, UpstreamError, UpstreamTimeout
from kvgate.runtime import Runtime

log = logging.getLogger("kvgate.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
    }
)
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ProxyConfig(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    timeout: Duration = Field(default=0.0, ge=0, description="max wait for response headers; 0 = response_timeout")
    response_timeout: Duration = Field(default=300.0, gt=0)
    connect_timeout: Duration = Field(default=5.0, gt=0)
    maxIdleConns: int = Field(default=0, ge=0)  # Pixiu's camelCase keys
    maxIdleConnsPerHost: int = Field(default=0, ge=0)
    maxConnsPerHost: int = Field(default=0, ge=0)
    scheme: str = "http"

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("http", "https"):
            raise ValueError("dgp.filter.llm.proxy: scheme must be http or https")
        return v

    @property
    def header_timeout(self) -> float:
        return self.timeout if self.timeout > 0 else self.response_timeout


def _attempts_and_delays(ep: EndpointState) -> tuple[int, Any]:
    policy = ep.config.llm_meta.retry_policy
    cfg = policy.config
    times = int(cfg.get("times", 2))
    if policy.name == "NoRetry":
        return 1, lambda n: 0.0
    if policy.name == "CountBased":
        return times + 1, lambda n: 0.0
    initial = parse_duration(cfg.get("initialInterval", "100ms"))
    max_iv = parse_duration(cfg.get("maxInterval", "5s"))
    mult = float(cfg.get("multiplier", 2.0))
    return times + 1, lambda n: min(initial * mult ** (n - 1), max_iv) + random.random() * 0.1


class ProxyFilter(HttpFilter):
    def __init__(self, config: ProxyConfig, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.metrics = runtime.metrics
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            limit = self.config.maxIdleConns or 0  # 0 = unlimited in aiohttp
            connector = aiohttp.TCPConnector(
                limit=limit, limit_per_host=self.config.maxConnsPerHost or 0, ttl_dns_cache=300,
                keepalive_timeout=30, enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _choose(self, ctx: RequestContext, cluster: ClusterState) -> EndpointState:
        key = ctx.header(cluster.config.hash_header)
        picked = cluster.pick(key)
        preferred = ctx.params.get(PREFERRED_ENDPOINT_PARAM)
        if isinstance(preferred, str) and preferred:
            ep = cluster.get(preferred)
            if ep is None:
                outcome = "unknown_id"
                log.info("preferred endpoint %r is not in cluster %s; keeping LB pick", preferred, cluster.name)
            elif not ep.healthy():
                outcome = "unhealthy"
                log.info("preferred endpoint %s/%s is unhealthy; keeping LB pick", cluster.name, preferred)
            else:
                outcome = "honored"
                picked = ep
        else:
            outcome = "absent"
        self.metrics.preferred.labels(cluster.name, outcome).inc()
        ctx.params["llm_preferred_outcome"] = outcome
        if picked is None:
            raise NoHealthyEndpoint(cluster.name)
        return picked

    def _order(self, cluster: ClusterState, first: EndpointState) -> list[EndpointState]:
        order = [first]
        if first.config.llm_meta.fallback:
            n = len(cluster.endpoints)
            for step in range(1, n):
                ep = cluster.endpoints[(first.index + step) % n]
                if ep.healthy():
                    order.append(ep)
        return order

    def _headers(self, ctx: RequestContext, ep: EndpointState) -> list[tuple[str, str]]:
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ctx.headers if k not in HOP_BY_HOP]
        api_key = ep.config.llm_meta.api_key
        if api_key:
            out = [(k, v) for k, v in out if k.lower() != "authorization"]
            out.append(("Authorization", f"Bearer {api_key}"))
        return out

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        cluster = self.runtime.clusters.get(ctx.cluster_name)
        if cluster is None:  # guarded by config validation
            raise UpstreamError(f"unknown cluster {ctx.cluster_name!r}", status=500)
        first = self._choose(ctx, cluster)
        attempts_log: list[dict[str, Any]] = []
        ctx.params[UPSTREAM_ATTEMPTS_PARAM] = attempts_log
        last_resp: tuple[EndpointState, aiohttp.ClientResponse, float] | None = None
        saw_timeout = False
        saw_broken = False
        for ep in self._order(cluster, first):
            n_attempts, delay = _attempts_and_delays(ep)
            for attempt in range(1, n_attempts + 1):
                if attempt > 1:
                    await asyncio.sleep(delay(attempt - 1))
                t0 = time.perf_counter()
                url = f"{self.config.scheme}://{ep.base_url.split('://', 1)[1]}{ctx.path}"
                if ctx.query_string:
                    url += "?" + ctx.query_string.decode("latin-1")
                cluster.acquire(ep)
                try:
                    async with asyncio.timeout(self.config.header_timeout):  # no extra task (unlike wait_for)
                        resp = await self._client().request(
                            ctx.method, url, data=ctx.body or None, headers=self._headers(ctx, ep),
                            allow_redirects=False, compress=False,
                        )
                except TimeoutError:
                    cluster.release(ep)
                    saw_timeout = True
                    self._record(attempts_log, cluster, ep, "timeout", None)
                    continue
                except aiohttp.ClientConnectorError as exc:
                    cluster.release(ep)
                    self._record(attempts_log, cluster, ep, "network_error", None, str(exc))
                    break  # transport errors are not retried on the same endpoint (Pixiu); move on
                except (aiohttp.ClientError, OSError) as exc:
                    cluster.release(ep)
                    saw_broken = True
                    self._record(attempts_log, cluster, ep, "broken", None, str(exc))
                    continue
                except BaseException:
                    cluster.release(ep)
                    raise
                if resp.status in RETRYABLE_STATUS:
                    self._record(attempts_log, cluster, ep, "status_error", resp.status)
                    cluster.release(ep)
                    if attempt < n_attempts:
                        resp.release()
                        continue
                    if last_resp is not None:  # keep only the newest error answer to pass through
                        last_resp[1].release()
                    last_resp = (ep, resp, t0)
                    continue
                self._record(attempts_log, cluster, ep, "ok", resp.status)
                if last_resp is not None:
                    last_resp[1].release()
                cluster.mark_ok(ep)
                ctx.response = self._wrap(cluster, ep, resp, t0, acquired=True)
                return FilterStatus.CONTINUE
            cluster.mark_failed(ep)
        if last_resp is not None:
            ep, resp, t0 = last_resp
            cluster.acquire(ep)
            ctx.response = self._wrap(cluster, ep, resp, t0, acquired=True)
            return FilterStatus.CONTINUE
        if saw_timeout:
            raise UpstreamTimeout(f"upstream did not answer within {self.config.header_timeout:g}s")
        if saw_broken:
            raise UpstreamError("upstream connection broken before a response")
        raise UpstreamError(f"no endpoint of cluster {cluster.name!r} is reachable", status=503,
                            error_type="service_unavailable")

    def _record(self, log_: list[dict[str, Any]], cluster: ClusterState, ep: EndpointState, outcome: str,
                status: int | None, detail: str = "") -> None:
        log_.append({"endpoint_id": ep.id, "endpoint_address": ep.base_url, "cluster": cluster.name,
                     "success": outcome == "ok", "status_code": status, "error_type": outcome})
        self.metrics.upstream_attempts.labels(cluster.name, ep.id, outcome).inc()
        if outcome != "ok":
            log.warning("upstream %s/%s attempt failed: %s %s", cluster.name, ep.id, outcome, status or detail)

    def _wrap(self, cluster: ClusterState, ep: EndpointState, resp: aiohttp.ClientResponse, t0: float,
              acquired: bool) -> UpstreamResponse:
        headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
        if resp.headers.get("Content-Length") and "chunked" not in resp.headers.get("Transfer-Encoding", ""):
            headers.append((b"content-length", resp.headers["Content-Length"].encode("latin-1")))
        metrics = self.metrics
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                cluster.release(ep)
                metrics.upstream_latency.labels(cluster.name, ep.id).observe(time.perf_counter() - t0)

        async def body() -> AsyncIterator[bytes]:
            first = True
            try:
                async for chunk in resp.content.iter_any():
                    if first:
                        metrics.upstream_ttfb.labels(cluster.name, ep.id).observe(time.perf_counter() - t0)
                        first = False
                    yield chunk
            finally:
                with contextlib.suppress(Exception):
                    resp.release() if resp.content.at_eof() else resp.close()
                release()

        return UpstreamResponse(resp.status, headers, body(), endpoint_id=ep.id, on_close=release)


@register_filter("dgp.filter.llm.proxy", ProxyConfig, terminal=True)
def _factory(config: ProxyConfig, runtime: Runtime) -> HttpFilter:
    return ProxyFilter(config, runtime)
