"""Gateway overhead: added latency (p50/p99) and max requests/s, gateway vs direct, in one run.

A trivial fast upstream (non-streaming JSON) runs in a separate process; the gateway runs in another
process (uvloop); the load generator (aiohttp, fixed concurrency) in this one. Each phase alternates
direct → gateway several times so machine noise hits both sides alike; figures are reported as
ratios and differences against the direct baseline of the same run.

    python benchmarks/overhead.py [--concurrency 8] [--requests 4000] [--rounds 3] [--no-peer]

When ``vllm-router`` (PyPI, Rust; an optional peer, not a dependency) is installed, it is measured in the
same run, in front of the same upstream (``--policy round_robin``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import aiohttp
import yaml

BODY = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 1}).encode()


def _upstream(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    from kvgate.asgi import Router, send_response
    from kvgate.serving import start_server

    reply = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}).encode()
    router = Router()

    async def comp(req, send):  # type: ignore[no-untyped-def]
        await req.body()
        await send_response(send, 200, reply)

    async def health(req, send):  # type: ignore[no-untyped-def]
        await send_response(send, 200, b"{}")

    router.add("POST", "/v1/completions", comp)
    router.add("GET", "/health", health)
    router.add("GET", "/v1/models", health)

    async def main() -> None:
        h = await start_server(router, log_level="error")
        port_q.put(h.port)
        await asyncio.Event().wait()

    uvloop.run(main())


def _gateway(cfg_path: str, port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    from kvgate.app import start_gateway
    from kvgate.config import load_config

    async def main() -> None:
        g = await start_gateway(load_config(cfg_path), port=0, with_admin=False, log_level="error")
        port_q.put(g.listeners[0].port)
        await asyncio.Event().wait()

    uvloop.run(main())


async def _load(url: str, n: int, concurrency: int) -> tuple[list[float], float]:
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(50):  # warm-up
            async with s.post(url, data=BODY) as r:
                await r.read()
        it = iter(range(n))

        async def worker() -> None:
            for _ in it:
                t = time.perf_counter()
                async with s.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return lat, wall


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip vllm-router even when installed")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    up = ctx.Process(target=_upstream, args=(q,), daemon=True)
    up.start()
    up_port = q.get(timeout=30)
    cfg = {
        "listeners": [
            {
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port": 1}},
                "filter_chains": {
                    "filters": [
                        {
                            "name": "dgp.filter.httpconnectionmanager",
                            "config": {
                                "route_config": {"routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]},
                                "http_filters": [{"name": "dgp.filter.llm.proxy", "config": {}}],
                            },
                        }
                    ]
                },
            }
        ],
        "clusters": [
            {
                "name": "c",
                "lb_policy": "RoundRobin",
                "endpoints": [{"id": "up", "socket_address": {"address": "127.0.0.1", "port": up_port}}],
            }
        ],
    }
    fd, cfg_path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f)
    gw = ctx.Process(target=_gateway, args=(cfg_path, q), daemon=True)
    gw.start()
    gw_port = q.get(timeout=30)
    peer = None
    from kvgate_bench.peers import find_peer, start_peer

    if not args.no_peer and find_peer("vllm-router"):
        peer = asyncio.run(start_peer("vllm-router", "round_robin", [f"http://127.0.0.1:{up_port}"]))
    elif not args.no_peer:
        print("vllm-router not installed: peer comparison skipped (pip install vllm-router)")
    try:
        direct: list[float] = []
        via: list[float] = []
        peer_lat: list[float] = []
        d_rps: list[float] = []
        g_rps: list[float] = []
        p_rps: list[float] = []
        conc = args.concurrency
        for _ in range(args.rounds):
            if peer is not None:
                lat, wall = asyncio.run(_load(f"{peer.url}/v1/completions", args.requests, conc))
                peer_lat += lat
                p_rps.append(len(lat) / wall)
            lat, wall = asyncio.run(_load(f"http://127.0.0.1:{up_port}/v1/completions", args.requests, conc))
            direct += lat
            d_rps.append(len(lat) / wall)
            lat, wall = asyncio.run(_load(f"http://127.0.0.1:{gw_port}/v1/completions", args.requests, conc))
            via += lat
            g_rps.append(len(lat) / wall)
    finally:
        if peer is not None:
            asyncio.run(peer.stop())
        gw.terminate()
        up.terminate()
        gw.join(5)
        up.join(5)
        os.unlink(cfg_path)
    res = {
        "concurrency": args.concurrency,
        "requests_per_side": len(direct),
        "direct_p50_ms": pct(direct, 50) * 1e3,
        "direct_p99_ms": pct(direct, 99) * 1e3,
        "gateway_p50_ms": pct(via, 50) * 1e3,
        "gateway_p99_ms": pct(via, 99) * 1e3,
        "direct_rps": statistics.median(d_rps),
        "gateway_rps": statistics.median(g_rps),
    }
    res["added_p50_ms"] = res["gateway_p50_ms"] - res["direct_p50_ms"]
    res["added_p99_ms"] = res["gateway_p99_ms"] - res["direct_p99_ms"]
    res["rps_ratio"] = res["gateway_rps"] / res["direct_rps"]
    if peer_lat:
        res["vllm_router_p50_ms"] = pct(peer_lat, 50) * 1e3
        res["vllm_router_p99_ms"] = pct(peer_lat, 99) * 1e3
        res["vllm_router_added_p50_ms"] = res["vllm_router_p50_ms"] - res["direct_p50_ms"]
        res["vllm_router_rps"] = statistics.median(p_rps)
        res["vllm_router_rps_ratio"] = res["vllm_router_rps"] / res["direct_rps"]
    for k, v in res.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
