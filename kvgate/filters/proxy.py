"""``dgp.filter.llm.proxy``: forward the request to an endpoint of the route's cluster.

Pick order: the load balancer first (its cursor advances, as in Pixiu), then the preferred endpoint
set by an earlier filter (``llm_preferred_endpoint_id``) replaces the pick if it exists in the cluster
and is healthy; otherwise the pick stays and the reason is counted. Retries and failover happen only
before any byte reached the client. Fixed Pixiu defects: fallback walks *all* other healthy
endpoints with wrap-around (not index+1), 4xx answers pass through instead of being retried and
marking the endpoint unhealthy, and ``timeout`` bounds the wait for response headers, not the
length of a stream. The HTTP client sits behind a small interface (:mod:`kvgate.filters.upstream`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

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
from kvgate.deadlines import Deadlines
from kvgate.errors import NoHealthyEndpoint, UpstreamError, UpstreamTimeout
from kvgate.filters.proxy_headers import request_headers, response_headers
from kvgate.filters.upstream import (
    Answer,
    Transport,
    TransportSettings,
    UpstreamBroken,
    UpstreamConnectError,
    make_transport,
)
from kvgate.ratelog import RateLimitedLog
from kvgate.resilience import RetryPolicy
from kvgate.runtime import Runtime
from kvgate.tally import CountCell, HistogramCell

log = logging.getLogger("kvgate.proxy")
_rlog = RateLimitedLog(log, interval_s=10.0)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ProxyConfig(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    timeout: Duration = Field(default=0.0, ge=0, description="max wait for response headers; 0 = response_timeout")
    response_timeout: Duration = Field(default=300.0, gt=0, description="header wait when timeout is 0")
    connect_timeout: Duration = Field(default=5.0, gt=0)
    stream_idle_timeout: Duration = Field(default=300.0, gt=0, description="max gap between body chunks")
    keepalive_timeout: Duration = Field(
        default=4.0,
        gt=0,
        description="idle upstream connections are closed after this; keep it below the upstream's own (uvicorn: 5s)",
    )
    # Pixiu's camelCase keys. maxIdleConns* have no aiohttp equivalent (Go's idle-pool sizes) and are
    # accepted for compatibility only; maxConnsPerHost caps concurrent connections per endpoint (0 = no cap),
    # and a wait for a free connection counts toward `timeout`.
    maxIdleConns: int = Field(default=0, ge=0)
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


def _attempts_and_delays(ep: EndpointState) -> tuple[int, Callable[[int], float]]:
    """Attempts on ``ep`` and the wait before attempt ``n + 1`` (``n`` >= 1), from its ``retry_policy``."""
    policy = ep.config.llm_meta.retry_policy
    schedule = RetryPolicy.from_pixiu(policy.name, policy.config)
    return schedule.max_attempts, lambda n: schedule.backoff(n - 1)


@dataclass(frozen=True, slots=True)
class _Target:
    origin: str
    attempts: int
    delay: Callable[[int], float]  # the wait before attempt n + 1 (n >= 1)
    ok: CountCell  # kvgate_upstream_attempts{outcome="ok"}
    ttfb: HistogramCell
    latency: HistogramCell
    api_key: str | None  # the endpoint's llm_meta.api_key
    fallback: bool  # llm_meta.fallback


_Kept = tuple[EndpointState, Answer, float]  # an endpoint, its answer (slot held) and the attempt's start


class ProxyFilter(HttpFilter):
    def __init__(self, config: ProxyConfig, runtime: Runtime, transport: Transport | None = None):
        self.config = config
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.transport: Transport = transport or make_transport(
            TransportSettings(
                connect_timeout=config.connect_timeout,
                keepalive_timeout=config.keepalive_timeout,
                max_conns_per_host=config.maxConnsPerHost,
                stream_idle_timeout=config.stream_idle_timeout,
                header_timeout=config.header_timeout,
            ),
        )
        self._targets: dict[EndpointState, _Target] = {}  # endpoint -> what never changes
        # one timer per wait length instead of one per wait (kvgate.deadlines)
        self._header_deadlines = Deadlines(config.header_timeout)
        self._idle_deadlines = Deadlines(config.stream_idle_timeout)

    def _target(self, ep: EndpointState) -> _Target:
        """The endpoint's origin (``scheme://host:port``), retry schedule and metric cells, built once: its
        config never changes."""
        target = self._targets.get(ep)
        if target is None:
            attempts, delay = _attempts_and_delays(ep)
            origin = f"{self.config.scheme}://{ep.base_url.split('://', 1)[1]}"
            m = self.metrics
            target = self._targets[ep] = _Target(
                origin,
                attempts,
                delay,
                m.upstream_attempts.count(ep.cluster, ep.id, "ok"),
                m.upstream_ttfb.histogram(ep.cluster, ep.id),
                m.upstream_latency.histogram(ep.cluster, ep.id),
                ep.config.llm_meta.api_key,
                ep.config.llm_meta.fallback,
            )
        return target

    async def close(self) -> None:
        self._header_deadlines.close()
        self._idle_deadlines.close()
        await self.transport.close()

    def _choose(self, ctx: RequestContext, cluster: ClusterState) -> EndpointState:
        key = ctx.header(cluster.config.hash_header) if cluster.balancer.keyed else None
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
        self.metrics.preferred.count(cluster.name, outcome).n += 1
        ctx.params["llm_preferred_outcome"] = outcome
        if picked is None:
            raise NoHealthyEndpoint(cluster.name, cluster.unavailable_reason())
        return picked

    def _order(self, cluster: ClusterState, first: EndpointState) -> list[EndpointState]:
        """``first``, then (its ``fallback`` on) every other healthy endpoint, wrapping around."""
        order = [first]
        n = len(cluster.endpoints)
        for step in range(1, n):
            ep = cluster.endpoints[(first.index + step) % n]
            if ep.healthy():
                order.append(ep)
        return order

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        cluster = self.runtime.clusters.get(ctx.cluster_name)
        if cluster is None:  # guarded by config validation
            raise UpstreamError(f"unknown cluster {ctx.cluster_name!r}", status=500)
        first = self._choose(ctx, cluster)
        attempts_log: list[dict[str, Any]] = []
        ctx.params[UPSTREAM_ATTEMPTS_PARAM] = attempts_log
        kept: list[_Kept] = []  # newest retryable error answer
        try:
            ok = await self._attempt_all(ctx, cluster, first, attempts_log, kept)
        except BaseException:
            for _, r, _ in kept:
                r.release()
            raise
        if ok is None and kept:  # every attempt failed: pass the last upstream error answer through
            ok = kept.pop()
            cluster.acquire(ok[0])  # _wrap's release() frees it when the body ends
        for _, r, _ in kept:
            r.release()
        if ok is not None:
            ep, resp, t0 = ok
            ctx.response = self._wrap(cluster, ep, resp, t0)
            return FilterStatus.CONTINUE
        outcomes = {a["error_type"] for a in attempts_log}
        if "timeout" in outcomes:
            raise UpstreamTimeout(f"upstream did not answer within {self.config.header_timeout:g}s")
        if "broken" in outcomes:
            raise UpstreamError("upstream connection broken before a response")
        tried = ", ".join(f"{a['endpoint_id']} ({a['error_type']})" for a in attempts_log) or "none"
        raise UpstreamError(
            f"no endpoint of cluster {cluster.name!r} is reachable (tried: {tried}); {cluster.unavailable_reason()}",
            status=503,
            error_type="service_unavailable",
        )

    async def _attempt_all(
        self,
        ctx: RequestContext,
        cluster: ClusterState,
        first: EndpointState,
        attempts_log: list[dict[str, Any]],
        kept: list[_Kept],
    ) -> _Kept | None:
        """Try the endpoints in order with their retry policies; the first good answer (slot held) or None.

        An answer of any status proves the endpoint alive: it is never ejected for it here (only outlier
        detection's consecutive 5xx may do that, counting this request once). Transport failures (connect
        error, header timeout, broken connection) trigger the passive cooldown."""
        target_bytes = (ctx.raw_path or ctx.path.encode()).decode("latin-1")  # the client's path bytes
        if ctx.query_string:
            target_bytes += "?" + ctx.query_string.decode("latin-1")
        first_target = self._target(first)
        for ep in self._order(cluster, first) if first_target.fallback else (first,):
            target = first_target if ep is first else self._target(ep)
            n_attempts, delay = target.attempts, target.delay
            transport_failure = ""
            answered: int | None = None
            for attempt in range(1, n_attempts + 1):
                if attempt > 1:
                    await asyncio.sleep(delay(attempt - 1))
                t0 = time.perf_counter()
                cluster.acquire(ep)
                try:
                    with self._header_deadlines.wait():  # the header timeout, without a timer per request
                        resp = await self.transport.send(
                            ctx.method,
                            target.origin,
                            target_bytes,
                            request_headers(ctx.headers, target.api_key),
                            ctx.body,
                        )
                except TimeoutError:
                    cluster.release(ep)
                    self._record(attempts_log, cluster, ep, "timeout", None)
                    transport_failure = f"timeout (no response headers within {self.config.header_timeout:g}s)"
                    continue
                except UpstreamConnectError as exc:
                    cluster.release(ep)
                    self._record(attempts_log, cluster, ep, "network_error", None, str(exc))
                    transport_failure = f"connection failure ({exc.kind})"
                    break  # transport errors are not retried on the same endpoint (Pixiu); move on
                except UpstreamBroken as exc:
                    cluster.release(ep)
                    self._record(attempts_log, cluster, ep, "broken", None, str(exc))
                    transport_failure = f"broken connection ({exc.kind})"
                    continue
                except BaseException:
                    cluster.release(ep)
                    raise
                transport_failure = ""
                answered = resp.status
                if resp.status in RETRYABLE_STATUS:
                    self._record(attempts_log, cluster, ep, "status_error", resp.status)
                    cluster.release(ep)
                    last = attempt == n_attempts or resp.status == 429  # 429: not again on the same endpoint
                    if not last:
                        resp.release()
                        continue
                    for _, r, _ in kept:
                        r.release()
                    kept[:] = [(ep, resp, t0)]
                    break
                attempts_log.append(_attempt_entry(cluster, ep, "ok", resp.status))
                target.ok.n += 1
                cluster.mark_answered(ep, resp.status)
                return ep, resp, t0
            if transport_failure:
                cluster.mark_failed(ep, transport_failure)
            elif answered is not None:
                cluster.mark_answered(ep, answered)  # alive; counts once per request toward consecutive_5xx
        return None

    def _record(
        self,
        log_: list[dict[str, Any]],
        cluster: ClusterState,
        ep: EndpointState,
        outcome: str,
        status: int | None,
        detail: str = "",
    ) -> None:
        log_.append(_attempt_entry(cluster, ep, outcome, status))
        self.metrics.upstream_attempts.count(cluster.name, ep.id, outcome).n += 1
        if outcome != "ok":  # counted above; logged once per 10 s per endpoint and kind
            _rlog.warning(
                f"{cluster.name}/{ep.id}/{outcome}",
                "upstream %s/%s attempt failed: %s %s",
                cluster.name,
                ep.id,
                outcome,
                status or detail,
            )

    def _wrap(self, cluster: ClusterState, ep: EndpointState, resp: Answer, t0: float) -> UpstreamResponse:
        headers, length = response_headers(resp.raw_headers())
        target = self._target(ep)
        declared = int(length) if length is not None and length.isdigit() else None
        # The whole body already arrived with the head (a short JSON answer): handed over as bytes, the
        # connection and the endpoint slot freed now, and the server sends it without iterating a stream.
        first = resp.read_complete()
        if first:
            now = time.perf_counter()
            _release_quietly(resp)
            cluster.release(ep)
            target.ttfb.observe_both(target.latency, now - t0)  # the first byte was the last
            return UpstreamResponse(resp.status, headers, None, ep.id, None, declared, first)  # positional: cheaper
        if first is None:  # the body is still arriving: what is here already
            first = resp.read_nowait()
        released = False

        def release() -> None:
            """Idempotent: free the endpoint slot and the connection (also when the body never started)."""
            nonlocal released
            if not released:
                released = True
                _release_quietly(resp)
                cluster.release(ep)
                target.latency.observe(time.perf_counter() - t0)

        idle = self._idle_deadlines

        async def body() -> AsyncGenerator[bytes, None]:
            chunk = first
            try:
                if chunk:
                    target.ttfb.observe(time.perf_counter() - t0)
                    yield chunk
                elif not resp.at_eof():
                    with idle.wait():  # a stalled upstream must not hold the slot forever
                        chunk = await resp.read()
                    if chunk:
                        target.ttfb.observe(time.perf_counter() - t0)
                        yield chunk
                while chunk:
                    # Bytes already received are taken without a wait (and without a deadline).
                    chunk = resp.read_nowait()
                    if not chunk and not resp.at_eof():
                        with idle.wait():
                            chunk = await resp.read()
                    if chunk:
                        yield chunk
            finally:
                release()

        return UpstreamResponse(resp.status, headers, body(), ep.id, release, declared)


def _attempt_entry(cluster: ClusterState, ep: EndpointState, outcome: str, status: int | None) -> dict[str, Any]:
    """One attempt as recorded in ``ctx.params[UPSTREAM_ATTEMPTS_PARAM]``."""
    return {
        "endpoint_id": ep.id,
        "endpoint_address": ep.base_url,
        "cluster": cluster.name,
        "success": outcome == "ok",
        "status_code": status,
        "error_type": outcome,
    }


def _release_quietly(resp: Answer) -> None:
    try:
        resp.release()
    except Exception:  # the connection is dropped either way
        pass


@register_filter("dgp.filter.llm.proxy", ProxyConfig, terminal=True)
def _factory(config: ProxyConfig, runtime: Runtime) -> HttpFilter:
    return ProxyFilter(config, runtime)
