"""Many-chunk event streams through the proxy (issue 12): does the upstream client's per-chunk cost change the
picture that one-chunk JSON answers (overhead.py) give?

Every answer is an event stream of ``--events`` small ``data:`` events (about 200 bytes each, like vLLM's
completion chunks) and ``data: [DONE]``, each sent as its own body chunk by a uvicorn upstream (kvgate's own
``start_server``, a process and session of its own), in two modes:

* ``burst``: the events back to back (the kernel coalesces them: the proxy reads few, larger chunks);
* ``paced``: ``--gap-ms`` between events (a decode step: every event arrives and is forwarded on its own).

Paths: ``bare`` (overhead.py's ``_bare``: uvicorn + httptools + uvloop + aiohttp, forwarding each chunk as it
comes) and ``kvgate`` (``kvgate serve``, routing off). The run that compared the proxy filter on aiohttp and on
pyreqwest (docs/benchmarks.md, "The proxy filter on pyreqwest") had a third path; pyreqwest was not kept.
The load generator is an aiohttp client in this process (wrk cannot time the first event): per
request the time to the first body bytes (TTFB) and to the end (total); it checks every answer's event count.
It costs CPU on the same cores as the paths, alike for all of them: compare ratios within a run. ``cpu µs/req``
is the CPU time (user + system, all threads) of the path's process per request.

    python benchmarks/sse_chunks.py [--events 200] [--gap-ms 1] [--duration 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from overhead import Proc, _wait_http, add_run_options, group_cpu_s, kvgate_config, start_bare, start_kvgate

CHUNK = {
    "id": "cmpl-bench",
    "object": "text_completion",
    "created": 1,
    "model": "demo",
    "choices": [{"index": 0, "text": " token", "logprobs": None, "finish_reason": None}],
}
EVENT = f"data: {json.dumps(CHUNK)}\n\n".encode()
DONE = b"data: [DONE]\n\n"


def _sse_upstream(port_q: mp.Queue, events: int, gap_s: float) -> None:  # type: ignore[type-arg]
    import uvloop

    from kvgate.serving import start_server

    os.setsid()  # a session of its own (see overhead.py's _bare: autogroup scheduling)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(events):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
            if gap_s:
                await asyncio.sleep(gap_s)
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def main() -> None:
        h = await start_server(app, log_level="error")
        port_q.put(h.port)
        await asyncio.Event().wait()

    uvloop.run(main())


def start_upstream(ctx: Any, events: int, gap_s: float) -> Proc:
    q = ctx.Queue()
    p = ctx.Process(target=_sse_upstream, args=(q, events, gap_s), daemon=True)
    p.start()
    proc = Proc(f"sse-upstream-{gap_s:g}", f"http://127.0.0.1:{q.get(timeout=30)}", mp_proc=p)
    _wait_http(proc.url + "/health")
    return proc


def session_pid(proc: Proc) -> int:
    return int(proc.popen.pid if proc.popen is not None else proc.mp_proc.pid)


def cpu_s(sid: int) -> float:
    """CPU seconds (user + system, all threads) of every process in session ``sid``."""
    return group_cpu_s(session=sid)


@dataclass
class Run:
    rps: float
    ttfb_ms: list[float]
    total_ms: list[float]
    cpu_us: float


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)


async def load(url: str, conc: int, duration: float, events: int) -> tuple[int, float, list[float], list[float]]:
    ttfb: list[float] = []
    total: list[float] = []
    body = json.dumps({"model": "demo", "prompt": "hello", "stream": True}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        stop = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    first = await r.content.readany()
                    t1 = time.perf_counter()
                    rest = await r.read()
                    t2 = time.perf_counter()
                    n = (first + rest).count(b"data: ")
                    if r.status != 200 or n != events + 1:
                        raise RuntimeError(f"{url}: status {r.status}, {n} events (want {events + 1})")
                ttfb.append((t1 - t) * 1e3)
                total.append((t2 - t) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return len(total), wall, ttfb, total


def measure(proc: Proc, conc: int, duration: float, events: int) -> Run:
    sid = session_pid(proc)
    c0 = cpu_s(sid)
    n, wall, ttfb, total = asyncio.run(load(proc.url + "/v1/completions", conc, duration, events))
    return Run(n / wall, ttfb, total, (cpu_s(sid) - c0) / n * 1e6)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(ap)
    ap.add_argument("--events", type=int, default=200, help="data: events per answer (plus [DONE])")
    ap.add_argument("--gap-ms", type=float, default=1.0, help="gap between events in the paced mode")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--modes", nargs="*", default=["burst", "paced"], choices=["burst", "paced"])
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    cells: dict[tuple[str, str, int], Cell] = {}
    for mode in args.modes:
        gap = args.gap_ms / 1e3 if mode == "paced" else 0.0
        procs: list[Proc] = []
        try:
            up = start_upstream(ctx, args.events, gap)
            procs.append(up)
            port = int(up.url.rsplit(":", 1)[1])
            paths = [start_bare(ctx, up.url)]
            paths.append(start_kvgate("kvgate", kvgate_config(port, up.url, False)))
            procs += paths
            for p in paths:  # warm-up
                asyncio.run(load(p.url + "/v1/completions", 4, 1.0, args.events))
            for r in range(args.rounds):
                for conc in args.concurrency:
                    for p in paths if r % 2 == 0 else reversed(paths):
                        cell = cells.setdefault((mode, p.name, conc), Cell())
                        cell.runs.append(measure(p, conc, args.duration, args.events))
        finally:
            for p in reversed(procs):
                p.stop()
    print(report(cells, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"|".join(map(str, k)): [r.__dict__ for r in c.runs] for k, c in cells.items()})
        )
    return 0


def report(cells: dict[tuple[str, str, int], Cell], args: argparse.Namespace) -> str:
    lines = [
        f"{args.events} events per answer; paced gap {args.gap_ms:g} ms; {args.rounds} rounds x {args.duration:g}s, "
        f"alternating; medians over rounds (latency percentiles over all requests of a cell); "
        f"load average at end {os.getloadavg()[0]:.2f}",
        "",
        "| mode | c | path | req/s | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms | cpu µs/req "
        "| req/s vs bare | cpu vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, name, conc), cell in cells.items():
        rps = statistics.median(r.rps for r in cell.runs)
        cpu = statistics.median(r.cpu_us for r in cell.runs)
        ttfb = [x for r in cell.runs for x in r.ttfb_ms]
        total = [x for r in cell.runs for x in r.total_ms]
        base = cells[(mode, "bare", conc)].runs
        bare_rps = statistics.median(r.rps for r in base)
        bare_cpu = statistics.median(r.cpu_us for r in base)
        lines.append(
            f"| {mode} | {conc} | {name} | {rps:.0f} | {pct(ttfb, 0.5):.3f} | {pct(ttfb, 0.99):.3f} "
            f"| {pct(total, 0.5):.2f} | {pct(total, 0.99):.2f} | {cpu:.0f} | {rps / bare_rps:.2f} "
            f"| {cpu / bare_cpu:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
