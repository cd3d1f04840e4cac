"""Request bodies handed to aiohttp.

aiohttp sends ``bytes`` of over 1 MiB with a ResourceWarning ("might lock the event loop"); a ``BytesIO``
of the same bytes is sent in chunks with the same ``Content-Length``. A new ``BytesIO`` is made per call,
so a retried request starts from the first byte again.
"""

from __future__ import annotations

import io

LARGE_BODY_BYTES = 1 << 20  # aiohttp's warning threshold


def request_body(body: bytes) -> bytes | io.BytesIO:
    """``body`` itself when small, else a fresh ``BytesIO`` over it (no copy of the bytes)."""
    return io.BytesIO(body) if len(body) > LARGE_BODY_BYTES else body
