"""Operator-visible events of the kvcache filter: Prometheus counters plus WARNING lines.

Per-request events log at most once per interval per event (:class:`kvgate.ratelog.LogLimiter`); the rest are
counted in ``log_suppressed_total{event}``. URLs are shown redacted (``log_url``); never prompt text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvgate.filters.kvcache.errors import NotSupportedError
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.strategy import UNSUPPORTED_BACKOFF_MAX
from kvgate.ratelog import LogLimiter
from kvgate.resilience import CircuitBreaker

log = logging.getLogger("kvgate.filters.kvcache")


class FilterEvents:
    def __init__(
        self,
        metrics: KVCacheMetrics,
        *,
        controller_url: str,
        tokenizer_url: str,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metrics = metrics
        self.controller_url = controller_url  # redacted forms only
        self.tokenizer_url = tokenizer_url
        self.logs = LogLimiter(clock=clock, on_suppressed=lambda event: metrics.log_suppressed.labels(event).inc())

    def breaker_changed(self, breaker: CircuitBreaker) -> None:
        self.metrics.breaker_state.labels(breaker.name).set(int(breaker.state))
        log.warning(
            "[kvcache] %s circuit breaker -> %s (failures=%d)", breaker.name, breaker.state.name, breaker.failure_count
        )

    def warn(self, event: str, msg: str, *args: object) -> None:
        """A WARNING at most once per interval per ``event``; the rest are counted (``log_suppressed_total``)."""
        suppressed = self.logs.allow(event)
        if suppressed is None:
            return
        if suppressed:
            msg += " (%d more like this suppressed)"
            args = (*args, suppressed)
        log.warning(msg, *args)

    def tokenize_fallback(self, url: str, exc: Exception | None) -> None:
        self.metrics.tokenize_fallbacks.inc()
        why = f"failed: {exc}" if exc is not None else "is cooling down after a failure"
        self.warn(
            "tokenize_fallback",
            "[kvcache] tokenized by %s: vllm_endpoint %s %s",
            url,
            self.tokenizer_url,
            why,
        )

    def pool_wait(self, max_conns_per_host: int) -> None:
        self.warn(
            "pool_wait",
            "[kvcache] routing lookup gave up waiting for a connection (max_conns_per_host=%d)",
            max_conns_per_host,
        )

    def bad_response(self, call: str) -> None:
        self.metrics.bad_responses.labels(call).inc()
        self.warn("bad_response", "[kvcache] %s answered with a malformed body: refused", call)

    def action_unsupported(self, action: str, exc: NotSupportedError, strikes: int, backoff: float) -> None:
        self.metrics.action_supported.labels(action).set(0)
        self.metrics.action_unsupported.labels(action).inc()
        if strikes > 1:  # logged once per outage; re-probes are counted
            log.debug(
                "[kvcache] /%s still answers %d (re-probe %d); next re-probe in %.0fs",
                action,
                exc.status,
                strikes - 1,
                backoff,
            )
            return
        hint = " (LMCache 0.5.6 has no /evict route; /clear is the closest)" if action == "evict" else ""
        log.warning(
            "[kvcache] controller %s answered %d for /%s: route not supported%s; "
            "'%s' actions are skipped and re-probed after a back-off (%.0fs, doubling up to %.0fs)",
            self.controller_url,
            exc.status,
            action,
            hint,
            action,
            backoff,
            UNSUPPORTED_BACKOFF_MAX,
        )

    def action_supported(self, action: str) -> None:
        self.metrics.action_supported.labels(action).set(1)
        log.warning("[kvcache] controller answers /%s again: '%s' actions re-enabled", action, action)
