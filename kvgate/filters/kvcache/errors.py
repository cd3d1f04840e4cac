"""Exception hierarchy of the kvcache filter. None of these ever reaches a client."""

from __future__ import annotations

from kvgate.errors import CallError, CircuitOpen, KVGateError, LocalWaitTimeout


class KVCacheError(KVGateError):
    """Base of every kvcache filter error."""


class CircuitOpenError(KVCacheError, CircuitOpen):
    """The breaker rejected the call (Pixiu: ``kvcache circuit breaker open``)."""

    def __init__(self, breaker: str):
        KVCacheError.__init__(self, f"[kvcache] {breaker} circuit breaker open")
        self.breaker = breaker


class PoolTimeout(KVCacheError, LocalWaitTimeout):
    """The deadline passed while waiting for a connection slot (``max_conns_per_host``): nothing was sent.

    A local queueing verdict, not an upstream failure: breakers do not count it and it is not retried.
    """


class UpstreamCallError(KVCacheError, CallError):
    """An HTTP call to vLLM or the LMCache controller failed (``retryable`` unless overridden)."""


class TransportError(UpstreamCallError):
    """Connection refused/reset, DNS, ... (no HTTP status)."""


class CallTimeout(UpstreamCallError, TimeoutError):
    """The call did not finish before its deadline."""


class StatusError(UpstreamCallError):
    """Non-2xx response. 4xx other than 408/429 is not retryable."""

    def __init__(self, what: str, status: int, body: str):
        # The body is NOT part of the message: upstream validation errors echo client input (prompt text).
        super().__init__(f"[kvcache] {what} status {status} ({len(body)}-byte body)")
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        return not (400 <= self.status < 500) or self.status in (408, 429)


class NotSupportedError(StatusError):
    """404/405: the upstream has no such route (e.g. ``/evict`` on real LMCache 0.5.6)."""


class DecodeError(UpstreamCallError):
    """The response body is not the expected JSON shape."""
