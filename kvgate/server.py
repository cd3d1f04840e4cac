"""The gateway ASGI application (one per listener) and the :class:`Gateway` running them (admin: :mod:`.admin`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvgate.admin import admin_router
from kvgate.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Router,
    Scope,
    Send,
    json_bytes,
    lifespan_noop,
    openai_error,
    read_body,
    send_json,
    send_response,
)
from kvgate.chain import FilterStatus, HttpFilter, RequestContext, UpstreamResponse, build_filter
from kvgate.client_headers import ClientHeaders
from kvgate.config import GatewayConfig, HttpConnectionManager, Listener
from kvgate.cycle_hooks import CycleHooks
from kvgate.errors import UpstreamError
from kvgate.httpproto import ServerLimits
from kvgate.metrics import multiprocess_dir
from kvgate.ratelog import RateLimitedLog
from kvgate.registry import check_config
from kvgate.runtime import Runtime

log = logging.getLogger("kvgate.server")
_rlog = RateLimitedLog(log, interval_s=60.0)

DECISION_PREFIX = b"x-kvgate-"
HOOKS_PARAM = "_kvgate_hooks"  # ctx.params: the server's CycleHooks (kvgate.httpproto) when it runs under kvgate's


@dataclass
class RouteEntry:
    prefix: str
    path: str | None
    cluster: str

    def matches(self, path: str) -> bool:
        if self.path is not None:
            return path == self.path
        return path.startswith(self.prefix)


class ListenerApp:
    """ASGI app of one listener: route match → decode filters → stream the upstream response."""

    def __init__(self, listener: Listener, hcm: HttpConnectionManager, filters: list[HttpFilter], runtime: Runtime):
        self.listener = listener
        self.hcm = hcm
        self.filters = filters
        self.runtime = runtime
        self.routes = [RouteEntry(r.match.prefix, r.match.path, r.route.cluster) for r in hcm.route_config.routes]
        self.metrics = runtime.metrics
        # filters that override encode (the others' would be an empty coroutine per request)
        self._encoders = [f for f in filters if type(f).encode is not HttpFilter.encode]
        self._client_headers = ClientHeaders(hcm)
        # read per request: plain attributes (a pydantic model's attribute read costs more)
        self._body_limit: int = hcm.max_request_body_bytes
        self._timeout: float = hcm.timeout

    def server_limits(self) -> ServerLimits:
        """The HTTP server's client limits from this listener's connection-manager keys."""
        h = self.hcm
        return ServerLimits(
            request_headers_timeout=h.request_headers_timeout,
            request_body_timeout=h.request_body_timeout,
            max_request_headers_bytes=h.max_request_headers_kb * 1024,
            max_request_headers_count=h.max_request_headers_count,
            idle_timeout=h.idle_timeout,
            max_idle_connections=h.max_idle_connections,
            on_reject=lambda status, reason: self.metrics.local_replies.labels(str(status), reason).inc(),
        )

    def _route(self, path: str) -> RouteEntry | None:
        for r in self.routes:
            if r.matches(path):
                return r
        return None

    async def _local(self, send: Send, status: int, message: str, error_type: str, reason: str) -> None:
        self.metrics.local_replies.labels(str(status), reason).inc()
        await send_json(send, status, openai_error(message, error_type, status))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan_noop(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if "." in path and any(seg in (".", "..") for seg in path.split("/")):
            # Dot segments would be collapsed by the upstream client, escaping the matched route prefix.
            await self._local(
                send, 400, "invalid request path (dot segments are not allowed)", "invalid_request_error", "bad_path"
            )
            return
        route = self._route(path)
        if route is None:
            await self._local(send, 404, f"no route for path {scope['path']!r}", "not_found", "no_route")
            return
        try:
            body = await read_body(scope, receive, self._body_limit)
        except BodyTooLarge as exc:
            await self._local(
                send, 413, f"request body exceeds {exc.limit} bytes", "invalid_request_error", "body_too_large"
            )
            return
        except ClientDisconnected:
            self.metrics.requests.count(route.cluster, "", "client_closed").n += 1
            log.info("client disconnected while sending the request body")
            return
        headers, show_decisions = self._client_headers(scope)
        ctx = RequestContext(  # positional: a dataclass's __init__ takes ten keywords at twice the cost
            scope["method"],
            path,
            scope.get("query_string", b""),
            headers,
            body,
            route.cluster,
            route.prefix,
            self._timeout,
            scope.get("raw_path") or path.encode("utf-8"),
            show_decisions,
        )
        # A client disconnect cancels this handler (and so the upstream call or stream it is in), which closes
        # the upstream connection and frees the endpoint slot. kvgate's HTTP protocol cancels it on connection
        # loss (no task per request); under another ASGI server a watcher task waits for http.disconnect.
        me = asyncio.current_task()
        assert me is not None
        hooks = (scope.get("extensions") or {}).get("kvgate.hooks")
        watch: CycleHooks | _DisconnectWatcher
        if hooks is not None:
            ctx.params[HOOKS_PARAM] = hooks
            watch = hooks.cancel_on_disconnect(me)
        else:
            watch = _DisconnectWatcher(receive, me, ctx)
        try:
            await self._handle(ctx, send, show_decisions)
        except asyncio.CancelledError:
            if not watch.lost:
                raise
            me.uncancel()
            self.metrics.requests.count(route.cluster, _endpoint(ctx), "client_closed").n += 1
            log.info("client disconnected; upstream request to %s cancelled", _endpoint(ctx) or route.cluster)
        finally:
            watch.stop()

    async def _handle(self, ctx: RequestContext, send: Send, show_decisions: bool = False) -> None:
        try:
            for flt in self.filters:
                if await flt.decode(ctx) is FilterStatus.STOP:
                    break
        except UpstreamError as exc:
            self.metrics.requests.count(ctx.cluster_name, _endpoint(ctx), str(exc.status)).n += 1
            self.metrics.local_replies.labels(str(exc.status), exc.error_type).inc()
            await send_json(send, exc.status, openai_error(str(exc), exc.error_type, exc.status))
            return
        except Exception as exc:  # a bug or shutdown race: still an OpenAI-style answer, never a crash
            log.exception("request failed inside the filter chain: %s", type(exc).__name__)
            self.metrics.requests.count(ctx.cluster_name, _endpoint(ctx), "502").n += 1
            self.metrics.local_replies.labels("502", "internal_error").inc()
            await send_json(send, 502, openai_error(f"gateway error: {type(exc).__name__}", "gateway_error", 502))
            return
        if ctx.local_reply is not None:
            lr = ctx.local_reply
            self.metrics.local_replies.labels(str(lr.status), "filter").inc()
            await send_response(send, lr.status, json_bytes(lr.body), headers=lr.headers)
            return
        resp = ctx.response
        if resp is None:
            await self._local(
                send,
                502,
                "no filter produced a response (is dgp.filter.llm.proxy configured?)",
                "gateway_error",
                "no_terminal_filter",
            )
            return
        try:
            for flt in self._encoders:
                await flt.encode(ctx)
            headers = resp.headers
            if show_decisions:
                headers = [*headers, *ctx.response_headers]
                if resp.endpoint_id:
                    headers.append((b"x-kvgate-endpoint", resp.endpoint_id.encode()))
            elif ctx.response_headers:  # filters' x-kvgate-* decision headers stay inside (upstream's pass)
                headers = [*headers, *(h for h in ctx.response_headers if not h[0].lower().startswith(DECISION_PREFIX))]
            if resp.body is None:  # the whole body came with the head: one write for both (kvgate's server)
                hooks = ctx.params.get(HOOKS_PARAM)
                if hooks is not None:
                    hooks.head_with_body()
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                await send({"type": "http.response.body", "body": resp.complete or b"", "more_body": False})
            else:
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                if not await self._stream(ctx, resp, send):
                    return
            ctx.completed = True
            self.metrics.requests.count(ctx.cluster_name, resp.endpoint_id or "", str(resp.status)).n += 1
        finally:
            if resp.body is not None:
                with contextlib.suppress(Exception):
                    await resp.body.aclose()
            if resp.on_close is not None:
                resp.on_close()

    async def _stream(self, ctx: RequestContext, resp: UpstreamResponse, send: Send) -> bool:
        """Send the answer's body stream; False when the upstream aborted it (the client's connection is dropped)."""
        assert resp.body is not None
        sent = 0
        # With a Content-Length, the chunk that completes it ends the response (one send fewer per answer);
        # the body is still read to its end, so the upstream connection goes back to the pool.
        length = resp.length if ctx.method != "HEAD" else None
        ended = False
        try:
            async for chunk in resp.body:
                if ended:
                    continue
                sent += len(chunk)
                ended = length is not None and sent >= length
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Too late for an error answer: end without completing the response, so the server
            # drops the connection and the client sees a truncated stream, not a clean end.
            _rlog.warning(
                "upstream_aborted",
                "upstream %s/%s aborted the response after %d bytes: %s",
                ctx.cluster_name,
                resp.endpoint_id,
                sent,
                type(exc).__name__,
            )
            self.metrics.requests.count(ctx.cluster_name, resp.endpoint_id or "", "upstream_aborted").n += 1
            hooks = ctx.params.get(HOOKS_PARAM)
            if hooks is not None:
                hooks.abort()  # drop the connection: the client sees a truncated stream, uvicorn logs nothing
            return False
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


class _DisconnectWatcher:
    """Under another ASGI server: a task that waits for ``http.disconnect`` and cancels the request's task if the
    response has not completed (:class:`CycleHooks`' ``cancel_on_disconnect`` does it without a task)."""

    __slots__ = ("_ctx", "_target", "_watch", "lost")

    def __init__(self, receive: Receive, target: asyncio.Task[Any], ctx: RequestContext):
        self._target = target
        self._ctx = ctx
        self.lost = False
        self._watch = asyncio.ensure_future(_wait_disconnect(receive))
        self._watch.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is None and not self._ctx.completed and not self.lost:
            self.lost = True
            self._target.cancel()

    def stop(self) -> None:
        self._watch.remove_done_callback(self._done)
        self._watch.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


def _endpoint(ctx: RequestContext) -> str:
    return ctx.response.endpoint_id or "" if ctx.response is not None else ""


class Gateway:
    """All listeners of a config plus the admin app, sharing one :class:`Runtime`."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None):
        checked = check_config(config)  # filter kinds, filter configs, terminal filter last (kvgate.registry)
        self.config = config
        self.runtime = runtime or Runtime(config)
        self.listener_apps: list[ListenerApp] = []
        self._started = False
        self._tally_task: asyncio.Task[None] | None = None
        self._start_time = time.time()
        self.warnings: list[str] = checked.warnings
        for lst, chain in zip(config.listeners, checked.chains, strict=True):
            filters = [build_filter(f.name, f.config, self.runtime) for f in chain]
            self.listener_apps.append(ListenerApp(lst, lst.hcm, filters, self.runtime))
        for w in self.warnings:
            log.warning("config: %s", w)

    async def start(self) -> None:
        if self._started:
            return
        for app in self.listener_apps:
            for flt in app.filters:
                await flt.start()
        await self.runtime.clusters.start_health_checks(self.runtime.aux_session, self._proxy_schemes())
        if multiprocess_dir() is not None:  # other workers' scrapes read this one's files: publish every second
            self._tally_task = asyncio.create_task(self.runtime.metrics.tally.run(), name="kvgate:metrics-flush")
        self._started = True

    def _proxy_schemes(self) -> dict[str, str]:
        """Cluster → scheme of the proxy filter that serves it (https if any listener's proxy says so)."""
        out: dict[str, str] = {}
        for app in self.listener_apps:
            last = app.hcm.http_filters[-1].config or {}  # the terminal filter (validated at start)
            scheme = str(last.get("scheme", "http")).strip().lower()
            for r in app.routes:
                if out.get(r.cluster) != "https":
                    out[r.cluster] = scheme
        return out

    async def close(self) -> None:
        if self._tally_task is not None:
            self._tally_task.cancel()  # it flushes once more as it stops
            with contextlib.suppress(asyncio.CancelledError):
                await self._tally_task
            self._tally_task = None
        for app in self.listener_apps:
            for flt in app.filters:
                with contextlib.suppress(Exception):
                    await flt.close()
        await self.runtime.close()
        self._started = False

    def ready(self) -> tuple[bool, dict[str, int]]:
        healthy = {c.name: len(c.healthy_endpoints()) for c in self.runtime.clusters}
        return self._started and all(n > 0 for n in healthy.values()), healthy

    def admin_app(self) -> Router:
        return admin_router(self.config, self.runtime.metrics, self.ready, self._start_time)
