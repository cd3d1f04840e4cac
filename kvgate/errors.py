"""kvgate's exception hierarchy."""

from __future__ import annotations


class KVGateError(Exception):
    """Base of every kvgate error."""


class ConfigError(KVGateError, ValueError):
    """Invalid configuration. ``path`` is the dotted key path (``clusters[0].endpoints[1].id``)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class RegistryError(KVGateError, ValueError):
    """A filter kind registered twice, or used/removed without being registered (a programming error)."""


class CallError(KVGateError):
    """A call to a dependency (an engine, the LMCache controller, ...) failed; see :mod:`kvgate.resilience`.

    ``retryable``: another attempt may succeed (transport error, timeout, 5xx). A ``False`` answer also proves the
    dependency alive, so a circuit breaker counts it as a success.
    """

    @property
    def retryable(self) -> bool:
        return True


class DeadlineExceeded(CallError, TimeoutError):
    """The caller's deadline passed before the call could be (re)tried."""


class CircuitOpen(KVGateError):
    """A circuit breaker rejected the call."""

    def __init__(self, breaker: str):
        super().__init__(f"{breaker} circuit breaker open")
        self.breaker = breaker


class LocalWaitTimeout(KVGateError, TimeoutError):
    """The deadline passed while waiting for a local resource (e.g. a connection slot): nothing was sent.

    Not a verdict on the dependency: breakers do not count it and it is not retried.
    """


class UpstreamError(KVGateError):
    """An upstream call failed before any byte reached the client."""

    def __init__(self, message: str, *, status: int = 502, error_type: str = "upstream_error"):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class NoHealthyEndpoint(UpstreamError):
    def __init__(self, cluster: str, reason: str = ""):
        super().__init__(
            f"no usable endpoint in cluster {cluster!r}: {reason or 'none available'}",
            status=503,
            error_type="service_unavailable",
        )


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str):
        super().__init__(message, status=504, error_type="upstream_timeout")
