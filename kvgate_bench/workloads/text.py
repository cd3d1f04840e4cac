"""Deterministic text and token helpers shared by the generators (word pools, fillers, arrivals, seeded RNGs)."""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Mapping, Sequence

import numpy as np

from kvgate_sim.tokenizer import Tokenizer, get_tokenizer

_MASK64 = (1 << 64) - 1

_WORD_RE = re.compile(rb" [a-z]{2,}")


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids whose text is a space followed by 2+ ASCII lowercase letters, e.g. ``" house"``.

    Qwen's pre-tokenizer splits text before every ``" word"``, and each such piece is one vocabulary entry,
    so any concatenation of these tokens decodes to text that re-encodes to exactly the same ids, in a
    completion prompt or inside a chat message alike.
    """
    tok = get_tokenizer()
    ranks: Mapping[bytes, int] | None = tok.vocab_bytes()
    if ranks is not None:
        items = sorted((rank, piece) for piece, rank in ranks.items() if _WORD_RE.fullmatch(piece))
        ids = tuple(rank for rank, _ in items)
        strs = tuple(piece.decode("ascii") for _, piece in items)
    else:  # pragma: no cover - tokenizer without rank table
        pairs = [(i, tok.decode([i])) for i in range(tok.vocab_size)]
        keep = [(i, s) for i, s in pairs if _WORD_RE.fullmatch(s.encode("utf-8", "replace"))]
        ids = tuple(i for i, _ in keep)
        strs = tuple(s for _, s in keep)
    return ids, strs


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def word_indices(keys: Sequence[int], n: int, seed: int) -> np.ndarray:
    """``len(keys) × n`` indices into the word pool; row i is a PRNG stream seeded by ``(seed, keys[i])``."""
    pool_n = len(word_pool()[0])
    k = np.asarray([int(v) & _MASK64 for v in keys], dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _mix64(k ^ _mix64(np.asarray([seed & _MASK64], dtype=np.uint64)))
        ctr = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        vals = _mix64(base[:, None] + ctr[None, :])
    return (vals % np.uint64(pool_n)).astype(np.int64)


def word_block(key: int, n: int, seed: int = 0) -> list[int]:
    """A deterministic block of ``n`` round-trip-safe token ids for ``key`` (same key ⇒ same block)."""
    ids, _ = word_pool()
    return [ids[i] for i in word_indices([key], n, seed)[0].tolist()]


def words_text(rng: random.Random, n: int) -> str:
    """``n`` random pool words joined (leading space stripped): roughly ``n`` tokens of plain text."""
    _, strs = word_pool()
    return "".join(rng.choice(strs) for _ in range(n)).lstrip()


def filler(n: int) -> str:
    """production-stack / LMCache filler: the word ``hi`` repeated ``n`` times, single-space separated."""
    return " ".join(["hi"] * n)


def random_token_text(rng: random.Random, tok: Tokenizer, n: int) -> str:
    """SGLang ``gen_prompt``: ``n`` uniform vocabulary ids decoded to text.

    Unlike SGLang, the ids are then adjusted (as vLLM's random datasets do) so that the text re-encodes to
    ``n`` tokens where possible; the re-encoded ids, not the sampled ones, are the ground truth.
    """
    if n <= 0:
        return ""
    vocab = tok.vocab_size
    ids = [rng.randrange(vocab) for _ in range(n)]
    text = tok.decode(ids)
    for _ in range(10):
        if "<|" in text:  # never let random text spell a special token
            text = text.replace("<|", "< |")
        cur = tok.encode(text)
        if len(cur) == n:
            break
        ids = cur[:n] if len(cur) > n else cur + [rng.randrange(vocab) for _ in range(n - len(cur))]
        text = tok.decode(ids)
    return text.replace("<|", "< |")


def poisson_arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    """Arrival offsets: all 0 for an infinite rate, else a Poisson process starting at 0."""
    if n <= 0:
        return []
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    out = [0.0]
    t = 0.0
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def seeded_rng(seed: int, name: str) -> random.Random:
    return random.Random(f"kvgate-bench:{name}:{seed}")
