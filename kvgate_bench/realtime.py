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
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from kvgate.serving import run_async
from kvgate_bench.modes import FleetSpec, Mode, gateway_config, local_routing_supported, tokenize_on_miss_supported
from kvgate_bench.results import STATUS_OK, ModeRun, RequestResult
from kvgate_bench.workloads import Request, Workload

if TYPE_CHECKING:
    from kvgate_bench.realfleet import ExternalFleet

log = logging.getLogger("kvgate_bench")

INSTANCE_HEADER = "x-kvgate-sim-instance"
ENDPOINT_HEADER = "x-kvgate-endpoint"  # set by the gateway: the endpoint id (= instance id) that served the request
_METRIC_RE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf|-Inf)\s*$")
_HIT_METRICS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_hits_total",
)

ProgressFn = Callable[[int], None]


@dataclass(slots=True)
class RealtimeOptions:
    """Knobs of the HTTP driver."""

    concurrency: int = 64  # requests in flight at most (client side)
    request_timeout_s: float = 120.0  # per request, whole stream
    peer_ready_timeout_s: float = 60.0
    gateway_process: bool = True  # kvgate in its own process (like the peer); False = in this event loop


# --------------------------------------------------------------------------------------------------
# engine metrics
# --------------------------------------------------------------------------------------------------


def parse_hit_counters(text: str) -> dict[str, float]:
    """The three prefix-cache counters from a vLLM ``/metrics`` page (summed over label sets)."""
    out = dict.fromkeys(_HIT_METRICS, 0.0)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _METRIC_RE.match(line)
        if m and m.group(1) in out:
            with contextlib.suppress(ValueError):
                out[m.group(1)] += float(m.group(2))
    return out


async def scrape_counters(session: aiohttp.ClientSession, urls: Sequence[str]) -> dict[str, float]:
    """Sum of :func:`parse_hit_counters` over the engines at ``urls``."""
    total = dict.fromkeys(_HIT_METRICS, 0.0)
    for url in urls:
        async with session.get(url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
        for k, v in parse_hit_counters(text).items():
            total[k] += v
    return total


def hit_rate_from(before: dict[str, float], after: dict[str, float]) -> float:
    """Engine-counter hit rate between two scrapes (0.0 without queries)."""
    q = after[_HIT_METRICS[0]] - before[_HIT_METRICS[0]]
    hits = (after[_HIT_METRICS[1]] - before[_HIT_METRICS[1]]) + (after[_HIT_METRICS[2]] - before[_HIT_METRICS[2]])
    return hits / q if q > 0 else 0.0


async def scrape_gateway_routing(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """``kvgate_kvcache_routing_lookups_total`` by outcome (empty when the filter is absent)."""
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with session.get(admin_url.rstrip("/") + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("kvgate_kvcache_routing_lookups_total{"):
                m = re.match(r'.*outcome="([^"]+)".*\}\s+([0-9.eE+-]+)', line)
                if m:
                    out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# --------------------------------------------------------------------------------------------------
# one request
# --------------------------------------------------------------------------------------------------


def _has_text(obj: dict[str, Any]) -> bool:
    for ch in obj.get("choices") or ():
        delta = ch.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else ch.get("text")
        if isinstance(text, str) and text:
            return True
    return False


class Driver:
    """Sends workload requests to one base URL and records :class:`RequestResult` rows."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        mode: str,
        model: str,
        opts: RealtimeOptions,
        t0: float,
        progress: ProgressFn | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.mode = mode
        self.model = model
        self.opts = opts
        self.t0 = t0
        self.sem = asyncio.Semaphore(max(1, opts.concurrency))
        self.results: list[RequestResult] = []
        self._progress = progress

    async def send(self, req: Request) -> RequestResult:
        """Send one streaming request (waits for a concurrency slot); records and returns its result."""
        async with self.sem:
            res = await self._send(req)
        self.results.append(res)
        if self._progress is not None:
            self._progress(1)
        return res

    async def _send(self, req: Request) -> RequestResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        ttft: float | None = None
        instance: str | None = None
        prompt_tokens = req.num_prompt_tokens
        cached = 0
        out_tokens = 0
        status = STATUS_OK
        error: str | None = None
        try:
            async with asyncio.timeout(self.opts.request_timeout_s):
                async with self.session.post(
                    self.base_url + req.path(), json=req.body(self.model, stream=True), headers=req.headers
                ) as resp:
                    instance = resp.headers.get(INSTANCE_HEADER) or resp.headers.get(ENDPOINT_HEADER)
                    if resp.status != 200:
                        body = (await resp.read())[:200].decode("utf-8", "replace")
                        status, error = f"http_{resp.status}", f"http_{resp.status}: {body}"
                    else:
                        async for raw in resp.content:
                            if not raw.startswith(b"data:"):
                                continue
                            payload = raw[5:].strip()
                            if payload == b"[DONE]":
                                break
                            if ttft is None or b'"usage"' in payload:
                                obj = json.loads(payload)
                                if ttft is None and _has_text(obj):
                                    ttft = loop.time() - start
                                usage = obj.get("usage")
                                if isinstance(usage, dict):
                                    prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                                    out_tokens = int(usage.get("completion_tokens") or 0)
                                    details = usage.get("prompt_tokens_details") or {}
                                    cached = int(details.get("cached_tokens") or 0)
        except TimeoutError:
            status, error = "timeout", f"timeout: no completion within {self.opts.request_timeout_s:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            status, error = "error", f"{type(exc).__name__}: {str(exc)[:160]}"
        e2e = loop.time() - start
        if status == STATUS_OK and ttft is None:
            status, error = "error", "no_content: stream ended without generated text"
        return RequestResult(
            req_id=req.req_id,
            mode=self.mode,
            instance=instance,
            status=status,
            ttft_s=ttft if status == STATUS_OK else None,
            e2e_s=e2e if status == STATUS_OK else None,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            error=error,
            output_tokens=out_tokens,
            start_s=start - self.t0,
            phase=req.phase,
        )


# --------------------------------------------------------------------------------------------------
# pacing
# --------------------------------------------------------------------------------------------------


async def _sleep_until(loop: asyncio.AbstractEventLoop, t: float) -> None:
    delay = t - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def drive(workload: Workload, driver: Driver) -> None:
    """Send every request of ``workload`` following its pacing rules (open loop, sessions or phases)."""
    loop = asyncio.get_running_loop()
    t0 = driver.t0
    cl = workload.closed_loop
    if cl is None:

        async def at(req: Request) -> None:
            await _sleep_until(loop, t0 + req.arrival_s)
            await driver.send(req)

        await asyncio.gather(*(at(r) for r in workload.requests))
        return
    if cl.kind == "sessions":
        sessions: dict[str, list[Request]] = defaultdict(list)
        for r in workload.requests:
            sessions[r.session_id or r.req_id].append(r)
        gap = cl.per_user_gap_s or 0.0

        async def run_session(reqs: list[Request]) -> None:
            reqs.sort(key=lambda q: q.round_idx)
            send_at = t0 + reqs[0].arrival_s
            for r in reqs:
                await _sleep_until(loop, send_at)
                sent = loop.time()
                await driver.send(r)
                send_at = max(sent + gap, loop.time())

        await asyncio.gather(*(run_session(v) for v in sessions.values()))
        return
    if cl.kind == "phased":
        phases = list(cl.phases) or sorted({r.phase for r in workload.requests})
        for phase in phases:
            reqs = [r for r in workload.requests if r.phase == phase]
            pending = iter(reqs)  # shared: each request once, in list order

            async def worker(pending: Any = pending) -> None:
                for r in pending:
                    await driver.send(r)

            await asyncio.gather(*(worker() for _ in range(max(1, cl.max_inflight or 1))))
            if phase == "warmup" and cl.sleep_after_warmup_s > 0:
                await asyncio.sleep(cl.sleep_after_warmup_s)
        return
    raise ValueError(f"unknown closed-loop kind {cl.kind!r}")


# --------------------------------------------------------------------------------------------------
# one mode
# --------------------------------------------------------------------------------------------------


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
