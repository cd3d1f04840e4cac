"""Oracle bound on prefix-cache reuse (TEST AND BENCHMARK TOOL, not product code).

With an infinite cache and perfect routing every request would land where all earlier prompts are
cached. The reusable fraction is then: over all requests in arrival order, the prompt tokens covered by
the longest run of leading blocks whose chained hash was seen in an earlier request, divided by all prompt
tokens. No routing policy on any finite fleet can beat it at the same block granularity.

Block keys are chained like vLLM / LMCache: ``h_i = hash((h_{i-1}, tuple(block_i), ()))`` with ``h_-1 = 0``,
so with ``block_size=256`` they equal :func:`kvgate_sim.protocol.lmcache_chunk_hashes`. Python's ``hash``
of ints and tuples of ints is not randomised, so the result is deterministic across processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvgate_sim.protocol import NONE_HASH


class _HasTokens(Protocol):
    prompt_token_ids: list[int]


@dataclass(frozen=True, slots=True)
class OracleResult:
    """Infinite-cache, perfect-routing reuse at one block granularity."""

    block_size: int
    reusable_tokens: int
    total_tokens: int
    per_request: tuple[int, ...]  # reusable tokens of each request, in the order given

    @property
    def fraction(self) -> float:
        """Reusable tokens / total prompt tokens (0.0 for an empty workload)."""
        return self.reusable_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def requests(self) -> int:
        """Number of requests evaluated."""
        return len(self.per_request)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the per-request list)."""
        return {
            "block_size": self.block_size,
            "reusable_tokens": self.reusable_tokens,
            "total_tokens": self.total_tokens,
            "requests": self.requests,
            "fraction": self.fraction,
        }


def chained_block_hashes(
    token_ids: Sequence[int], block_size: int, *, partial: bool = False, none_hash: int = NONE_HASH
) -> list[int]:
    """Chained keys of the full blocks of ``token_ids`` (plus the trailing partial block if ``partial``)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(token_ids)
    limit = n if partial else n - n % block_size
    out: list[int] = []
    prev = none_hash
    ids = token_ids if isinstance(token_ids, list | tuple) else list(token_ids)
    for start in range(0, limit, block_size):
        prev = hash((prev, tuple(ids[start : start + block_size]), ()))
        out.append(prev)
    return out


def _tokens_of(item: _HasTokens | Sequence[int]) -> Sequence[int]:
    ids = getattr(item, "prompt_token_ids", None)
    return ids if ids is not None else item  # type: ignore[return-value]


def oracle_bound(
    requests: Iterable[_HasTokens | Sequence[int]],
    block_size: int = 16,
    *,
    cap_last_token: bool = True,
    partial_last_block: bool = False,
) -> OracleResult:
    """Reusable-token bound for ``requests`` (objects with ``prompt_token_ids``, or raw id lists) in order.

    A request's reusable tokens are ``block_size ×`` the number of its leading full blocks whose chained
    key appeared in any earlier request. ``cap_last_token`` applies vLLM's rule that at most
    ``num_tokens − 1`` tokens can hit (a fully cached prompt recomputes its last block).
    ``partial_last_block`` also keys the trailing partial block (it then hits only when an earlier prompt
    had exactly the same tokens up to its end at that position). Runs in O(total tokens).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    seen: set[int] = set()
    per_request: list[int] = []
    total = 0
    reusable = 0
    for item in requests:
        ids = _tokens_of(item)
        n = len(ids)
        total += n
        keys = chained_block_hashes(ids, block_size, partial=partial_last_block)
        hit = 0
        for i, key in enumerate(keys):
            if key not in seen:
                break
            hit = min(n, (i + 1) * block_size)
        if cap_last_token and hit >= n:
            hit = ((n - 1) // block_size) * block_size if n > 0 else 0
        seen.update(keys)
        per_request.append(hit)
        reusable += hit
    return OracleResult(block_size, reusable, total, tuple(per_request))


def oracle_hit_rate(
    requests: Iterable[_HasTokens | Sequence[int]], block_size: int = 16, *, cap_last_token: bool = True
) -> float:
    """Shorthand for ``oracle_bound(...).fraction``."""
    return oracle_bound(requests, block_size, cap_last_token=cap_last_token).fraction


def oracle_table(
    requests: Sequence[_HasTokens | Sequence[int]], block_sizes: Iterable[int] = (16, 128, 256)
) -> dict[int, OracleResult]:
    """:func:`oracle_bound` at several granularities (e.g. vLLM GPU 16, vLLM CPU 128, LMCache 256)."""
    return {bs: oracle_bound(requests, bs) for bs in block_sizes}


def trace_block_reuse(records: Iterable[Mapping[str, Any]]) -> float:
    """Fraction of a Mooncake trace's hash-id blocks that repeat an earlier hash id (README: 36.6%)."""
    seen: set[int] = set()
    total = 0
    repeated = 0
    for rec in records:
        for h in rec["hash_ids"]:
            total += 1
            if h in seen:
                repeated += 1
            else:
                seen.add(h)
    return repeated / total if total else 0.0
