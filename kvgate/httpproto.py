"""uvicorn's httptools protocol, hardened against slow or oversized clients (not an HTTP server of our own).

uvicorn has no request-header/body read timeouts, no header size/count limits and no cap on idle
keep-alive connections, and it answers protocol errors in plain text. This subclass adds exactly that:

* ``request_headers_timeout``: the request head must arrive within it (from accept, or from the first
  byte of a follow-up request); a silent new connection is closed, a partial head gets 408.
* ``request_body_timeout``: max gap between body bytes while the application waits for them → 408.
* ``max_request_headers_bytes`` / ``max_request_headers_count``: 431; an over-long request target: 414.
* ``max_idle_connections``: beyond it, the longest-idle keep-alive connection is closed.
* its own refusals (malformed request, non-ASCII target, CONNECT, WebSocket upgrade) are OpenAI-style
  JSON; they are logged once per minute per kind (WARNING) and reported through ``on_reject``.
* ``kvgate.hooks`` (a scope extension, :class:`CycleHooks`): ``abort()`` drops the connection of a response the
  application cannot complete (an upstream aborted mid-stream) without uvicorn logging an ERROR;
  ``cancel_on_disconnect(task)`` cancels the request's task when the connection is lost before the response
  completed (no watcher task per request); ``head_with_body()``: the next two sends are a whole response, and
  uvicorn's two writes go out as one (one send and one packet fewer per answer).

Timers are lazy: one ``call_later`` per connection is re-armed only when it fires before the current deadline,
instead of three timer handles created and cancelled per request (uvicorn's keep-alive wait included).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvgate.cycle_hooks import CycleHooks, HeadWithBody
from kvgate.ratelog import RateLimitedLog

log = logging.getLogger("kvgate.http")
_rlog = RateLimitedLog(log, interval_s=60.0)

REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


@dataclass(frozen=True)
class ServerLimits:
    """Client-side limits of one listener (defaults: nginx's client_header/body_timeout 60s, Envoy's
    max_request_headers_kb 60 and headers_count 100)."""

    request_headers_timeout: float = 60.0
    request_body_timeout: float = 60.0
    max_request_headers_bytes: int = 60 * 1024
    max_request_headers_count: int = 100
    idle_timeout: float = 60.0
    max_idle_connections: int = 1024
    on_reject: Callable[[int, str], None] | None = None


class _Refuse(Exception):
    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def error_bytes(status: int, message: str, error_type: str = "invalid_request_error") -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": status}}, separators=(",", ":")
    ).encode()
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GatewayHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ServerLimits] = ServerLimits()
    # per server (see with_limits): keep-alive connections between requests, oldest first
    idle: ClassVar[dict[GatewayHttpProtocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when self._timer fires (loop time)
        self._deadline = 0.0  # when the armed check is due
        self._due: Callable[[], None] | None = None  # the armed check (None: disarmed)
        self._on_lost: dict[Any, CycleHooks] = {}  # request cycle -> its hooks, whose task a loss cancels
        self._in_head = True  # reading a request head (or waiting for the first byte of one)
        self._started = False  # some byte of the current request head arrived
        self._head_raw = 0
        self._head_bytes = 0  # the request's header bytes (set once the head is parsed; trailers add to it)
        self._max_headers = self.limits.max_request_headers_count
        self._refusal: _Refuse | None = None
        self._keepalive = False  # waiting for the next request on a kept-alive connection (the timer's job)

    @classmethod
    def with_limits(cls, limits: ServerLimits) -> type[GatewayHttpProtocol]:
        """A subclass bound to ``limits`` with its own idle-connection registry (one per server)."""
        return type("GatewayHttpProtocol", (cls,), {"limits": limits, "idle": {}})

    # -- timers --------------------------------------------------------------------------------------
    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay`` unless re-armed or disarmed before. A pending timer that fires no later
        than the new deadline is kept (it re-arms itself for the rest); only an earlier deadline needs a new one."""
        deadline = self.loop.time() + delay
        self._deadline = deadline
        self._due = fn
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._fire)

    def _disarm(self) -> None:
        self._due = None  # a pending timer finds nothing to do when it fires

    def _fire(self) -> None:
        self._timer = None
        fn = self._due
        if fn is None:
            return
        now = self.loop.time()
        if now < self._deadline:  # re-armed since this timer was set
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._fire)
            return
        self._due = None
        fn()

    def _header_timeout(self) -> None:
        if self.transport.is_closing():
            return
        if not self._started:  # nothing of a request arrived: close silently (nginx does the same)
            self.transport.close()
            return
        self._refuse(
            _Refuse(
                408, f"request headers not received within {self.limits.request_headers_timeout:g}s", "header_timeout"
            )
        )

    def _body_timeout(self) -> None:
        if self.transport.is_closing() or self.cycle is None or self.cycle.response_complete:
            return
        if self.flow.read_paused:  # the application is not reading: not the client's fault
            self._arm(self.limits.request_body_timeout, self._body_timeout)
            return
        if self.cycle.response_started:
            self._count(408, "body_timeout")
            self.transport.close()
            return
        self._refuse(_Refuse(408, f"request body stalled for {self.limits.request_body_timeout:g}s", "body_timeout"))

    # -- refusals ------------------------------------------------------------------------------------
    def _count(self, status: int, reason: str) -> None:
        _rlog.warning(reason, "refused a client request: %s %s (logged once a minute per kind)", status, reason)
        if self.limits.on_reject is not None:
            self.limits.on_reject(status, reason)

    def _refuse(self, r: _Refuse) -> None:
        self._disarm()
        self._count(r.status, r.reason)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the application (if it runs) sees a disconnect, not a send
        if not self.transport.is_closing():
            self.transport.write(error_bytes(r.status, r.message))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # uvicorn's own plain-text 400 → JSON
        self._refuse(_Refuse(400, "malformed HTTP request", "bad_request"))

    def _unsupported_upgrade_warning(self) -> None:  # h2c and friends: served as plain HTTP/1.1, quietly
        log.debug("ignored an unsupported Upgrade request header")

    # -- protocol interface --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn narrows it
        super().connection_made(transport)
        self._arm(self.limits.request_headers_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.idle.pop(self, None)
        super().connection_lost(exc)
        lost, self._on_lost = self._on_lost, {}
        for cycle, hooks in lost.items():
            if not cycle.response_complete:
                hooks._connection_lost()

    def data_received(self, data: bytes) -> None:
        if self._keepalive:  # the wait between requests ends
            self._unset_keepalive_if_required()
        if self._in_head:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._refusal is not None:
                self._refuse(self._refusal)
            # any other upgrade (h2c): ignored; the request runs as plain HTTP/1.1
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, _Refuse) else None
            self._refuse(cause or self._refusal or _Refuse(400, "malformed HTTP request", "bad_request"))
            return
        # Timers are armed only for what is still missing once the data is parsed: a request that came whole
        # in one read arms none.
        if self._in_head:  # a partial head
            if self._head_raw > self.limits.max_request_headers_bytes + 1024:
                self._refuse(
                    _Refuse(
                        431, f"request head exceeds {self.limits.max_request_headers_bytes} bytes", "headers_too_large"
                    )
                )
            elif self._due is None:
                self._arm(self.limits.request_headers_timeout, self._header_timeout)
        else:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:  # a partial body
                self._arm(self.limits.request_body_timeout, self._body_timeout)

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._in_head = True
        self._started = True
        self._head_raw = 0
        self._refusal = None
        self.scope["extensions"] = {}

    def on_url(self, url: bytes) -> None:
        self.url += url  # uvicorn's on_url
        if len(self.url) > self.limits.max_request_headers_bytes:
            raise _Refuse(414, f"request target exceeds {self.limits.max_request_headers_bytes} bytes", "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The count is checked per header (a flood of tiny headers is refused at the first one over), the bytes
        # once the head is parsed (data_received bounds what a head may pile up before that) and per trailer of a
        # chunked body (uvicorn adds trailers to the request's headers; they count toward the same limits).
        headers = self.headers
        if len(headers) >= self._max_headers or not self._in_head:
            self._limit(name, value)
        name = name.lower()  # uvicorn's on_header
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        headers.append((name, value))

    def _limit(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self._max_headers:
            raise _Refuse(431, f"more than {self._max_headers} request headers", "too_many_headers")
        self._head_bytes += len(name) + len(value) + 4  # a trailer
        if self._head_bytes > self.limits.max_request_headers_bytes:
            limit = self.limits.max_request_headers_bytes
            raise _Refuse(431, f"request headers exceed {limit} bytes", "headers_too_large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._started = False
        self._due = None  # the head's timer (data_received arms the body's if the body is not all there)
        # the header bytes as they would be counted per header (name, value, ": " and CRLF), in C
        headers = self.headers
        self._head_bytes = sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)
        if self._head_bytes > self.limits.max_request_headers_bytes:
            limit = self.limits.max_request_headers_bytes
            raise _Refuse(431, f"request headers exceed {limit} bytes", "headers_too_large")
        method = self.parser.get_method()
        if method == b"CONNECT":
            self._refusal = _Refuse(405, "CONNECT is not supported by this gateway", "connect")
            raise self._refusal
        if self.parser.should_upgrade() and (self._get_upgrade() or b"").strip() == b"websocket":
            self._refusal = _Refuse(400, "WebSocket upgrades are not supported by this gateway", "websocket")
            raise self._refusal
        if not self.url.isascii():
            raise _Refuse(400, "request target must be ASCII (percent-encode other bytes)", "bad_target")
        HttpToolsProtocol.on_headers_complete(self)
        cycle = self.cycle
        if cycle is not None:
            ext: dict[str, Any] = self.scope["extensions"]
            ext["kvgate.hooks"] = CycleHooks(self, cycle)

    def on_message_complete(self) -> None:
        self._due = None  # the body's timer
        HttpToolsProtocol.on_message_complete(self)

    # -- keep-alive: uvicorn's per-response timer handle replaced by the connection's lazy timer ------------
    def _unset_keepalive_if_required(self) -> None:
        if self._keepalive:
            self._keepalive = False
            self._disarm()
            self.idle.pop(self, None)

    def _keepalive_expired(self) -> None:
        self._keepalive = False
        if not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:  # uvicorn's, with the keep-alive wait on the lazy timer
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self._keepalive:  # (data_received ended the wait when this request began)
            self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:  # pipelined requests: start the next one
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._keepalive = True
        self._arm(self.timeout_keep_alive, self._keepalive_expired)
        cap = self.limits.max_idle_connections
        self.idle[self] = None
        while len(self.idle) > cap:
            oldest = next(iter(self.idle))
            self.idle.pop(oldest, None)
            oldest.transport.close()

    def _watch(self, cycle: Any, hooks: CycleHooks) -> None:
        """Tell ``hooks`` if the connection is lost before ``cycle``'s response completes."""
        if cycle.disconnected:
            self.loop.call_soon(hooks._connection_lost)
            return
        if self.flow.read_paused and not cycle.response_complete:
            self.flow.resume_reading()  # notice a client's close even if reading was paused
        self._on_lost[cycle] = hooks

    def _hold_head(self, cycle: Any) -> None:
        """The application's next two sends are a response's head and its whole body: write them together."""
        if not cycle.response_started and cycle.transport is self.transport:
            cycle.transport = HeadWithBody(self.transport, cycle)

    def _abort(self, cycle: Any) -> None:
        """Drop the connection of a response that cannot be completed; uvicorn then logs nothing."""
        cycle.disconnected = True
        cycle.keep_alive = False
        if not self.transport.is_closing():
            self.transport.close()
