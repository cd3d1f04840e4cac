"""Which pooled async HTTP client for the proxy: aiohttp vs httpx, same upstream, same run.

A zero-cost upstream (nginx when installed, else a small uvicorn app) runs in a separate process; each
client sends N POSTs at fixed concurrency over a keep-alive pool, alternating clients per round so machine
noise hits both alike.

    python benchmarks/client_choice.py [--requests 3000] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import statistics
import sys
import time

import aiohttp
import httpx
from overhead import BODY, start_nginx, start_py_upstream  # same zero-cost upstream as the overhead benchmark


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def run_aiohttp(url: str, n: int, conc: int) -> tuple[list[float], float]:
    lat: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        it = iter(range(n))

        async def worker() -> None:
            for _ in it:
                t = time.perf_counter()
                async with s.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat, time.perf_counter() - t0


async def run_httpx(url: str, n: int, conc: int) -> tuple[list[float], float]:
    lat: list[float] = []
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits) as c:
        it = iter(range(n))

        async def worker() -> None:
            for _ in it:
                t = time.perf_counter()
                r = await c.post(url, content=BODY, headers={"content-type": "application/json"})
                r.read()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    up = start_nginx() if shutil.which("nginx") else start_py_upstream(mp.get_context("spawn"))
    url = f"{up.url}/v1/completions"
    res: dict[str, tuple[list[float], list[float]]] = {"aiohttp": ([], []), "httpx": ([], [])}
    try:
        for _ in range(args.rounds):
            for name, fn in (("aiohttp", run_aiohttp), ("httpx", run_httpx)):
                lat, wall = asyncio.run(fn(url, args.requests, args.concurrency))
                res[name][0].extend(lat)
                res[name][1].append(len(lat) / wall)
    finally:
        up.stop()
    base = statistics.median(res["aiohttp"][1])
    for name, (lat, rps) in res.items():
        print(
            f"{name:>8}: p50 {pct(lat, 50) * 1e3:.3f} ms  p99 {pct(lat, 99) * 1e3:.3f} ms  "
            f"{statistics.median(rps):.0f} req/s  (x{statistics.median(rps) / base:.2f} of aiohttp)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
