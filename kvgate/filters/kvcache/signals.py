"""Load signals used by the strategy (they describe *this gateway process*, as in Pixiu — not the engines).

* CPU ratio = Δ``time.process_time()`` / (Δwall × ``os.cpu_count()``), clamped to [0, 1]. The first
  sample (or a non-positive wall delta) gives 0, like Pixiu.
* Memory ratio = resident set size / a limit: the cgroup memory limit when one is set (v2
  ``memory.max`` or v1 ``memory.limit_in_bytes``), else total physical RAM. RSS comes from
  ``/proc/self/statm`` (fallback: peak RSS from ``resource.getrusage``).

Pixiu used Go's heap ``Alloc / Sys``; this is the closest honest Python analogue. Anything with a
``sample() -> LoadSnapshot`` method can replace it (e.g. an engine-side KV-usage provider; tests
inject fixed values).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_UNLIMITED = 1 << 60


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    cpu_usage: float
    memory_usage: float


class LoadSignals(Protocol):
    def sample(self) -> LoadSnapshot: ...


class StaticSignals:
    """Fixed values (tests, or to disable load-based actions)."""

    def __init__(self, cpu_usage: float = 0.0, memory_usage: float = 0.0):
        self.cpu_usage = cpu_usage
        self.memory_usage = memory_usage

    def sample(self) -> LoadSnapshot:
        return LoadSnapshot(self.cpu_usage, self.memory_usage)


def _clamp(x: float) -> float:
    return 0.0 if x != x or x < 0 else min(1.0, x)


def read_rss_bytes() -> int:
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB (peak)


def memory_limit_bytes() -> int:
    """The cgroup limit if set, else total RAM (0 if unknown)."""
    for path in _CGROUP_LIMIT_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text and text != "max" and text.isdigit() and 0 < int(text) < _UNLIMITED:
            return int(text)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


class ProcessSignals:
    """Load of the current process (see module docstring)."""

    def __init__(
        self,
        *,
        process_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
        cpu_count: int | None = None,
        rss: Callable[[], int] = read_rss_bytes,
        memory_limit: int | None = None,
    ):
        self._proc = process_clock
        self._wall = wall_clock
        self._cpus = max(1, cpu_count or os.cpu_count() or 1)
        self._rss = rss
        self._limit = memory_limit if memory_limit is not None else memory_limit_bytes()
        self._last: tuple[float, float] | None = None

    def cpu_usage(self) -> float:
        now = (self._proc(), self._wall())
        last, self._last = self._last, now
        if last is None:
            return 0.0
        wall = now[1] - last[1]
        cpu = now[0] - last[0]
        if wall <= 0 or cpu <= 0:
            return 0.0
        return _clamp(cpu / (wall * self._cpus))

    def memory_usage(self) -> float:
        if self._limit <= 0:
            return 0.0
        return _clamp(self._rss() / self._limit)

    def sample(self) -> LoadSnapshot:
        return LoadSnapshot(self.cpu_usage(), self.memory_usage())
