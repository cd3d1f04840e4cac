"""The proxy filter's upstream HTTP client, behind a small interface (:mod:`.base`).

One implementation, :mod:`.aiohttp_transport` (aiohttp is a core dependency). pyreqwest was measured behind the
same interface (docs/benchmarks.md, "The proxy filter on pyreqwest") and not kept: no faster through kvgate,
slower on event streams, and a 0.x library. Tests may hand the proxy filter a transport of their own.
"""

from __future__ import annotations

from kvgate.filters.upstream.base import (
    Answer,
    Transport,
    TransportSettings,
    UpstreamBroken,
    UpstreamConnectError,
)

__all__ = [
    "Answer",
    "Transport",
    "TransportSettings",
    "UpstreamBroken",
    "UpstreamConnectError",
    "make_transport",
]


def make_transport(settings: TransportSettings) -> Transport:
    """The proxy filter's default transport (aiohttp)."""
    from kvgate.filters.upstream.aiohttp_transport import AiohttpTransport

    return AiohttpTransport(settings)
