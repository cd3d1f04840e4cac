"""SIMULATOR: prompts as token ids with their vLLM block-hash chain (real tokens or Mooncake-style hash ids)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE, lmcache_chunk_hashes

GPU_NONE_HASH = 0


def gpu_block_hashes(tokens: Sequence[int], block_size: int = 16, parent: int = GPU_NONE_HASH) -> list[int]:
    """Chained GPU block hashes over full blocks: ``h_i = hash((h_{i-1}, tuple(block_i)))``."""
    out: list[int] = []
    n_full = len(tokens) - len(tokens) % block_size
    for start in range(0, n_full, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        out.append(parent)
    return out


def _synthetic_chain(hash_ids: Sequence[int], num_tokens: int, segment_tokens: int, unit: int, tag: int) -> list[int]:
    out: list[int] = []
    parent = GPU_NONE_HASH
    for start in range(0, num_tokens - num_tokens % unit, unit):
        ids = tuple(hash_ids[start // segment_tokens : (start + unit - 1) // segment_tokens + 1])
        parent = hash((parent, (tag, ids, start)))
        out.append(parent)
    return out


class Prompt:
    """A prompt given by token ids and/or precomputed hash chains (so huge traces are hashed once, not per engine).

    ``Prompt(tokens)`` hashes lazily and caches per block/chunk size; ``Prompt.from_hashes`` carries only
    lengths and hash lists (``tokens_factory`` optional); ``Prompt.from_hash_ids`` derives both chains from
    Mooncake-style per-segment hash ids (shared id prefix ⇒ shared block and chunk prefix).
    """

    __slots__ = ("_block_hashes", "_chunk_hashes", "_tokens", "_tokens_factory", "num_tokens")

    def __init__(self, tokens: Sequence[int]):
        self._tokens: Sequence[int] | None = tokens
        self._tokens_factory: Callable[[], Sequence[int]] | None = None
        self.num_tokens = len(tokens)
        self._block_hashes: dict[int, list[int]] = {}
        self._chunk_hashes: dict[int, list[int]] = {}

    @classmethod
    def from_hashes(
        cls,
        num_tokens: int,
        block_hashes: Sequence[int],
        chunk_hashes: Sequence[int] = (),
        *,
        block_size: int = 16,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
        tokens_factory: Callable[[], Sequence[int]] | None = None,
    ) -> Prompt:
        if len(block_hashes) != num_tokens // block_size:
            raise ValueError(f"need {num_tokens // block_size} block hashes, got {len(block_hashes)}")
        if chunk_hashes and len(chunk_hashes) != num_tokens // chunk_size:
            raise ValueError(f"need {num_tokens // chunk_size} chunk hashes, got {len(chunk_hashes)}")
        p = cls.__new__(cls)
        p._tokens = None
        p._tokens_factory = tokens_factory
        p.num_tokens = num_tokens
        p._block_hashes = {block_size: list(block_hashes)}
        p._chunk_hashes = {chunk_size: list(chunk_hashes)} if chunk_hashes or num_tokens < chunk_size else {}
        return p

    @classmethod
    def from_hash_ids(
        cls,
        hash_ids: Sequence[int],
        num_tokens: int,
        *,
        segment_tokens: int = 512,
        block_size: int = 16,
        chunk_size: int = LMCACHE_CHUNK_SIZE,
    ) -> Prompt:
        """Synthetic chains for trace replay: unit starting at token ``s`` keys on the ids of the segments it spans."""
        if num_tokens > len(hash_ids) * segment_tokens:
            raise ValueError("num_tokens exceeds len(hash_ids) × segment_tokens")
        return cls.from_hashes(
            num_tokens,
            _synthetic_chain(hash_ids, num_tokens, segment_tokens, block_size, 1),
            _synthetic_chain(hash_ids, num_tokens, segment_tokens, chunk_size, 2),
            block_size=block_size,
            chunk_size=chunk_size,
        )

    @property
    def tokens(self) -> Sequence[int] | None:
        if self._tokens is None and self._tokens_factory is not None:
            self._tokens = self._tokens_factory()
        return self._tokens

    def _hashes(
        self, cache: dict[int, list[int]], size: int, chain: Callable[[Sequence[int], int], list[int]], what: str
    ) -> list[int]:
        """``chain(tokens, size)``, computed once per size (a hash-only prompt has only the sizes it was given)."""
        cached = cache.get(size)
        if cached is None:
            tokens = self.tokens
            if tokens is None:
                raise ValueError(f"hash-only prompt has no {what}={size}")
            cached = cache[size] = chain(tokens, size)
        return cached

    def block_hashes(self, block_size: int) -> list[int]:
        return self._hashes(self._block_hashes, block_size, gpu_block_hashes, "block hashes for block_size")

    def chunk_hashes(self, chunk_size: int = LMCACHE_CHUNK_SIZE) -> list[int]:
        return self._hashes(self._chunk_hashes, chunk_size, lmcache_chunk_hashes, "chunk hashes for chunk_size")
