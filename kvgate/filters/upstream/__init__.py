"""The proxy filter's upstream HTTP client, behind a small interface (:mod:`.base`).

Two implementations: :mod:`.aiohttp_transport` (the default; aiohttp is a core dependency) and
:mod:`.pyreqwest_transport` (the ``fastproxy`` extra; imported only when chosen). :func:`make_transport` builds
the one the proxy filter's ``client`` key names.
"""

from __future__ import annotations

import importlib.util

from kvgate.filters.upstream.base import (
    Answer,
    Transport,
    TransportSettings,
    UpstreamBroken,
    UpstreamConnectError,
)

CLIENTS = ("aiohttp", "pyreqwest", "auto")

__all__ = [
    "CLIENTS",
    "Answer",
    "Transport",
    "TransportSettings",
    "UpstreamBroken",
    "UpstreamConnectError",
    "make_transport",
    "pyreqwest_available",
    "resolve_client",
]


def pyreqwest_available() -> bool:
    """Whether the ``fastproxy`` extra is installed (checked without importing it)."""
    return importlib.util.find_spec("pyreqwest") is not None


def resolve_client(name: str) -> str:
    """The concrete client for a ``client`` setting: ``auto`` is pyreqwest when installed, else aiohttp."""
    if name == "auto":
        return "pyreqwest" if pyreqwest_available() else "aiohttp"
    return name


def make_transport(name: str, settings: TransportSettings) -> Transport:
    """The transport for ``name`` (``aiohttp``, ``pyreqwest`` or ``auto``)."""
    client = resolve_client(name)
    if client == "pyreqwest":
        from kvgate.filters.upstream.pyreqwest_transport import PyreqwestTransport

        return PyreqwestTransport(settings)
    from kvgate.filters.upstream.aiohttp_transport import AiohttpTransport

    return AiohttpTransport(settings)
