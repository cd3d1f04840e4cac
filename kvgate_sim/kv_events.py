"""SIMULATOR: the engine's KV-cache events, as vLLM (+ LMCache 0.5.6) emits them. Pure: no I/O.

The engine core owns one :class:`KVEventRecorder` when ``EngineConfig.kv_events`` is on. It collects what the
prefix caches did during a scheduler step and hands the step's events, in order, to the core's
``kv_event_sink`` (the server layer publishes them as one ``KVEventBatch`` on ZMQ,
:mod:`kvgate_sim.kv_publisher`). Semantics (shared reference ``vllm-kv-events.md``; docs/local-routing.md §4):

* **GPU** (vLLM's block pool): one ``BlockStored`` per request and step for the full blocks that entered the
  prefix cache (``block_size`` = the GPU block size, ``parent_block_hash`` = the block before the first one or
  None, ``token_ids`` = all tokens of those blocks, ``medium="GPU"``); one ``BlockRemoved`` per cached block
  evicted for reuse; ``AllBlocksCleared`` on ``reset_prefix_cache``. A block whose hash is already cached by
  another block is not announced (vLLM's pool keeps one entry per hash here, as the simulator does).
* **LMCache CPU tier** (LMCache's ``CacheStoreEvent`` turned into ``BlockStored`` by vLLM's connector): one
  ``BlockStored`` per newly stored 256-token chunk, ``medium="cpu"`` (lower case, as observed), parent = the
  previous chunk's key, and LMCache 0.5.6's off-by-one: ``token_ids`` = ``tokens[start:end + 1]``, i.e. 257 ids
  for every chunk but the prompt's last. LMCache's in-process engine emits **no** event when it evicts a CPU
  chunk; ``cpu_removal_events=True`` emits a ``BlockRemoved`` (medium "cpu") per evicted chunk instead.

Hashes are the simulator's chained Python hashes taken as unsigned 64-bit ints (vLLM's default hashes are
64-bit ints too). Hash-only prompts (trace replay without token ids) produce events with empty ``token_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvgate.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

GPU_MEDIUM = "GPU"
CPU_MEDIUM = "cpu"  # vLLM's LMCache connector spells it lower case
_U64 = (1 << 64) - 1


def u64(h: int) -> int:
    """A simulator hash as the unsigned 64-bit int vLLM would publish."""
    return h & _U64


class KVEventRecorder:
    """Collects one engine's KV events between flushes (one flush per scheduler step)."""

    def __init__(self, block_size: int, chunk_size: int, *, cpu_removal_events: bool = False) -> None:
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.cpu_removal_events = cpu_removal_events
        self.gpu_evicted: list[int] = []  # attached to GPUPrefixCache.evicted_log
        self.cpu_admitted: list[tuple[int, int]] = []  # attached to LMCacheTier.admitted_log
        self.cpu_removed: list[int] = []  # attached to LMCacheTier.removed_log
        self._events: list[KVEvent] = []

    def _drain_removals(self) -> None:
        if self.gpu_evicted:
            self._events.extend(BlockRemoved([u64(h)], GPU_MEDIUM) for h in self.gpu_evicted)
            self.gpu_evicted.clear()
        if self.cpu_removed:
            if self.cpu_removal_events:
                self._events.append(BlockRemoved([u64(h) for h in self.cpu_removed], CPU_MEDIUM))
            self.cpu_removed.clear()

    def gpu_stored(self, hashes: Sequence[int], tokens: Sequence[int] | None, indices: Sequence[int]) -> None:
        """Blocks ``indices`` (ascending) of a prompt with block hash chain ``hashes`` entered the prefix cache."""
        self._drain_removals()  # evictions made room for these blocks: they come first
        run: list[int] = []
        for i in indices:
            if run and i != run[-1] + 1:
                self._gpu_run(hashes, tokens, run)
                run = []
            run.append(i)
        if run:
            self._gpu_run(hashes, tokens, run)

    def _gpu_run(self, hashes: Sequence[int], tokens: Sequence[int] | None, run: list[int]) -> None:
        bs = self.block_size
        first, last = run[0], run[-1]
        parent = u64(hashes[first - 1]) if first > 0 else None
        ids = list(tokens[first * bs : (last + 1) * bs]) if tokens is not None else []
        self._events.append(BlockStored([u64(hashes[i]) for i in run], parent, ids, bs, None, GPU_MEDIUM))

    def cpu_stored(self, keys: Sequence[int], tokens: Sequence[int] | None, offset: int = 0) -> None:
        """Drain the tier's admissions; ``keys`` is the prompt's full chunk chain, ``offset`` the chain position
        of the first key that was passed to ``LMCacheTier.store``."""
        self._drain_removals()
        cs = self.chunk_size
        for pos, key in self.cpu_admitted:
            i = offset + pos
            parent = u64(keys[i - 1]) if i > 0 else None
            if tokens is not None:
                n = len(tokens)
                end = (i + 1) * cs
                ids = list(tokens[i * cs : end + 1 if end < n else end])  # LMCache 0.5.6: [start:end + 1]
            else:
                ids = []
            self._events.append(BlockStored([u64(key)], parent, ids, cs, None, CPU_MEDIUM))
        self.cpu_admitted.clear()

    def cleared(self) -> None:
        """vLLM's ``reset_prefix_cache``: every GPU block forgotten."""
        self._drain_removals()
        self._events.append(AllBlocksCleared())

    def flush(self) -> list[KVEvent]:
        """The events since the last flush, in order (empty when nothing changed)."""
        self._drain_removals()
        out, self._events = self._events, []
        return out
