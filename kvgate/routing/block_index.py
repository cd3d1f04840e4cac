"""A pure prefix index of which instance holds which KV blocks, fed by vLLM KV-cache events.

No I/O and no clock: callers apply events in order (live from the ZMQ subscriber, or replayed in virtual
time by the simulator) and ask ``match(token_ids)``.

Keying. The gateway cannot reproduce vLLM's block hashes (the algorithm and its seed are engine-side), so
every block is keyed by the index's own chain key ``hash((parent_key, block_bytes))``, ``block_bytes`` the
block's ids as native uint32 (:func:`token_bytes`, :mod:`kvgate.token_ids`; an id outside uint32 keys its block
by the tuple of its ids). CPython's 64-bit hash, salted per process: keys never leave the process. Hashing
bytes sliced from one buffer costs about half of hashing a tuple sliced from a list, and a token cache
``array('I')`` converts to that buffer with one copy. ``BlockStored`` carries the token ids,
so the key chain is rebuilt from them; a per-instance map ``engine_hash -> (block_size, key, medium)``
lets ``BlockRemoved`` (hashes only) be applied. Keys are kept per block size (GPU 16 or 128 on CPU
vLLM, LMCache chunks 256), and ``match`` walks the prompt once per block size present.

Media. Every holder records the media it holds a block in ("GPU", "cpu"/"CPU", "STORAGE", None = GPU) as a
bit mask; ``match(media=...)`` can restrict to some of them. Media names are compared case-insensitively.

Bounds. ``max_blocks`` caps the number of distinct keys; stores beyond it are refused and counted
(``stats.refused_blocks``). vLLM reports evictions as ``BlockRemoved``, so a cap above the fleet's total
capacity is never reached in steady state. A block costs about 470 bytes (one holder), so the default cap
bounds the index near 240 MB. ``max_block_sizes`` caps the distinct block sizes (``match`` walks
the prompt once per size): a partial LMCache chunk of an odd length would otherwise open a new size.

LMCache 0.5.6 quirk: its CPU-tier ``BlockStored`` carries ``token_ids[start:end + 1]`` (``lmcache.utils.
convert_tokens_to_list``), i.e. one extra trailing token, the first of the next chunk, on every chunk but a
prompt's last. Exactly one surplus trailing token is therefore dropped (``stats.trimmed_events``).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field

from kvgate.token_ids import TOKEN_TYPECODE, token_array

BlockHash = int | bytes
EngineKey = tuple[int, BlockHash]
_ITEM = array(TOKEN_TYPECODE).itemsize
_MAX_MEDIA = 8  # (block_size, engine hash): LMCache and vLLM hashes never mix


def _medium(medium: str | None) -> str:
    return medium.upper() if medium else "GPU"


def token_bytes(token_ids: Sequence[int]) -> bytes | None:
    """``token_ids`` as native uint32 bytes (one copy for an ``array('I')``); ``None`` if an id does not fit."""
    if isinstance(token_ids, array) and token_ids.typecode == TOKEN_TYPECODE:
        return token_ids.tobytes()
    try:
        return token_array(token_ids).tobytes()
    except (OverflowError, TypeError):
        return None


def iter_chain_keys(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> Iterator[int]:
    """The index keys of the full blocks of ``token_ids``, in order (lazily: a walk may stop early)."""
    buf = token_bytes(token_ids)
    end = len(token_ids) - block_size + 1
    if buf is not None:
        width = block_size * _ITEM
        for start in range(0, end * _ITEM, width):
            parent = hash((parent, buf[start : start + width]))
            yield parent
        return
    for start in range(0, end, block_size):  # an id outside uint32 somewhere: key block by block
        block = token_ids[start : start + block_size]
        raw = token_bytes(block)
        parent = hash((parent, raw if raw is not None else tuple(block)))
        yield parent


@dataclass(slots=True)
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    refused_blocks: int = 0  # over max_blocks
    orphan_events: int = 0  # BlockStored whose parent the index does not know: chain unknown
    token_mismatch_events: int = 0  # len(token_ids) != len(block_hashes) * block_size (after the trim below)
    trimmed_events: int = 0  # one surplus trailing token dropped (LMCache's off-by-one)
    refused_sizes: int = 0  # events of a new block size beyond max_block_sizes
    unknown_removals: int = 0  # BlockRemoved for a hash the instance never stored (or was refused)
    clears: int = 0


@dataclass(slots=True)
class _Entry:
    parent: int | None
    holders: dict[str, int] = field(default_factory=dict)  # instance -> bit mask of media


class BlockIndex:
    def __init__(self, max_blocks: int = 500_000, max_block_sizes: int = 4) -> None:
        if max_blocks <= 0 or max_block_sizes <= 0:
            raise ValueError("max_blocks and max_block_sizes must be positive")
        self.max_blocks = max_blocks
        self.max_block_sizes = max_block_sizes
        self.stats = IndexStats()
        self._blocks: dict[int, dict[int, _Entry]] = {}  # block_size -> key -> entry
        self._engine: dict[str, dict[EngineKey, tuple[int, int]]] = {}  # instance -> engine key -> (key, medium bit)
        self._media: dict[str, int] = {"GPU": 1, "CPU": 2, "STORAGE": 4}  # medium name -> bit; vLLM's first
        self._size = 0
        # Bumped on every change that can change a ``match`` answer (a holder added or dropped, a block created
        # or deleted), so callers may memoize answers stamped with it (kvgate/filters/kvcache/event_index.py).
        self.version = 0

    # --- introspection ---

    def __len__(self) -> int:
        return self._size

    @property
    def block_sizes(self) -> list[int]:
        return sorted(s for s, blocks in self._blocks.items() if blocks)

    def instances(self) -> list[str]:
        return sorted(i for i, m in self._engine.items() if m)

    def blocks_of(self, instance: str) -> int:
        return len(self._engine.get(instance, ()))

    # --- event application ---

    @staticmethod
    def chain_keys(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
        """The index keys of every full block of ``token_ids`` (what ``match`` computes)."""
        return list(iter_chain_keys(token_ids, block_size, parent))

    def apply_stored(
        self,
        instance: str,
        block_hashes: Sequence[BlockHash],
        parent_block_hash: BlockHash | None,
        token_ids: Sequence[int],
        block_size: int,
        medium: str | None = None,
    ) -> int:
        """Index the blocks of one ``BlockStored``; returns how many were added or refreshed."""
        expected = len(block_hashes) * block_size
        if block_size > 0 and len(token_ids) == expected + 1:
            token_ids = token_ids[:expected]
            self.stats.trimmed_events += 1
        if block_size <= 0 or len(token_ids) != expected:
            self.stats.token_mismatch_events += 1
            return 0
        if block_size not in self._blocks and len(self._blocks) >= self.max_block_sizes:
            self.stats.refused_sizes += 1
            return 0
        med = self._bit(medium)
        emap = self._engine.setdefault(instance, {})
        parent_key: int | None = None
        if parent_block_hash is not None:
            known = emap.get((block_size, parent_block_hash))
            if known is None:
                self.stats.orphan_events += 1
                return 0
            parent_key = known[0]
        blocks = self._blocks.setdefault(block_size, {})
        keys = self.chain_keys(token_ids, block_size, parent_key)
        done = 0
        for engine_hash, key in zip(block_hashes, keys, strict=True):
            entry = blocks.get(key)
            if entry is None:
                if self._size >= self.max_blocks:
                    self.stats.refused_blocks += len(keys) - done
                    return done
                entry = blocks[key] = _Entry(parent_key)
                self._size += 1
            old = entry.holders.get(instance, 0)
            if old | med != old:
                entry.holders[instance] = old | med
                self.version += 1
            emap[(block_size, engine_hash)] = (key, med)
            parent_key = key
            done += 1
        self.stats.stored_blocks += done
        return done

    def _bit(self, medium: str | None) -> int:
        name = _medium(medium)
        bit = self._media.get(name)
        if bit is None:
            if len(self._media) >= _MAX_MEDIA:  # a publisher inventing media names cannot grow this: one shared bit
                return 1 << _MAX_MEDIA
            bit = self._media[name] = 1 << len(self._media)
        return bit

    def _drop_holder(self, instance: str, block_size: int, key: int, medium: int) -> None:
        blocks = self._blocks.get(block_size)
        entry = blocks.get(key) if blocks is not None else None
        if entry is None or blocks is None:
            return
        media = entry.holders.get(instance)
        if media is None:
            return
        self.version += 1
        media &= ~medium
        if media:
            entry.holders[instance] = media
        else:
            del entry.holders[instance]
            if not entry.holders:
                del blocks[key]
                self._size -= 1
                if not blocks:
                    del self._blocks[block_size]

    def apply_removed(self, instance: str, block_hashes: Iterable[BlockHash], medium: str | None = None) -> int:
        """Apply one ``BlockRemoved``. vLLM's event carries no block size: every size is tried. The medium
        removed is the one recorded when the hash was stored (``medium`` is informational)."""
        emap = self._engine.get(instance)
        removed = 0
        for engine_hash in block_hashes:
            hit = False
            for size in list(self._blocks):
                rec = emap.pop((size, engine_hash), None) if emap is not None else None
                if rec is None:
                    continue
                key, med = rec
                self._drop_holder(instance, size, key, med)  # the medium recorded at store time
                hit = True
            if hit:
                removed += 1
            else:
                self.stats.unknown_removals += 1
        self.stats.removed_blocks += removed
        return removed

    def clear_instance(self, instance: str) -> int:
        """``AllBlocksCleared``, an engine restart, a stale or removed instance: forget all it holds."""
        emap = self._engine.pop(instance, None)
        if not emap:
            return 0
        for (size, _engine_hash), (key, med) in emap.items():
            self._drop_holder(instance, size, key, med)
        self.stats.clears += 1
        return len(emap)

    # --- lookup ---

    def first_block_held(self, token_ids: Sequence[int], limit: int) -> bool:
        """Whether any instance holds the first block of ``token_ids`` at a block size that fits in ``limit``
        tokens (capped at ``len(token_ids)``). ``False`` means ``match`` is empty (no block chain can start) for
        every prompt that starts with these ids and whose limit is at least ``limit``, provided ``limit`` covers
        every block size in the index or these ids are the whole prompt (then ``limit`` is the prompt's own).
        A caller that knows only a prefix of a prompt can stop there (lazy tokenization)."""
        limit = min(limit, len(token_ids))
        for size, blocks in self._blocks.items():
            if blocks and limit >= size and next(iter_chain_keys(token_ids[:size], size)) in blocks:
                return True
        return False

    def match(
        self, token_ids: Sequence[int], media: Iterable[str] | None = None, limit: int | None = None
    ) -> dict[str, int]:
        """Each instance's longest held prefix of ``token_ids`` in tokens (instances matching 0 are absent).

        ``media`` restricts to blocks held in those media; ``limit`` caps the tokens considered (e.g. the
        prompt length minus one, as vLLM recomputes the last token).
        """
        want = None if media is None else sum(self._media.get(_medium(m), 0) for m in set(media))
        n = len(token_ids) if limit is None else min(limit, len(token_ids))
        best: dict[str, int] = {}
        for size, blocks in self._blocks.items():
            if not blocks or n < size:
                continue
            active: set[str] | None = None
            matched = 0
            for key in iter_chain_keys(token_ids[: n // size * size], size):
                entry = blocks.get(key)
                if entry is None:
                    break
                if want is None:
                    holders: Set[str] = entry.holders.keys()
                else:
                    holders = {i for i, m in entry.holders.items() if m & want}
                if active is None:
                    active = set(holders)
                elif not holders >= active:  # the common case (same holders as the previous block) costs no set
                    for gone in active.difference(holders):
                        best[gone] = max(best.get(gone, 0), matched)
                    active.intersection_update(holders)
                if not active:
                    break
                matched += size
            for inst in active or ():
                best[inst] = max(best.get(inst, 0), matched)
        return {i: t for i, t in best.items() if t > 0}
