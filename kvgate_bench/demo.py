"""``kvgate demo``: one command, round robin vs kvcache routing on a simulated fleet (TEST AND BENCHMARK TOOL).

Starts, in this process and on loopback only: 4 simulated vLLM engines with an LMCache CPU tier, the
LMCache-compatible controller, and the kvgate gateway — once per mode, each time on a FRESH fleet with the
same seed. It then runs a multi-round QA chat workload (production-stack style: every round carries the
user's whole history) through each mode, prints the comparison table and the report paths, and stops
everything. Engine KV capacity is deliberately small so that scattering a user's rounds costs cache.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The 'bench' extra (which includes 'sim'), imported up front so that a missing one is named before any work starts.
import matplotlib  # noqa: F401
import msgspec  # noqa: F401
import numpy  # noqa: F401
import rich  # noqa: F401
import zmq  # noqa: F401
from rich.console import Console

from kvgate_bench.modes import FleetSpec, kvcache_overrides, resolve_modes

DEMO_MODES = ("round_robin", "kvcache")
DEMO_WORKLOAD: dict[str, Any] = {
    "num_users": 16,
    "num_rounds": 5,
    "system_prompt_len": 1000,
    "history_len": 2000,
    "answer_len": 20,
    "qps": 4.0,
}
# production-stack's README example sizes (1000-token system prompt, 2000-token user context). A user's
# prompt reaches ~3,300 tokens (~206 GPU blocks, ~13 LMCache chunks) by the last round. 16 users over 4 engines
# = 4 users per engine ≈ 830 blocks: the GPU cache below holds about one engine's share, the LMCache CPU tier
# (larger, as in real deployments) a little more. Round robin asks every engine to hold all 16 users.
DEMO_GPU_BLOCKS = 800
DEMO_LMCACHE_CHUNKS = 64


def build_parser(prog: str = "kvgate demo") -> argparse.ArgumentParser:
    """``kvgate demo`` arguments (all optional)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="One-command demo: a simulated 4-engine vLLM + LMCache fleet, its controller and the kvgate "
        "gateway in this process on 127.0.0.1; multi-round QA through round_robin and kvcache routing, each on a "
        "fresh fleet with the same seed. Takes about a minute and a half.",
    )
    p.add_argument("--out", default=None, help="report folder (default bench-results/demo-<timestamp>)")
    p.add_argument("--users", type=int, default=DEMO_WORKLOAD["num_users"], help="chat users (default 16)")
    p.add_argument("--rounds", type=int, default=DEMO_WORKLOAD["num_rounds"], help="rounds per user (default 5)")
    p.add_argument("--qps", type=float, default=DEMO_WORKLOAD["qps"], help="nominal request rate (default 4)")
    p.add_argument("--profile", default="a100", choices=["h100", "a100"], help="engine profile (default a100)")
    p.add_argument("--seed", type=int, default=0, help="workload and fleet seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _explain(console: Console, spec: FleetSpec, wl: Any) -> None:
    d = spec.describe()
    console.print("[bold]kvgate demo[/] — KV-cache-aware routing vs round robin, measured on a simulated fleet\n")
    console.print(
        f"• fleet: {spec.engines} simulated vLLM engines ({spec.profile} timing model: prefill, decode, LMCache "
        f"load), each with a GPU prefix cache of {d['num_gpu_blocks']} blocks ({d['gpu_cache_tokens']} tokens) "
        f"and an LMCache CPU tier of {d['lmcache_capacity_chunks']} chunks ({d['lmcache_capacity_chunks'] * 256} "
        "tokens), plus the LMCache-compatible controller; all on 127.0.0.1, started afresh for each mode."
    )
    p = wl.params
    console.print(
        f"• workload: multi-round QA — {p['num_users']} users × {p['num_rounds']} rounds at ~{p['qps']:g} req/s; "
        f"each round resends the user's whole history ({len(wl.requests)} requests, "
        f"{wl.total_prompt_tokens} prompt tokens). Each engine's cache holds about one engine's share of "
        "the users' histories, so where a round lands decides whether its history is still cached."
    )
    console.print(
        "• round_robin: the gateway cycles over engines, so consecutive rounds of a user land on different "
        "engines.\n• kvcache: the kvcache filter tokenizes each prompt in-process with the engines' own tokenizer, "
        "finds the engine holding the longest cached prefix in its index of the engines' KV-cache events (no round "
        "trip on the request path) and routes there (least-request fallback).\n"
    )


def main(argv: Sequence[str] | None = None, prog: str = "kvgate demo") -> int:
    """Entry point of ``kvgate demo``; returns the exit code."""
    from kvgate_bench.oracle import oracle_hit_rate
    from kvgate_bench.realtime import run_modes_sync
    from kvgate_bench.realtime_driver import RealtimeOptions
    from kvgate_bench.report import print_summary, write_report
    from kvgate_bench.results import summarize
    from kvgate_bench.workloads import get_workload

    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    c = Console()
    console = c if c.is_terminal else Console(width=200)
    wl = get_workload(
        "multi_round_qa",
        **{**DEMO_WORKLOAD, "num_users": args.users, "num_rounds": args.rounds, "qps": args.qps, "seed": args.seed},
    )
    spec = FleetSpec(
        engines=4, profile=args.profile, num_gpu_blocks=DEMO_GPU_BLOCKS, lmcache_capacity_chunks=DEMO_LMCACHE_CHUNKS,
        seed=args.seed,
    )  # fmt: skip
    _explain(console, spec, wl)
    modes = resolve_modes(DEMO_MODES)
    oracle = oracle_hit_rate(wl.requests)
    t0 = time.perf_counter()
    try:
        runs = run_modes_sync(
            modes, wl, spec, RealtimeOptions(concurrency=32, gateway_process=False), show_progress=not args.no_progress
        )
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    summaries = [summarize(r.mode, r.results, hit_rate=r.hit_rate, oracle=oracle, wall_s=r.wall_s,
                           instances=r.instances) for r in runs]  # fmt: skip
    title = "kvgate demo — multi-round QA, 4 simulated engines (real time over HTTP)"
    print_summary(summaries, console=console, title=title)
    by = {s.mode: s for s in summaries}
    rr, kv = by.get("round_robin"), by.get("kvcache")
    if rr and kv and rr.ttft_p50_s and kv.ttft_p50_s and rr.ttft_p95_s and kv.ttft_p95_s:
        console.print(
            f"kvcache vs round_robin: hit rate {kv.hit_rate * 100:.1f}% vs {rr.hit_rate * 100:.1f}% "
            f"(oracle {oracle * 100:.1f}%), TTFT p50 {kv.ttft_p50_s * 1000:.0f} ms vs {rr.ttft_p50_s * 1000:.0f} ms, "
            f"p95 {kv.ttft_p95_s * 1000:.0f} ms vs {rr.ttft_p95_s * 1000:.0f} ms, hotspot {kv.hotspot:.2f} vs "
            f"{rr.hotspot:.2f}."
        )
    out = Path(args.out or Path("bench-results") / ("demo-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")))
    meta = {
        "title": title,
        "workload": "multi_round_qa",
        "workload_params": wl.params,
        "workload_stats": wl.stats(),
        "runner": "realtime",
        "fleet": spec.describe(),
        "modes": {m.name: {"description": m.description, "kvcache": kvcache_overrides(m)} for m in modes},
        "mode_info": {r.mode: r.info for r in runs},
        "command": "kvgate demo " + " ".join(list(argv) if argv is not None else sys.argv[2:]),
        "total_wall_s": time.perf_counter() - t0,
    }
    paths = write_report(out, summaries, [x for r in runs for x in r.results], meta)
    console.print(f"\nReport: {paths['report_md']}")
    for key in ("hit_rate", "ttft_cdf", "instance_traffic", "results_json"):
        console.print(f"  {key}: {paths[key]}")
    console.print(f"done in {time.perf_counter() - t0:.0f}s; fleet, controller and gateway stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
