"""Timeouts for many concurrent waits of one length on one lazily re-armed timer.

``asyncio.timeout(delay)`` creates, reschedules and cancels a timer handle per wait: ~5 µs on uvloop, as much as
the rest of the proxy filter's work for a request (benchmarks/overhead.py). The proxy bounds every upstream
header wait and every idle gap of a response body with one of a few fixed lengths, so waits of one length
expire in the order they started: a FIFO (an insertion-ordered dict) holds them, and one ``call_at`` handle is
armed for the oldest. A wait that ends leaves the FIFO (a dict delete); the timer is not touched. When it fires
it expires the waits that are due (their tasks are cancelled, as ``asyncio.timeout`` does) and re-arms for the
next oldest, so it fires about once per ``delay`` under steady traffic instead of being created per wait.

Semantics are ``asyncio.timeout``'s: the task is cancelled at the deadline and the ``CancelledError`` leaving the
``with`` block becomes ``TimeoutError``; a cancellation that did not come from the deadline passes through.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

_RESOLUTION = 0.001  # a deadline this close is due (uvloop's timers have millisecond resolution)


class _Wait:
    __slots__ = ("_cancelling", "deadline", "expired", "owner", "task")

    def __init__(self, owner: Deadlines, task: asyncio.Task[object], deadline: float):
        self.owner = owner
        self.task = task
        self.deadline = deadline
        self.expired = False
        self._cancelling = task.cancelling()

    def __enter__(self) -> _Wait:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.owner._waits.pop(self, None)
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class Deadlines:
    """``with deadlines.wait():`` bounds the block to ``delay`` seconds (the current task is cancelled at the
    deadline and ``TimeoutError`` raised); one instance per wait length and event loop."""

    def __init__(self, delay: float):
        if delay <= 0:
            raise ValueError("delay must be > 0")
        self.delay = delay
        self._waits: dict[_Wait, None] = {}  # oldest first: all waits have the same length
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waits)

    def wait(self) -> _Wait:
        """A context manager bounding the current task's block to ``delay`` seconds from now."""
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # first use, or another loop (the bound one closed): bind the running one
            loop = self._bind()
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("Deadlines.wait() must be used inside a task")
        assert loop is not None
        w = _Wait(self, task, loop.time() + self.delay)
        self._waits[w] = None
        if self._timer is None:
            self._timer = loop.call_at(w.deadline, self._fire)
        return w

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waits.clear()  # waits of a closed loop: their tasks are gone
        self._loop = loop
        return loop

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + _RESOLUTION
        waits = self._waits
        while waits:
            w = next(iter(waits))
            if w.deadline > now:
                self._timer = loop.call_at(w.deadline, self._fire)
                return
            del waits[w]
            if not w.task.done():
                w.expired = True
                w.task.cancel()

    def close(self) -> None:
        """Drop the timer (the waits still open are no longer bounded)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waits.clear()
