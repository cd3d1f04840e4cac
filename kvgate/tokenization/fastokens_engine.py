"""An optional ``fastokens`` engine: loads the same ``tokenizer.json`` and is kept only where it agrees with HF.

``fastokens`` (Apache-2.0, ``pip install 'kvgate[fast]'``) reimplements the Hugging Face pipeline in Rust with a
bounded pre-token cache and releases the GIL. On the simulator's Qwen2.5-style tokenizer it gave the same ids
as HF ``tokenizers`` on 20,003 varied texts and encoded an 8k-token chat 6-8x faster than ``tiktoken``
(``benchmarks/bpe_candidates.py``, docs/benchmarks.md "Faster BPE candidates"). Unlike ``fast_bpe.py``'s
``tiktoken`` path there is no structural proof of equivalence, so a differential self-check against HF on a
built-in corpus (prose, code, whitespace runs, digits, scripts, emoji, combining marks, non-NFC text, every
added token, with and without special tokens) is the guard: any disagreement and the engine is not used.
"""

from __future__ import annotations

import random
import sys
import unicodedata
from array import array
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kvgate.token_ids import from_uint32_bytes, token_array
from kvgate.tokenization.fast_bpe import SELF_CHECK

_PIECES = [
    "the", " quick", " brown", "fox", " KV", "-cache", " routing", "!", "?", ".", ",", "'s", "'LL", " don't",
    "123", "4567890", "3.14", " 1e-9", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000",
    "héllo", " naïve", " café", "你好世界", "こんにちは", " Привет", " مرحبا", "🙂", "🚀", "👩‍👩‍👧",
    "e\u0301", "\u0338",
    "def f(x):", "    return x ** 2", "{\"k\": [1, null]}", "<b class='x'>", "&amp;", "=" * 8, "aaaa",
]  # fmt: skip


def self_check_corpus(added: list[str], n: int = 150, seed: int = 7) -> list[str]:
    """Deterministic texts covering what tokenizers get wrong; ``added`` tokens are mixed into some."""
    rng = random.Random(seed)
    texts = [*SELF_CHECK, *added]
    for i in range(n):
        parts = rng.choices(_PIECES + added if i % 3 == 0 else _PIECES, k=rng.randint(1, 40))
        text = "".join(parts)
        if i % 7 == 0:
            text = unicodedata.normalize(rng.choice(("NFD", "NFKD")), text)
        texts.append(text)
    texts.append(" ".join(rng.choices(_PIECES, k=400)))  # one longer text
    return texts


class FastTokens:
    """Encodes like the HF tokenizer it was checked against, through ``fastokens``."""

    name = "fastokens"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def build(cls, tokenizer_json: Path, hf: Tokenizer) -> tuple[FastTokens | None, str]:
        """The engine and ``"ok"``, or ``None`` and why not."""
        try:
            import fastokens  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            return None, "fastokens is not installed"
        try:
            fast = cls(fastokens.Tokenizer.from_file(str(tokenizer_json)))
            added = [a.content for a in hf.get_added_tokens_decoder().values()]
            corpus = self_check_corpus(added)
            for text in corpus:
                for special in (False, True):
                    if fast.encode(text, special) != hf.encode(text, add_special_tokens=special).ids:
                        return None, "self-check disagrees with tokenizers"
            batch = [t for t in corpus if t]
            if [list(ids) for ids in fast.encode_pieces(batch)] != [
                hf.encode(t, add_special_tokens=False).ids for t in batch
            ]:
                return None, "self-check of the batch API disagrees with tokenizers"
        except Exception as exc:  # a Rust loader error or an unexpected API: not usable, say why
            return None, f"fastokens failed ({type(exc).__name__})"
        return fast, "ok"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except UnicodeEncodeError:  # lone surrogates (valid JSON escapes, not UTF-8): tiktoken's own fix-up, so
            # both fast engines give the same ids (HF cannot encode such text at all)
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_pieces(self, pieces: list[str]) -> list[array[int]]:
        """Each piece's ids (no special tokens), from one batch call that builds no per-id Python objects: its
        flat ``uint32`` buffer is adopted with one copy and sliced per piece."""
        try:
            raw, offsets = self._tok.encode_batch_flat(pieces, add_special_tokens=False)
        except UnicodeEncodeError:  # a lone surrogate somewhere: one by one, with encode's fix-up
            return [token_array(self.encode(p, False)) for p in pieces]
        ids = from_uint32_bytes(raw)
        cuts: array[int] = array("Q")
        cuts.frombytes(offsets)
        if sys.byteorder != "little":
            cuts.byteswap()
        return [ids[cuts[i] : cuts[i + 1]] for i in range(len(pieces))]
