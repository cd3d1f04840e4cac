"""Simulated LMCache 0.5.6 controller state and command logic (SIMULATOR: test and benchmark tool).

:class:`SimController` holds the :class:`~kvgate_sim.controller_index.ControllerIndex` and the in-process
workers (any :class:`~kvgate_sim.protocol.WorkerControl`) and runs the controller's commands on them
synchronously; :func:`move_tokens` is one worker pair of a ``move`` (also used by the ZMQ worker bridge).
Errors are :class:`ControllerError` with the real controller's messages. No I/O: the HTTP API is
:mod:`kvgate_sim.controller_server`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from kvgate_sim.controller_index import ControllerIndex, LayoutInfo, WorkerInfo
from kvgate_sim.controller_models import QueryInstResponse
from kvgate_sim.protocol import DEFAULT_LOCATION, KVOp, WorkerControl, lmcache_chunk_hashes


class ControllerError(Exception):
    """Becomes ``500 {"detail": str(exc)}``, like the real routes' ``HTTPException(500, str(e))``."""


def _same_across_workers(values: list[int], verb: str) -> int:
    if len(set(values)) != 1:
        raise ControllerError(f"The number of tokens {verb} should be the same across all workers.")
    return values[0]


def move_tokens(
    src: WorkerControl, dst: WorkerControl, tokens: Sequence[int], old_location: str, new_location: str, copy: bool
) -> int:
    """One worker pair of an LMCache ``move``: the prefix of ``tokens`` that ``src`` holds in
    ``old_location`` is stored by ``dst`` in ``new_location`` and, unless ``copy``, evicted from ``src``.
    Returns the moved prefix length (0 = nothing to move), like ``LMCacheEngine.move``."""
    if new_location != DEFAULT_LOCATION:
        raise ValueError("Only support moving to cpu for now.")
    held = {h for h, _n in src.export_chunks(tokens, old_location)}
    n = 0
    for h in lmcache_chunk_hashes(tokens):
        if h not in held:
            break
        n += 1
    num_tokens = n * 256
    if num_tokens == 0:
        return 0
    dst.import_chunks(tokens[:num_tokens], new_location)
    if not copy:
        src.evict(tokens[:num_tokens], old_location)
    return num_tokens


