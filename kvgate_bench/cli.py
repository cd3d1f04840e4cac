"""``kvgate bench``: compare routing modes on realistic workloads (TEST AND BENCHMARK TOOL).

Real time (default): every mode gets a fresh simulated fleet over HTTP (:mod:`kvgate_bench.realtime`).
``--virtual``: the same engine model and routing code in virtual time (:mod:`kvgate_bench.virtual`).
``--fleet real`` / ``--fleet-state PATH``: real time on the real vLLM-CPU + LMCache fleet, started once (or already
running) with its caches reset between modes (:mod:`kvgate_bench.realfleet`).
Prints one table per workload and writes ``report.md``, ``results.json`` and PNG plots.
The options are :mod:`kvgate_bench.cli_args`; the workloads they select are built by :mod:`kvgate_bench.cli_workloads`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
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

from kvgate_bench.cli_args import WORKLOAD_CHOICES, build_parser
from kvgate_bench.cli_workloads import build_virtual_requests, build_workload
from kvgate_bench.modes import FleetSpec, Mode, kvcache_overrides, resolve_modes


def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=240)


def _select_modes(args: argparse.Namespace, console: Console) -> tuple[list[Mode], list[str]]:
    modes = resolve_modes(args.modes.split(","))
    skipped: list[str] = []
    out: list[Mode] = []
    for m in modes:
        if m.kind == "peer" and not args.peers:
            skipped.append(f"{m.name}: skipped (--no-peers)")
            continue
        if m.kind == "peer" and args.virtual:
            skipped.append(f"{m.name}: skipped — external peers run in real time only (drop --virtual)")
            continue
        if m.kind == "peer":
            from kvgate_bench.modes import peer_available

            ok, why = peer_available(m)
            if not ok:
                skipped.append(why)
                continue
        out.append(m)
    for s in skipped:
        console.print(f"[yellow]{s}[/]")
    return out, skipped


def run_one(name: str, args: argparse.Namespace, modes: list[Mode], out_dir: Path, console: Console,
            skipped: list[str], spec: FleetSpec, fleet: Any = None) -> dict[str, Path]:  # fmt: skip
    """Run every mode on workload ``name``; print the table; write the report into ``out_dir``."""
    from kvgate_bench.oracle import oracle_hit_rate
    from kvgate_bench.report import print_phases, print_summary, write_report
    from kvgate_bench.results import median_summary, phase_summaries, summarize

    params = dict(args.param)
    t_start = time.perf_counter()
    fleet_meta: dict[str, Any] = spec.describe()
    oracle_block = 16
    oracle_note: str | None = None
    if args.virtual:
        from kvgate_bench.virtual import run_virtual
        from kvgate_bench.virtual_requests import oracle_from_prepared

        vreqs, closed = build_virtual_requests(name, params, args.requests, args.seed)
        prep_s = time.perf_counter() - t_start
        oracle = oracle_from_prepared(vreqs)
        n_req = len(vreqs)
        total_tokens = sum(v.num_tokens for v in vreqs)
        console.print(f"[bold]{name}[/]: {n_req} requests, {total_tokens} prompt tokens, hashed in {prep_s:.1f}s "
                      f"(virtual time, {spec.engines} engines)")  # fmt: skip
        runs = []
        for rep in range(args.repeat):
            for m in modes:
                t = time.perf_counter()
                runs.append(run_virtual(m, vreqs, spec, closed))
                label = f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
                console.print(f"  {m.name:<24} {time.perf_counter() - t:6.1f}s wall{label}")
        stats: dict[str, Any] = {"requests": n_req, "prompt_tokens": total_tokens, "hash_prep_s": prep_s}
        wl_params: dict[str, Any] = params
        phase_of = {v.req_id: v.phase for v in vreqs}
    else:
        from kvgate_bench.realtime import run_modes_sync
        from kvgate_bench.realtime_driver import RealtimeOptions

        wl = build_workload(name, params, args.requests, args.seed)
        if fleet is not None:
            from kvgate.serving import run_async
            from kvgate_bench.realfleet import prepare_workload

            wl, fleet_meta = run_async(prepare_workload(fleet, wl))
            oracle_block = int(fleet_meta.get("block_size") or 16)
            oracle_note = (f"oracle from the engine's own /tokenize ids at its block size {oracle_block} "
                           f"(by block size: "
                           + ", ".join(f"{bs}: {v:.1%}" for bs, v in fleet_meta["oracle_by_block_size"].items())
                           + ")")  # fmt: skip
            oracle = fleet_meta["oracle_by_block_size"][oracle_block]
        else:
            oracle = oracle_hit_rate(wl.requests)
        stats = wl.stats()
        wl_params = wl.params
        phase_of = {r.req_id: r.phase for r in wl.requests}
        where = (f"{fleet.label} fleet {','.join(fleet.instance_ids)}, caches reset per mode" if fleet is not None
                 else f"{spec.engines} engines, fresh fleet per mode")  # fmt: skip
        console.print(
            f"[bold]{name}[/]: {len(wl.requests)} requests, {wl.total_prompt_tokens} prompt tokens, "
            f"nominal span {wl.duration_s:.1f}s (real time, {where})"
        )
        if oracle_note:
            console.print(f"  {oracle_note}")
        opts = RealtimeOptions(concurrency=args.concurrency, request_timeout_s=args.timeout,
                               gateway_process=not args.gateway_in_process)  # fmt: skip
        runs = []
        for rep in range(args.repeat):
            if args.repeat > 1:
                console.print(f"run {rep + 1}/{args.repeat}")
            runs += run_modes_sync(modes, wl, spec, opts, show_progress=not args.no_progress, fleet=fleet)
    total_s = time.perf_counter() - t_start
    for r in runs:  # the virtual runner leaves phases empty
        for x in r.results:
            x.phase = x.phase or phase_of.get(x.req_id, "")
    per_run = [summarize(r.mode, r.results, hit_rate=r.hit_rate, oracle=oracle, wall_s=r.wall_s,
                         instances=r.instances) for r in runs]  # fmt: skip
    order = list(dict.fromkeys(s.mode for s in per_run))
    summaries = [median_summary([s for s in per_run if s.mode == name]) for name in order]
    if fleet is not None:
        title = (f"kvgate bench — {name} (real time, {fleet.label} fleet: {len(fleet.engines)} × vLLM-CPU + LMCache, "
                 f"model {fleet.model})")  # fmt: skip
    else:
        title = f"kvgate bench — {name} ({'virtual' if args.virtual else 'real'} time, {spec.engines} engines)"
    if args.repeat > 1:
        title += f" — medians of {args.repeat} runs per mode"
    print_summary(summaries, console=console, title=title)
    print_phases(phase_summaries([x for r in runs for x in r.results], runs[0].instances if runs else None),
                 console=console, title=f"{name} by workload phase (hit rate = cached / prompt tokens)")  # fmt: skip
    meta: dict[str, Any] = {
        "title": title,
        "workload": name,
        "workload_params": wl_params,
        "workload_stats": stats,
        "runner": "virtual" if args.virtual else "realtime",
        "fleet": fleet_meta,
        "modes": {
            m.name: {
                "description": m.description,
                "kvcache": kvcache_overrides(m),
                "lb_policy": m.lb_policy,
                "peer_policy": m.peer_policy,
            }
            for m in modes
        },
        "skipped": skipped,
        "mode_info": {r.mode: r.info for r in runs},  # the last run's
        "repeat": args.repeat,
        "runs": [s.to_dict() for s in per_run] if args.repeat > 1 else [],
        "oracle_block_size": oracle_block,
        "oracle_note": oracle_note,
        "total_wall_s": total_s,
        "command": "kvgate bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    paths = write_report(out_dir, summaries, [x for r in runs for x in r.results], meta)
    for r in runs:
        routing = r.info.get("routing_lookups")
        if routing:
            shown = ", ".join(f"{k}={int(v)}" for k, v in routing.items() if v)
            console.print(f"  {r.mode}: kvcache routing lookups: {shown}")
    console.print(f"total {total_s:.1f}s. Report: {paths['report_md']}")
    for key in ("results_json", "ttft_cdf", "instance_traffic", "hit_rate"):
        console.print(f"  {key}: {paths[key]}")
    return paths


def main(argv: Sequence[str] | None = None, prog: str = "kvgate bench") -> int:
    """Entry point of ``kvgate bench``; returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv) if argv is not None else None)
    console = _console()
    try:
        modes, skipped = _select_modes(args, console)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if not modes:
        console.print("[red]no mode to run[/]")
        return 2
    real = args.fleet == "real" or args.fleet_state is not None
    if real and args.virtual:
        parser.error("--fleet real / --fleet-state run in real time only (drop --virtual)")
    if args.engines is None:
        args.engines = 2 if real else 4
    if args.engines < 1:
        parser.error("--engines must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    spec = FleetSpec(
        engines=args.engines, profile=args.profile, time_scale=args.time_scale, num_gpu_blocks=args.gpu_blocks,
        lmcache_capacity_chunks=args.lmcache_chunks, lmcache_enabled=not args.no_lmcache,
        max_num_seqs=args.max_num_seqs, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out or Path("bench-results") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    names = list(WORKLOAD_CHOICES) if args.workload == "all" else [args.workload]
    with contextlib.ExitStack() as stack:
        try:
            fleet = open_fleet(args, stack, console) if real else None
            for name in names:
                run_one(name, args, modes, out / name if len(names) > 1 else out, console, skipped, spec, fleet)
        except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
            console.print(f"[red]kvgate bench: {exc}[/]")
            return 2
        except RuntimeError as exc:  # FleetError / ExternalFleetError
            console.print(f"[red]kvgate bench: fleet: {exc}[/]")
            return 1
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]")
            return 130
    return 0


def open_fleet(args: argparse.Namespace, stack: contextlib.ExitStack, console: Console) -> Any:
    """The external fleet of ``--fleet real`` (started here, stopped by ``stack``) or ``--fleet-state`` (attached)."""
    from kvgate_bench.realfleet import ExternalFleet

    if args.fleet_state is not None:
        fleet = ExternalFleet.from_state(args.fleet_state, label="real")
        console.print(f"attached to the running real fleet {fleet.info.get('run_id')} ({args.fleet_state})")
        return fleet
    from kvgate_real.fleet import RealFleet

    t0 = time.perf_counter()
    real = RealFleet()
    stack.callback(real.stop)  # stops a half-started fleet too; start() also stops it on failure
    real.start(args.engines)
    console.print(f"real fleet {real.run_id} up in {time.perf_counter() - t0:.0f}s: "
                  f"{', '.join(e.instance_id for e in real.engines)}, controller {real.controller_url}")  # fmt: skip
    return ExternalFleet.from_state(real.state(), label="real")


if __name__ == "__main__":
    sys.exit(main())
