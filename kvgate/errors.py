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
