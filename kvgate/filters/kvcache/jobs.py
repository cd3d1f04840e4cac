"""The filter's background job pool: bounded, coalescing, never blocking the request path.

``workers`` tasks are fed by a queue of ``queue_size``. A job whose key is already queued or running is
coalesced; a full queue drops the job (counted, logged at most once per interval). Each job runs with its own
deadline (its ``timeout`` counted from its start); one that waited in the queue longer than that is dropped
as ``expired``. Results go to ``background_jobs_total{result}``: done, error, timeout, expired, coalesced, dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvgate.filters.kvcache.errors import KVCacheError
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.extract import Extracted
from kvgate.filters.kvcache.lmcache_client import LookupResult
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.tasks import cancel_and_wait

log = logging.getLogger("kvgate.filters.kvcache")


@dataclass(slots=True)
class Job:
    key: str
    request: Extracted
    lookup: LookupResult | None
    timeout: float
    enqueued: float
    cluster: str = ""  # the route's cluster: its other engines can tokenize when vllm_endpoint fails


class JobPool:
    def __init__(
        self,
        workers: int,
        queue_size: int,
        run: Callable[[Job, float], Awaitable[None]],
        metrics: KVCacheMetrics,
        events: FilterEvents,
    ):
        self.workers = workers
        self.queue_size = queue_size
        self._run = run
        self.metrics = metrics
        self.events = events
        self._queue: asyncio.Queue[Job] | None = None
        self._pending: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.running = 0

    def start(self) -> None:
        """Start the workers (idempotent; needs a running loop)."""
        if self._tasks or self.closed:
            return
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._tasks = [asyncio.create_task(self._worker(), name=f"kvcache-worker-{i}") for i in range(self.workers)]

    async def close(self) -> None:
        """Cancel the workers and drop queued jobs."""
        self.closed = True
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()
        self._pending.clear()
        self.metrics.background_queue_depth.set(0)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def worker_count(self) -> int:
        return len(self._tasks)

    @property
    def pending_keys(self) -> int:
        return len(self._pending)

    def is_pending(self, key: str) -> bool:
        return key in self._pending

    def submit(self, job: Job) -> None:
        """Queue ``job`` unless its key is already pending (coalesced) or the queue is full (dropped)."""
        if self.closed:
            return
        self.start()
        assert self._queue is not None
        m = self.metrics
        if job.key in self._pending:
            m.background_jobs.labels("coalesced").inc()
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            m.background_dropped.inc()
            m.background_jobs.labels("dropped").inc()
            self.events.warn("queue_full", "[kvcache] background queue full (%d): job dropped", self.queue_size)
            return
        self._pending.add(job.key)
        m.background_queue_depth.set(self._queue.qsize())

    async def _worker(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        m = self.metrics
        while True:
            job = await queue.get()
            m.background_queue_depth.set(queue.qsize())
            result = "done"
            try:
                if loop.time() - job.enqueued > job.timeout:
                    result = "expired"
                    log.debug(
                        "[kvcache] background job expired in the queue after %.3fs (key=%s)",
                        loop.time() - job.enqueued,
                        job.key[:12],
                    )
                    continue
                self.running += 1
                m.background_running.set(self.running)
                try:
                    async with asyncio.timeout(job.timeout):
                        await self._run(job, loop.time() + job.timeout)
                except TimeoutError:
                    result = "timeout"
                    log.debug("[kvcache] background job timed out after %.3fs (key=%s)", job.timeout, job.key[:12])
                except KVCacheError:
                    result = "error"  # already logged with its step
                except Exception as exc:
                    result = "error"
                    self.events.warn("job_failed", "[kvcache] background job failed: %s: %s", type(exc).__name__, exc)
                finally:
                    self.running -= 1
                    m.background_running.set(self.running)
            finally:
                self._pending.discard(job.key)
                queue.task_done()
                m.background_jobs.labels(result).inc()
