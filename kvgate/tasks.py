"""Stopping background tasks: cancel them all, then wait for each, so a close never leaves one running."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None] | None]) -> None:
    """Cancel every task (``None`` entries are skipped), then await each. A task's cancellation or its own error
    is swallowed: closing must not fail because a background loop failed earlier (that was logged there)."""
    todo = [t for t in tasks if t is not None]
    for t in todo:
        t.cancel()
    for t in todo:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
