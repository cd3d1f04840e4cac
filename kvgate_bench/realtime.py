"""Real-time benchmark runner over HTTP (TEST AND BENCHMARK TOOL, not product code).

For each mode: a FRESH simulated fleet (same seed, same engine config) + our controller, then the kvgate
gateway configured for the mode (in-process, loopback, ephemeral ports) or the external peer router, then
the workload is driven with streaming requests (aiohttp):

* open loop: each request is sent at ``arrival_s`` (trace timestamps / Poisson arrivals);
* ``ClosedLoop(kind="sessions")``: round r+1 of a session goes out at
  ``max(send of round r + per_user_gap_s, finish of round r)``;
* ``ClosedLoop(kind="phased")``: phases one after another (``sleep_after_warmup_s`` after "warmup"), at most
  ``max_inflight`` requests in flight within a phase, in list order.

A global semaphore (``concurrency``) bounds requests in flight so a 2-core box is not swamped; a request
held back by it is timed from its actual send. Per request: TTFT (first SSE data chunk carrying generated
text), E2E, the serving instance (``x-kvgate-sim-instance`` response header of a simulated engine, else the
gateway's ``x-kvgate-endpoint``), status, cached tokens (stream usage). The mode's hit rate comes from the
engines' own counters, scraped from ``/metrics`` before and after:
``(Δ vllm:prefix_cache_hits_total + Δ vllm:external_prefix_cache_hits_total) / Δ vllm:prefix_cache_queries_total``.
The client is :mod:`kvgate_bench.realtime_driver`, the counters :mod:`kvgate_bench.realtime_metrics`.
Everything started is stopped in ``finally`` blocks (gateway, peer process group, fleet). Prompt text is never
logged.

External fleet (``fleet=`` an :class:`kvgate_bench.realfleet.ExternalFleet`, e.g. the real vLLM-CPU + LMCache
fleet): no fleet is started; before each mode the fleet's caches are reset (vLLM prefix cache, LMCache CPU tier)
and the runner waits until the controller's ``/lookup`` finds none of the workload's prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from kvgate.serving import run_async
from kvgate_bench.modes import FleetSpec, Mode, gateway_config, local_routing_supported, tokenize_on_miss_supported
from kvgate_bench.realtime_driver import Driver, ProgressFn, RealtimeOptions, drive
from kvgate_bench.realtime_metrics import hit_rate_from, scrape_counters, scrape_gateway_routing
from kvgate_bench.results import ModeRun
from kvgate_bench.workloads import Workload

if TYPE_CHECKING:
    from kvgate_bench.realfleet import ExternalFleet

log = logging.getLogger("kvgate_bench")


async def run_mode(
    mode: Mode,
    workload: Workload,
    spec: FleetSpec,
    opts: RealtimeOptions | None = None,
    progress: ProgressFn | None = None,
    *,
    fleet: ExternalFleet | None = None,
) -> ModeRun:
    """Run ``workload`` once through ``mode`` on a fresh simulated fleet, or on the external ``fleet`` after
    resetting its caches; everything started here is stopped on return (an external fleet keeps running)."""
    from kvgate.app import start_gateway
    from kvgate.config import parse_config
    from kvgate_bench.peers import start_gateway_process, start_peer
    from kvgate_sim.fleet import default_kv_events, start_fleet

    opts = opts or RealtimeOptions()
    info: dict[str, Any] = {"runner": "realtime"}
    external = fleet is not None
    model = fleet.model if fleet is not None else spec.model
    if fleet is None:
        kv_events = default_kv_events() if mode.local else None  # engines connect to the gateway's bound SUB
        fleet_any: Any = await start_fleet(
            spec.engines, engine_config=spec.base_engine_config(), seed=spec.seed, kv_events=kv_events
        )
    else:
        from kvgate_bench.realfleet import probe_ids

        info["fleet"] = fleet.label
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            info["reset"] = await fleet.reset(session, probe_ids(workload))
        fleet_any = fleet
    gateway: Any = None
    peer: Any = None
    try:
        urls = [e.url for e in fleet_any.engines]
        admin_url: str | None = None
        if mode.kind == "gateway":
            cfg = gateway_config(mode, fleet_any)
            if opts.gateway_process:
                peer = await start_gateway_process(cfg)
                base, admin_url = peer.url, peer.admin_url
            else:
                gateway = await start_gateway(parse_config(cfg), port=0, admin_port=0)
                base, admin_url = gateway.url, gateway.admin_url
            info["gateway"] = "subprocess" if opts.gateway_process else "in-process"
            if mode.kvcache is not None:
                info["tokenize_on_miss_supported"] = tokenize_on_miss_supported()
            if mode.local:
                info["local_routing_supported"] = local_routing_supported()
        else:
            peer = await start_peer(
                mode.peer or "", mode.peer_policy or "", urls, ready_timeout=opts.peer_ready_timeout_s
            )
            base = peer.url
        connector = aiohttp.TCPConnector(limit=max(1, opts.concurrency) + 8, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            before = await scrape_counters(session, urls)
            loop = asyncio.get_running_loop()
            t0 = loop.time() + 0.05
            driver = Driver(session, base, mode.name, model, opts, t0, progress)
            await drive(workload, driver)
            wall = loop.time() - t0
            await asyncio.sleep(1.0 if external else 0.05)  # let the last LMCache ops / counters settle
            after = await scrape_counters(session, urls)
            if admin_url is not None and mode.kvcache is not None:
                info["routing_lookups"] = await scrape_gateway_routing(session, admin_url)
        info["engine_counters"] = {k: after[k] - before[k] for k in after}
        by_id = {r.req_id: r for r in driver.results}
        results = [by_id[r.req_id] for r in workload.requests if r.req_id in by_id]
        return ModeRun(mode.name, results, hit_rate_from(before, after), wall, list(fleet_any.instance_ids), info)
    finally:
        if gateway is not None:
            with contextlib.suppress(Exception):
                await gateway.stop(2.0)
        if peer is not None:
            await peer.stop()
        if not external:
            await fleet_any.stop()


async def run_modes(
    modes: Sequence[Mode],
    workload: Workload,
    spec: FleetSpec,
    opts: RealtimeOptions | None = None,
    *,
    show_progress: bool = True,
    on_skip: Callable[[str], None] | None = None,
    fleet: ExternalFleet | None = None,
) -> list[ModeRun]:
    """:func:`run_mode` for each mode in turn, with a rich progress bar; unavailable peers are skipped.

    ``fleet``: run every mode on this external fleet (caches reset before each) instead of fresh simulated ones."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvgate_bench.modes import peer_available

    runs: list[ModeRun] = []
    console = Console(stderr=True)
    for mode in modes:
        ok, why = peer_available(mode)
        if not ok:
            (on_skip or (lambda m: console.print(f"[yellow]{m}[/]")))(why)
            continue
        if not show_progress:
            runs.append(await run_mode(mode, workload, spec, opts, fleet=fleet))
            continue
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        ) as progress:  # fmt: skip
            task = progress.add_task(f"{mode.name:<24}", total=len(workload.requests))
            advance = functools.partial(progress.advance, task)
            runs.append(await run_mode(mode, workload, spec, opts, advance, fleet=fleet))
    return runs


def run_modes_sync(
    modes: Sequence[Mode], workload: Workload, spec: FleetSpec, opts: RealtimeOptions | None = None, **kw: Any
) -> list[ModeRun]:
    """Blocking wrapper of :func:`run_modes` (own event loop; uvloop when available)."""
    return run_async(run_modes(modes, workload, spec, opts, **kw))


def now_s() -> float:
    """Wall clock for callers measuring whole runs."""
    return time.perf_counter()
