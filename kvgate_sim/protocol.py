"""Contracts shared by the simulated engines, the simulated controller and the LMCache worker bridge.

Pure: no I/O. The engine model implements :class:`WorkerControl` and reports its LMCache-tier state
changes as :class:`KVOp` batches to an :data:`OpSink`. The controller (ours, or the real LMCache
controller through :mod:`kvgate_sim.lmcache_worker`) consumes those ops and calls back into
:class:`WorkerControl` for pin / compress / clear / move / health.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

LMCACHE_CHUNK_SIZE = 256
DEFAULT_LOCATION = "LocalCPUBackend"
NONE_HASH = 0  # LMCache's NONE_HASH when vLLM is not importable (controller-only install)


def lmcache_chunk_hashes(
    tokens: Sequence[int],
    chunk_size: int = LMCACHE_CHUNK_SIZE,
    *,
    save_unfull_chunk: bool = False,
    none_hash: int = NONE_HASH,
) -> list[int]:
    """LMCache's chained chunk keys: ``h_i = hash((h_{i-1}, tuple(chunk_i), ()))``, ``h_-1 = NONE_HASH``.

    Python's builtin ``hash`` of ints and tuples of ints is not randomised by PYTHONHASHSEED, so
    these keys equal the real controller's (controller-only install, NONE_HASH = 0).
    Workers store only full chunks (``save_unfull_chunk=False``); the controller's lookup also
    hashes a trailing partial chunk (``save_unfull_chunk=True``).
    """
    out: list[int] = []
    prev = none_hash
    n = len(tokens)
    end_full = n - (n % chunk_size)
    limit = n if save_unfull_chunk else end_full
    for start in range(0, limit, chunk_size):
        chunk = tuple(int(t) for t in tokens[start : start + chunk_size])
        prev = hash((prev, chunk, ()))
        out.append(prev)
    return out


@dataclass(frozen=True, slots=True)
class KVOp:
    op_type: Literal["admit", "evict"]
    key: int  # LMCache chunk hash
    seq_num: int = 0


# sink(instance_id, worker_id, location, ops)
OpSink = Callable[[str, int, str, list[KVOp]], object]  # the return value, if any, is ignored


class WorkerControl(Protocol):
    """What a controller may ask of one LMCache worker (one engine instance, worker 0)."""

    instance_id: str
    worker_id: int

    def clear(self, location: str) -> int: ...

    def pin(self, tokens: Sequence[int], location: str) -> int: ...

    def compress(self, tokens: Sequence[int], location: str, method: str) -> int: ...

    def decompress(self, tokens: Sequence[int], location: str, method: str) -> int: ...

    def evict(self, tokens: Sequence[int], location: str | None = None) -> int: ...

    def export_chunks(self, tokens: Sequence[int], location: str) -> list[tuple[int, int]]:
        """(chunk_hash, stored_tokens) of the chunks of ``tokens`` this worker holds, for move/copy."""
        ...

    def import_chunks(self, tokens: Sequence[int], location: str) -> int:
        """Store the full chunks of ``tokens`` (target side of move/copy); returns tokens stored."""
        ...

    def health(self) -> int:
        """0 = healthy; any other value is an error code."""
        ...
