"""What the proxy filter needs from an upstream HTTP client: send one request, get the answer's head, stream its
body, give the connection back (or drop it when the body was cut).

Failures are reported in three kinds, which the proxy maps onto its attempt outcomes:

- ``TimeoutError`` (connect timeout, or the transport's own read timeout): ``timeout``;
- :class:`UpstreamConnectError` (refused, unreachable): ``network_error``;
- :class:`UpstreamBroken` (the connection failed after it was made): ``broken``. While the body streams it
  is an ``OSError`` the server counts as ``upstream_aborted``.

The header wait and the idle wait between body chunks are bounded by the proxy, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TransportSettings:
    connect_timeout: float  # seconds
    keepalive_timeout: float  # idle pooled connections are closed after this
    max_conns_per_host: int  # concurrent connections per endpoint origin; 0 = no cap
    stream_idle_timeout: float  # max gap between body chunks
    header_timeout: float  # max wait for the response head (bounded by the proxy)


class UpstreamConnectError(Exception):
    """The connection could not be made (refused, unreachable, DNS). ``kind`` names the cause for logs."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class UpstreamBroken(ConnectionError):
    """The connection broke after it was made: before the head (``broken``) or mid-body (``upstream_aborted``).
    ``kind`` names the cause for logs."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class Answer(Protocol):
    """An upstream answer whose head has arrived; the body is read with :meth:`read_nowait` / :meth:`read`."""

    @property
    def status(self) -> int: ...

    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """The head's headers as received (names in any case, repeated names kept)."""
        ...

    def read_complete(self) -> bytes | None:
        """The whole body when all of it has arrived (and nothing was read before), else None (nothing is
        taken then)."""
        ...

    def read_nowait(self) -> bytes:
        """Body bytes already received, without waiting; ``b""`` when none are buffered (or at the end)."""
        ...

    def at_eof(self) -> bool:
        """The whole body has been read."""
        ...

    async def read(self) -> bytes:
        """The next body chunk, waiting for it; ``b""`` at the end of the body."""
        ...

    def release(self) -> None:
        """Idempotent: keep the connection for reuse when the body was read to the end, else close it; free the
        per-endpoint connection slot."""
        ...


class Transport(Protocol):
    async def send(self, method: str, origin: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        """Send ``method origin+target`` (``target``: the path and query bytes as the client sent them, as a
        latin-1 string), the headers as given (none added where the library allows) and ``body`` (none when
        empty); return once the answer's head arrived. No redirect is followed and nothing is decompressed."""
        ...

    async def close(self) -> None: ...
