"""Event-loop stall caused by the kvcache filter's body handling (parse + extract + canonical JSON + SHA-256).

A ticker task sleeps 1 ms in a loop and records the longest gap between its wake-ups while one request body is
handled. "inline" is the old path (``ctx.json()`` + ``extract`` + ``req.key`` on the loop); "offload" is
``kvgate.filters.kvcache.request.read_request`` (worker threads above ``JSON_OFFLOAD_BYTES``). The longest gap is
what every other stream on the loop waits. Sizes are chat bodies of many messages (the realistic large case).

    python benchmarks/body_offload.py [--sizes-mb 0.25 1 8 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from kvgate.chain import JSON_OFFLOAD_BYTES, RequestContext
from kvgate.filters.kvcache.extract import extract
from kvgate.filters.kvcache.request import read_request


def chat_body(mb: float) -> bytes:
    text = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 20
    messages = []
    size = 0
    while size < mb * 1024 * 1024:
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": text})
        size += len(text) + 40
    return json.dumps({"model": "m", "messages": messages}).encode()


def ctx_for(body: bytes) -> RequestContext:
    return RequestContext(method="POST", path="/v1/chat/completions", query_string=b"", headers=[], body=body)


async def inline(body: bytes) -> str:
    req = extract(ctx_for(body).json(), "default")
    assert req is not None
    return req.key


async def offload(body: bytes) -> str:
    parsed = await read_request(ctx_for(body), "default")
    assert parsed is not None
    return parsed[1]


async def measure(fn: object, body: bytes) -> tuple[float, float]:
    """(elapsed ms, longest loop stall ms) for one body."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    t0 = time.perf_counter()
    await fn(body)  # type: ignore[operator]
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.02)
    stop.set()
    await task
    return elapsed * 1e3, max(gaps) * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[0.25, 1.0, 8.0, 32.0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"offload threshold: {JSON_OFFLOAD_BYTES} bytes; median of {args.rounds} rounds")
    print(f"{'size':>8} {'path':>8} {'elapsed ms':>11} {'max stall ms':>13}")
    for mb in args.sizes_mb:
        body = chat_body(mb)
        assert await inline(body) == await offload(body)
        for name, fn in (("inline", inline), ("offload", offload)):
            runs = [await measure(fn, body) for _ in range(args.rounds)]
            el = statistics.median(r[0] for r in runs)
            stall = statistics.median(r[1] for r in runs)
            print(f"{len(body) / 1048576:>6.2f}MB {name:>8} {el:>11.1f} {stall:>13.1f}")


if __name__ == "__main__":
    asyncio.run(main())