class SimController:
    """Simulated controller state: the index, the in-process workers, and the command logic."""

    def __init__(self) -> None:
        self.index = ControllerIndex()
        self._lock = threading.RLock()
        self._workers: dict[tuple[str, int], WorkerControl] = {}

    # ------------------------------------------------------------------ workers
    def register_worker(
        self, worker: WorkerControl, ip: str = "127.0.0.1", port: int = 0, peer_init_url: str | None = None
    ) -> bool:
        """Attach an in-process worker (what ``RegisterMsg`` does); True if new, False if re-registered
        (its keys are cleared, like the real controller)."""
        with self._lock:
            self._workers[(worker.instance_id, worker.worker_id)] = worker
            return self.index.register(worker.instance_id, worker.worker_id, ip, port, peer_init_url)

    def deregister_worker(self, instance_id: str, worker_id: int) -> bool:
        with self._lock:
            self._workers.pop((instance_id, worker_id), None)
            return self.index.deregister(instance_id, worker_id)

    def op_sink(self, instance_id: str, worker_id: int, location: str, ops: list[KVOp]) -> None:
        """An :data:`~kvgate_sim.protocol.OpSink`: apply a worker's admit/evict batch (dropped if unregistered)."""
        with self._lock:
            self.index.apply_ops(instance_id, worker_id, location, ops)

    def _instance_workers(self, instance_id: str) -> list[tuple[int, WorkerControl]]:
        with self._lock:
            return [(wid, self._workers[(instance_id, wid)]) for wid in self.index.worker_ids(instance_id)]

    # ------------------------------------------------------------------ queries
    def lookup(self, tokens: Sequence[int]) -> LayoutInfo:
        with self._lock:
            return self.index.lookup(tokens)

    def lookup_hashes(self, chunk_hashes: Sequence[int], num_tokens: int) -> LayoutInfo:
        with self._lock:
            return self.index.lookup_hashes(chunk_hashes, num_tokens)

    def query_instance(self, ip: str) -> str:
        with self._lock:
            inst = self.index.instance_by_ip(ip)
        if inst is None:
            try:  # the real route builds QueryInstResponse(res=None) → pydantic's message
                QueryInstResponse(event_id="", res=None)  # type: ignore[arg-type]
            except ValidationError as exc:
                raise ControllerError(str(exc)) from None
        assert inst is not None
        return inst

    def worker_infos(self, instance_id: str, worker_ids: Sequence[int] | None = None) -> list[WorkerInfo]:
        with self._lock:
            return self.index.worker_infos(instance_id, worker_ids)

    # ------------------------------------------------------------------ commands
    def _run(self, instance_id: str, verb: str, op: str, call: Callable[[WorkerControl], int]) -> int:
        results: list[int] = []
        for _wid, worker in self._instance_workers(instance_id):
            try:
                results.append(int(call(worker)))
            except Exception:
                # real: the worker answers ErrorMsg, `.num_tokens` raises AttributeError in the executor
                raise ControllerError(f"Operation '{op}' is not supported.") from None
        return _same_across_workers(results, verb)

    def clear(self, instance_id: str, location: str) -> int:
        return self._run(instance_id, "cleared", "clear", lambda w: w.clear(location))

    def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
        return self._run(instance_id, "pinned", "pin", lambda w: w.pin(tokens, location))

    def compress(self, instance_id: str, method: str, location: str, tokens: Sequence[int] | None) -> int:
        toks = list(tokens or [])
        return self._run(instance_id, "compressed", "compress", lambda w: w.compress(toks, location, method))

    def decompress(self, instance_id: str, method: str, location: str, tokens: Sequence[int] | None) -> int:
        toks = list(tokens or [])
        try:
            return self._run(instance_id, "decompressed", "decompress", lambda w: w.decompress(toks, location, method))
        except ControllerError:
            raise ControllerError("") from None  # the real route's bare `assert isinstance(...)`

    def evict(self, instance_id: str, tokens: Sequence[int], location: str | None = None) -> int:
        return self._run(instance_id, "evicted", "evict", lambda w: w.evict(tokens, location))

    def move(
        self, old_position: tuple[str, str], new_position: tuple[str, str], tokens: Sequence[int] | None, copy: bool
    ) -> int:
        src_id, old_loc = old_position
        dst_id, new_loc = new_position
        src_workers = self._instance_workers(src_id)
        dst_workers = self._instance_workers(dst_id)
        pairs: list[tuple[WorkerControl, WorkerControl]] = []
        for (src_wid, src), (dst_wid, dst) in zip(src_workers, dst_workers, strict=False):
            info = self.index.worker_info(dst_id, dst_wid)
            if info is None or info.peer_init_url is None:
                raise ControllerError(
                    f"Src worker {src_wid} not registered for instance {src_id} or dst worker {dst_wid} "
                    f"not registered for instance {dst_id} or P2P is not enabled."
                )
            pairs.append((src, dst))
        toks = list(tokens or [])
        results: list[int] = []
        for src, dst in pairs:
            try:
                results.append(move_tokens(src, dst, toks, old_loc, new_loc, copy))
            except Exception:
                raise ControllerError("Operation 'move' is not supported.") from None
        return _same_across_workers(results, "moved")

    def health(self, instance_id: str) -> dict[int, int]:
        codes: dict[int, int] = {}
        for wid, worker in self._instance_workers(instance_id):
            try:
                codes[wid] = int(worker.health())
            except Exception:
                codes[wid] = -1001  # real: the worker answered ErrorMsg
        return codes
