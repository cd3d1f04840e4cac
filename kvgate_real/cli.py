"""``kvgate real up|down|status`` (also ``python -m kvgate_real`` / ``python -m kvgate_real.fleet``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvgate_real import fleet as fleet_module
from kvgate_real.fleet import RealFleet
from kvgate_real.launch import _say
from kvgate_real.locations import FleetError


# -- CLI -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, prog: str = "kvgate real") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=fleet_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-dir", type=Path, default=None, help="default .cache/real-run (env KVGATE_REAL_RUN_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start controller + engines, wait until ready")
    up.add_argument("-n", "--engines", type=int, default=2)
    up.add_argument("--timeout", type=float, default=600.0, help="startup timeout per phase (s)")
    up.add_argument(
        "--kv-events",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start vLLM with --kv-events-config (engines connect to one gateway port, topic kv.<instance>, a "
        "replay port each) and LMCache with enable_kv_events: true; the written kvgate config routes from the "
        "events. Default: env KVGATE_REAL_KV_EVENTS=1",
    )
    up.add_argument(
        "--lmcache-cpu-gb",
        type=float,
        default=None,
        help="LMCache max_local_cpu_size per engine in GB (a 256-token chunk of the tiny model is 512 KiB). "
        "Default: env KVGATE_REAL_LMCACHE_CPU_GB, else 1.0",
    )
    up.add_argument(
        "--lmcache-api",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start LMCache's internal API server in each engine's worker on a loopback port (its /metrics has the "
        "lmcache:* series; state.json engines[].lmcache_api_url). Default: env KVGATE_REAL_LMCACHE_API=1",
    )
    sub.add_parser("down", help="stop everything recorded in the state file")
    sub.add_parser("status", help="show processes, RSS, health and listeners")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "up":
            fleet = RealFleet(
                args.run_dir,
                startup_timeout=args.timeout,
                kv_events=args.kv_events,
                lmcache_cpu_gb=args.lmcache_cpu_gb,
                lmcache_api=args.lmcache_api,
            )
            fleet.start(args.engines)
            fleet.release()
            print(json.dumps({**fleet.state(), "status": fleet.status()}, indent=2))
            return 0
        fleet = RealFleet.from_state(args.run_dir)
        if args.cmd == "status":
            st = fleet.status()
            print(json.dumps(st, indent=2))
            return 0 if st["all_up"] and not st["non_loopback"] else 1
        fleet.stop()
        _say(f"run {fleet.run_id} stopped; no process left")
        return 0
    except FleetError as exc:
        _say(f"ERROR: {exc}")
        return 1
