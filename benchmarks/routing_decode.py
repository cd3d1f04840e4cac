"""The kvcache filter's decode (the whole routing step) for an 8k-token chat, routed from the event index.

Builds a real ``KVCacheFilter`` with ``local_tokenizer`` + ``index_source: events`` (the event index filled
directly, as the subscriber would) and times ``decode`` on one event loop (body parse, key, tokenize, index
match, endpoint choice, headers), p50/p99 over ``--iters`` requests:
- ``miss, new chat``: token-cache miss of a chat never seen (the message-segment cache is cleared first);
- ``miss, next turn``: token-cache miss of a new turn of a known conversation (earlier messages reused);
- ``hit``: the same request again (token-cache hit: no tokenization);
- ``miss, unheld chat``: token-cache miss of a chat never seen whose system prompt nobody holds (lazy
  tokenization: its first pieces show that no instance holds its first block; decided as ``empty``).
The controller is a dead URL: nothing on this path may call it. Issue 9's targets: miss p50 <= 1 ms,
p99 <= 5 ms; hit p50 <= 0.2 ms.

Runs as ``kvgate serve`` does: uvloop when installed (``--loop asyncio``: the stdlib's) and the collector tuned
as ``--gc-threshold`` does (``--gc-threshold 0``: the interpreter's settings).

    python benchmarks/routing_decode.py [--tokenizer-dir DIR (default: the simulator's)] [--tokens 8192] [--iters 300]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, RequestContext
from kvgate.config import parse_config
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.gctune import DEFAULT_GEN0_THRESHOLD, tune_for_serving
from kvgate.runtime import Runtime
from kvgate.serving import run_async
from kvgate_bench.peers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("e0", "e1", "e2", "e3")
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "cache routing prefix engine token block gateway latency über naïve 東京 数据 Привет 🙂 x=1; f(y) {k: v}"
).split()


def default_tokenizer_dir() -> Path:
    from kvgate_sim.tokenizer import tokenizer_dir

    return tokenizer_dir()


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def gateway(engines: tuple[str, ...]) -> Any:
    hcm = {
        "name": "dgp.filter.httpconnectionmanager",
        "config": {"route_config": {"routes": [{"match": {"prefix": "/"}, "route": {"cluster": "llm"}}]}},
    }
    return parse_config(
        {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port": 18888}},
                    "filter_chains": {"filters": [hcm]},
                }
            ],
            "clusters": [
                {
                    "name": "llm",
                    "endpoints": [
                        {"id": e, "socket_address": {"address": "127.0.0.1", "port": 20000 + i}}
                        for i, e in enumerate(engines)
                    ],
                }
            ],
        }
    )


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1e3


async def main_async(args: argparse.Namespace) -> None:
    runtime = Runtime(gateway(ENGINES))
    cfg = KVCacheConfig.model_validate(
        {
            "enabled": True,
            "vllm_endpoint": dead_url(),
            "lmcache_endpoint": dead_url(),
            "token_cache": {"enabled": True, "max_size": 8192},
            "local_tokenizer": {"path": str(args.tokenizer_dir), "thread_threshold": args.thread_threshold},
            "index_source": "events",
            "kv_events": {"bind": "tcp://127.0.0.1:*", "sources": [{"instance": e, "topic": e} for e in ENGINES]},
        }
    )
    flt = KVCacheFilter(cfg, runtime, signals=StaticSignals())  # not started: no sockets, index filled below
    tok = flt.local_tokenizer
    assert tok is not None and flt.event_index is not None
    rng = random.Random(0)
    system = {"role": "system", "content": "You are a helpful assistant. " + " ".join(rng.choices(WORDS, k=200))}
    base: list[dict[str, Any]] = [system]
    while len(tok.encode_chat(base)) < args.tokens - 400:
        base.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=300))})
        base.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=100))})

    def chat(i: int) -> list[dict[str, Any]]:
        return [*base, {"role": "user", "content": f"question {i}: " + " ".join(rng.choices(WORDS, k=20))}]

    ids0 = tok.encode_chat(chat(-1))
    index = flt.event_index.index
    shared = ids0[: len(ids0) - 64]
    for inst, frac in (("e0", 1.0), ("e1", 1.0), ("e2", 0.5), ("e3", 0.25)):
        n = int(len(shared) * frac) // 16 * 16
        index.apply_stored(inst, [hash((inst, k)) for k in range(n // 16)], None, shared[:n], 16, "GPU")

    def ctx_of(body: bytes) -> RequestContext:
        return RequestContext(
            method="POST",
            path="/v1/chat/completions",
            query_string=b"",
            headers=[],
            body=body,
            cluster_name="llm",
            timeout=10.0,
        )

    async def timed(body: bytes, held: bool = True) -> float:
        ctx = ctx_of(body)
        t0 = time.perf_counter()
        await flt.decode(ctx)
        dt = time.perf_counter() - t0
        if held:
            assert ctx.params.get(PREFERRED_ENDPOINT_PARAM) in ("e0", "e1"), ctx.response_headers
        else:
            assert dict(ctx.response_headers)[b"x-kvgate-kvcache"].startswith(b"empty;"), ctx.response_headers
        return dt

    bodies = [json.dumps({"model": "m", "messages": chat(i)}).encode() for i in range(args.iters)]
    new_chat: list[float] = []
    gc.collect()
    if args.gc_threshold:
        tune_for_serving(args.gc_threshold)  # as kvgate serve does after start-up
    for b in bodies:
        if tok.segments is not None:
            tok.segments.clear()
        flt.token_cache.clear()
        new_chat.append(await timed(b))
    flt.token_cache.clear()
    next_turn = [
        await timed(b)
        for b in [json.dumps({"model": "m", "messages": chat(10**6 + i)}).encode() for i in range(args.iters)]
    ]
    unheld: list[float] = []
    for i in range(args.iters):
        other = {"role": "system", "content": f"Assistant {i}. " + " ".join(rng.choices(WORDS, k=200))}
        body = json.dumps({"model": "m", "messages": [other, *chat(i)[1:]]}).encode()
        if tok.segments is not None:
            tok.segments.clear()
        flt.token_cache.clear()
        unheld.append(await timed(body, held=False))
    hit_body = bodies[0]
    await timed(hit_body)
    hit = [await timed(hit_body) for _ in range(args.iters)]
    await flt.close()
    await runtime.close()

    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        f"[tokenizer {args.tokenizer_dir.name}, engine {tok.engine}, loop {loop}] chat of {len(ids0)} tokens, "
        f"{len(base) + 1} messages, body {len(bodies[0])} bytes; index {len(index)} blocks"
    )
    for name, xs in (
        ("miss, new chat", new_chat),
        ("miss, next turn", next_turn),
        ("miss, unheld chat", unheld),
        ("hit", hit),
    ):
        print(
            f"  decode {name:17s} p50 {pct(xs, 0.5):7.3f} ms   p99 {pct(xs, 0.99):7.3f} ms"
            f"   mean {statistics.mean(xs) * 1e3:7.3f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tokenizer-dir", type=Path, default=default_tokenizer_dir())
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--thread-threshold", type=int, default=4096, help="local_tokenizer.thread_threshold")
    ap.add_argument(
        "--gc-threshold",
        type=int,
        default=DEFAULT_GEN0_THRESHOLD,
        help="the collector settings of kvgate serve --gc-threshold (0: the interpreter's own)",
    )
    ap.add_argument(
        "--loop",
        choices=("serve", "asyncio"),
        default="serve",
        help="serve: the loop kvgate serve runs on (uvloop when installed); asyncio: the stdlib's",
    )
    args = ap.parse_args()
    if args.loop == "serve":
        run_async(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
