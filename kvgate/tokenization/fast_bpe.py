"""An optional ``tiktoken`` engine for byte-level BPE ``tokenizer.json`` files it provably reproduces.

Hugging Face ``tokenizers`` spends most of an encode in its regex pre-tokenizer (onig): about 10 ms for an
8k-token chat on this machine, while ``tiktoken`` encodes the same text with the same regex and ranks in
about 1 ms (benchmarks/routing_step.py). ``tiktoken`` merges the adjacent pair whose concatenation has the
lowest rank and emits a pre-token found whole in the vocabulary directly; HF BPE applies listed merges in
list order. The two give the same ids when all of the following hold, and they are checked at load:

- model ``BPE`` without byte fallback, dropout or affixes; byte-level alphabet with all 256 bytes;
- normaliser none or NFC (applied with ``unicodedata``); pre-tokeniser ``Split(regex, Isolated)`` +
  ``ByteLevel(use_regex=False)`` or ``ByteLevel(use_regex=True)`` (GPT-2's regex), no prefix space;
- merges in the order of their result's id (ids are tiktoken's ranks), every multi-byte token is the result
  of a merge, and every split of a token into two vocabulary tokens is a listed merge ("complete" merges);
- ``ignore_merges``, or every token's own bytes BPE back to that token (checked with the HF model);
- added tokens without ``lstrip``/``rstrip``/``single_word``; the post-processor only adds fixed ids around
  the text.

On top, a differential self-check on a built-in corpus must agree, else the fast path is off (``reason``).
Texts that are not NFC-normalised go to HF (added tokens may be matched before normalisation there).
"""

from __future__ import annotations

import unicodedata
from typing import Any

from tokenizers import Tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_CHECK = [
    "",
    "The quick brown fox jumps over the lazy dog. KV-cache aware routing!",
    "héllo wörld — naïve café, 你好世界, こんにちは, Привет, مرحبا 🙂🚀👩‍👩‍👧",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\n",
    "   leading   and trailing    \t\t\n\n\r\n  \u00a0\u3000 ",
    "I'M he's WE'LL they'D 1234567890 3.14 {\"k\": [1, null]} <b class='x'>&amp;</b>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " * 3 + "=" * 40 + "\n" * 5,
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class NotEquivalent(Exception):
    pass


def _pattern(pre: Any) -> str:
    if not isinstance(pre, dict):
        raise NotEquivalent("no pre-tokenizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2:
        split, byte_level = steps
        if (
            split.get("type") == "Split"
            and isinstance(split.get("pattern"), dict)
            and "Regex" in split["pattern"]
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            return str(split["pattern"]["Regex"])
    raise NotEquivalent("pre-tokenizer is not a byte-level regex split")


def _ranks(model: dict[str, Any], hf: Tokenizer, added: set[str]) -> dict[bytes, int]:
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        raise NotEquivalent("not a plain BPE model")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NotEquivalent("BPE affixes")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = {t: i for t, i in model["vocab"].items() if t not in added}  # added: matched whole
    if any(c not in vocab for c in decoder):
        raise NotEquivalent("vocabulary lacks some of the 256 bytes")
    try:
        ranks = {bytes(decoder[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError as exc:
        raise NotEquivalent("vocabulary is not byte-level") from exc
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merge_set = set(merges)
    results: set[str] = set()
    last = -1
    for a, b in merges:
        rid = vocab.get(a + b)
        if rid is None or rid < last:
            raise NotEquivalent("merges are not in the order of their result's id")
        last = rid
        results.add(a + b)
    for tok in vocab:
        if len(tok) < 2:
            continue
        if tok not in results:
            raise NotEquivalent("a multi-byte token is not the result of any merge")
        for i in range(1, len(tok)):
            if tok[:i] in vocab and tok[i:] in vocab and (tok[:i], tok[i:]) not in merge_set:
                raise NotEquivalent("merges are not complete")
    if not model.get("ignore_merges"):
        for tok, i in vocab.items():
            if len(tok) > 1 and [t.id for t in hf.model.tokenize(tok)] != [i]:
                raise NotEquivalent("a token does not BPE back to itself")
    return ranks


def _affixes(hf: Tokenizer) -> tuple[list[int], list[int]]:
    bare = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    raise NotEquivalent("post-processor does more than add fixed ids")


class FastBPE:
    """Encodes like the HF tokenizer it was built from, through tiktoken."""

    name = "tiktoken"

    def __init__(self, encoding: Any, nfc: bool, prefix: list[int], suffix: list[int], hf: Tokenizer) -> None:
        self._enc = encoding
        self._nfc = nfc
        self._prefix = prefix
        self._suffix = suffix
        self._hf = hf

    @classmethod
    def build(cls, data: dict[str, Any], hf: Tokenizer) -> tuple[FastBPE | None, str]:
        """The fast engine and ``"ok"``, or ``None`` and why not."""
        try:
            import tiktoken
        except ImportError:
            return None, "tiktoken is not installed"
        try:
            if data["model"].get("type") != "BPE":
                raise NotEquivalent("not a plain BPE model")
            norm = data.get("normalizer")
            if norm is not None and norm.get("type") != "NFC":
                raise NotEquivalent("normalizer other than NFC")
            pattern = _pattern(data.get("pre_tokenizer"))
            specials: dict[str, int] = {}
            for added in data.get("added_tokens", []):
                if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
                    raise NotEquivalent("added token with strip/single-word options")
                specials[added["content"]] = added["id"]
            ranks = _ranks(data["model"], hf, set(specials))
            prefix, suffix = _affixes(hf)
            enc = tiktoken.Encoding("kvgate-local", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
            fast = cls(enc, norm is not None, prefix, suffix, hf)
            for text in [*SELF_CHECK, *specials][:200]:
                for special in (False, True):
                    if fast.encode(text, special) != hf.encode(text, add_special_tokens=special).ids:
                        raise NotEquivalent("self-check disagrees")
        except NotEquivalent as exc:
            return None, str(exc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return None, f"unexpected tokenizer.json layout ({type(exc).__name__})"
        return fast, "ok"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens).ids)
        ids: list[int] = self._enc.encode(text, allowed_special="all")
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids
