"""The HTTP client of the real-time benchmark: sends a workload's requests and times them (TEST AND BENCHMARK TOOL).

:class:`Driver` sends one streaming request per workload request (bounded by a global semaphore, so a 2-core
box is not swamped; a request held back is timed from its actual send) and records a
:class:`~kvgate_bench.results.RequestResult`: TTFT (first SSE data chunk carrying generated text), E2E, the
serving instance (``x-kvgate-sim-instance`` of a simulated engine, else the gateway's ``x-kvgate-endpoint``),
status and cached tokens (stream usage). :func:`drive` paces the workload: open loop, sessions or phases.
Prompt text is never logged.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvgate_bench.results import STATUS_OK, RequestResult
from kvgate_bench.workloads import Request, Workload

INSTANCE_HEADER = "x-kvgate-sim-instance"
ENDPOINT_HEADER = "x-kvgate-endpoint"  # set by the gateway: the endpoint id (= instance id) that served the request

ProgressFn = Callable[[int], None]


@dataclass(slots=True)
class RealtimeOptions:
    """Knobs of the HTTP driver."""

    concurrency: int = 64  # requests in flight at most (client side)
    request_timeout_s: float = 120.0  # per request, whole stream
    peer_ready_timeout_s: float = 60.0
    gateway_process: bool = True  # kvgate in its own process (like the peer); False = in this event loop


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
