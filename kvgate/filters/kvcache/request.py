"""Reading a request for the filter: parse the body, extract model / prompt (:mod:`.extract`) and key it.

Above ``JSON_OFFLOAD_BYTES`` the parse, the extraction and the canonical-JSON + SHA-256 key run on worker
threads, so a large body does not stall every other stream on the loop; a :class:`~.body_memo.BodyMemo` skips
all three for a body seen before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvgate.chain import JSON_OFFLOAD_BYTES, RequestContext
from kvgate.filters.kvcache.body_memo import BodyMemo
from kvgate.filters.kvcache.extract import Extracted, extract


def _extract_and_key(data: Any, default_model: str) -> tuple[Extracted, str] | None:
    req = extract(data, default_model)
    return None if req is None else (req, req.key)


async def read_request(
    ctx: RequestContext, default_model: str, memo: BodyMemo | None = None
) -> tuple[Extracted, str] | None:
    """Parse, extract and key the request. Above ``JSON_OFFLOAD_BYTES`` the parse and the canonical-JSON +
    SHA-256 key run on worker threads, so a large body does not stall every other stream on the loop.
    With ``memo`` a body seen before reuses its result (see :mod:`.body_memo`).
    Raises ``ValueError`` (malformed JSON, :class:`ExtractError`)."""
    if memo is not None:
        hit = memo.get(ctx.body)
        if hit is not None:
            return hit
    data = await ctx.json_async()
    if len(ctx.body) > JSON_OFFLOAD_BYTES:
        parsed = await asyncio.to_thread(_extract_and_key, data, default_model)
    else:
        parsed = _extract_and_key(data, default_model)
    if memo is not None and parsed is not None:
        memo.put(ctx.body, parsed)
    return parsed
