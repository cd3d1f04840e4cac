"""SIMULATOR: the real-time driver of one simulated engine (:class:`SimEngine`), served by ``engine_server``.

One asyncio task steps :class:`~kvgate_sim.engine_model.EngineCore` and sleeps each step's modelled duration
(``time_scale`` applied), then delivers the step's tokens and finishes to per-request queues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

from kvgate.tasks import cancel_and_wait
from kvgate_sim.engine_model import EngineConfig, EngineCore, RequestRecord
from kvgate_sim.kv_publisher import KVEventPublisher, KVEventsConfig
from kvgate_sim.protocol import OpSink


class SimEngine:
    """Real-time driver: one asyncio task steps the model and delivers tokens to per-request queues."""

    def __init__(
        self, config: EngineConfig, *, sink: OpSink | None = None, kv_events: KVEventsConfig | None = None
    ) -> None:
        """``kv_events`` (vLLM's ``--kv-events-config``): publish KV-cache events on ZMQ; needs a running loop."""
        self.publisher: KVEventPublisher | None = None
        if kv_events is not None and kv_events.active:
            self.publisher = KVEventPublisher(kv_events)
            self.publisher.start()
            config = dataclasses.replace(config, kv_events=True)
        self.config = config
        self._t0 = time.monotonic()
        event_sink = self.publisher.publish if self.publisher is not None else None
        # also the LMCache WorkerControl
        self.core = EngineCore(config, sink=sink, clock=self.clock, kv_event_sink=event_sink)
        self._queues: dict[str, asyncio.Queue[tuple[str, RequestRecord | None]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def submit(
        self, req_id: str, prompt_ids: Sequence[int], max_tokens: int
    ) -> tuple[RequestRecord, asyncio.Queue[tuple[str, RequestRecord | None]]]:
        """Queue a request; raises ValueError when it cannot fit. Items: ("token"|"finished"|"aborted", rec)."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        rec = self.core.submit(req_id, prompt_ids, max_tokens)
        q: asyncio.Queue[tuple[str, RequestRecord | None]] = asyncio.Queue()
        self._queues[req_id] = q
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-engine:{self.instance_id}")
        assert self._wake is not None
        self._wake.set()
        return rec, q

    def abort(self, req_id: str) -> bool:
        q = self._queues.pop(req_id, None)
        if q is not None:
            q.put_nowait(("aborted", None))
        return self.core.abort(req_id)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        core = self.core
        try:
            await self._loop(wake, core)
        except Exception:
            for rid in list(self._queues):  # never leave clients hanging if the model breaks
                self.abort(rid)
            raise

    async def _loop(self, wake: asyncio.Event, core: EngineCore) -> None:
        while True:
            wake.clear()
            res = core.step(collect_tokens=True)
            if res is None:
                await wake.wait()
                continue
            delay = res.end - self.clock()
            await asyncio.sleep(delay if delay > 0 else 0)
            queues = self._queues
            for rid in res.emitted:
                q = queues.get(rid)
                if q is not None:
                    q.put_nowait(("token", None))
            for ev in res.events:
                if ev.kind == "finished":
                    q = queues.pop(ev.req_id, None)
                    if q is not None:
                        q.put_nowait(("finished", ev.record))

    async def aclose(self) -> None:
        self._closed = True
        for rid in list(self._queues):
            self.abort(rid)
        await cancel_and_wait([self._task])
        self._task = None
        if self.publisher is not None:
            await self.publisher.aclose()
