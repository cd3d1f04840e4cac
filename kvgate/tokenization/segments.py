"""Message-level reuse for chats: encode the rendered prompt piece by piece between added tokens, with an LRU.

Both engines split a text at added tokens (``<|im_start|>``, ``<|im_end|>``...) before anything else and then
normalise, pre-tokenise and BPE every piece on its own, so ``encode(text) == concat(encode(piece) or
[added id])`` exactly when:

- no added token strips whitespace around it (``lstrip``/``rstrip``) or requires word boundaries;
- no special tokens are added (chat prompts use ``add_special_tokens=False``);
- with an NFC normaliser, the text is already NFC (then every piece between ASCII added tokens is too; an
  un-normalised text is encoded whole).

A multi-turn chat then re-encodes only its new messages: the earlier pieces hit the cache. Pieces are cached
as ``array('q')`` and a chat's ids are assembled as one (memory copies, no per-id work): the token cache and
the event index's chain keys take that array as it is.
``tests/tokenization/test_segments.py`` checks equality against whole-text encoding.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

Encode = Callable[[str], list[int]]


@dataclass(frozen=True, slots=True)
class Split:
    """A text cut at its added tokens (``parts``; ``None`` when piecewise encoding is not provable for it) and
    the number of its characters in pieces not cached when it was cut (a cost hint only)."""

    text: str
    parts: list[str | int] | None
    missing: int


class SegmentEncoder:
    def __init__(self, added: Mapping[str, int], encode: Encode, *, nfc: bool, max_entries: int = 8192) -> None:
        self._added = dict(added)
        ordered = sorted(self._added, key=len, reverse=True)  # longest first: leftmost-longest like both engines
        self._split = re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None
        self._encode = encode
        self._nfc = nfc
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._lock = threading.Lock()  # the async API encodes long prompts on worker threads
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def _piece(self, piece: str) -> array[int]:
        with self._lock:
            ids = self._cache.get(piece)
            if ids is not None:
                self._cache.move_to_end(piece)
                self.hits += 1
                return ids
            self.misses += 1
        ids = array("q", self._encode(piece))
        with self._lock:
            self._cache[piece] = ids
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return ids

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def parts(self, text: str) -> list[str | int] | None:
        """``text`` cut into text pieces and added-token ids, in order (``encode(text)`` is the concatenation of
        their ids); ``None`` when piecewise encoding is not provably identical for this text (not NFC)."""
        it = self._iter_parts(text)
        return None if it is None else list(it)

    def _iter_parts(self, text: str) -> Iterator[str | int] | None:
        if self._split is None or (self._nfc and not unicodedata.is_normalized("NFC", text)):
            return None
        split, added = self._split, self._added

        def gen() -> Iterator[str | int]:
            pos = 0
            for m in split.finditer(text):
                if m.start() > pos:
                    yield text[pos : m.start()]
                yield added[m.group()]
                pos = m.end()
            if pos < len(text):
                yield text[pos:]

        return gen()

    def encode_prefix(self, text: str, min_tokens: int, max_chars: int) -> tuple[array[int], bool] | None:
        """The first ids of ``encode(text)``, piece by piece, until at least ``min_tokens`` are known:
        ``(ids, complete)`` where ``ids`` is an exact prefix of ``encode(text)`` (all of it when ``complete``).
        ``None`` when piecewise encoding is not provable for ``text``, or when more than ``max_chars`` characters
        of new (uncached) pieces would have to be encoded (the caller then encodes the whole text its own way)."""
        parts = self._iter_parts(text)  # lazily: a long chat is only split as far as needed
        if parts is None:
            return None
        out: array[int] = array("q")
        budget = max_chars
        for p in parts:
            if len(out) >= min_tokens:
                return out, False
            if isinstance(p, int):
                out.append(p)
                continue
            with self._lock:
                cached = p in self._cache
            if not cached:
                budget -= len(p)
                if budget < 0:
                    return None
            out += self._piece(p)
        return out, True

    def split(self, text: str) -> Split:
        """``text`` cut into pieces, with how many of its characters are in pieces not cached yet."""
        parts = self.parts(text)
        if parts is None:
            return Split(text, None, len(text))
        with self._lock:
            missing = sum(len(p) for p in parts if isinstance(p, str) and p not in self._cache)
        return Split(text, parts, missing)

    def encode_if_known(self, text: str, max_new_chars: int) -> array[int] | None:
        """``encode(text)`` when at most ``max_new_chars`` characters of it are in pieces not cached yet (the
        next turn of a known chat: cheap enough for the event loop); else ``None`` (nothing encoded)."""
        s = self.split(text)
        if s.parts is None or s.missing > max_new_chars:
            return None
        return self.join(s.parts)

    def join(self, parts: list[str | int]) -> array[int]:
        """The ids of a split text, piece by piece (cached pieces are copied, new ones encoded and cached)."""
        out: array[int] = array("q")
        for p in parts:
            if isinstance(p, int):
                out.append(p)
            else:
                out += self._piece(p)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> array[int]:
        """``encode(text)`` as an ``array('q')``."""
        return self.encode_split(self.split(text))

    def encode_split(self, s: Split) -> array[int]:
        """``encode(s.text)`` for a text already split (:meth:`split`): mostly new text in one encode call
        (cheaper than many), else piece by piece."""
        if s.parts is None:
            return array("q", self._encode(s.text))
        if s.missing * 2 > len(s.text):
            return self._encode_whole(s.text, s.parts)
        return self.join(s.parts)

    def _encode_whole(self, text: str, parts: list[str | int]) -> array[int]:
        """Mostly new text: one encode call, then cache its pieces by cutting the ids at the added-token ids (a
        piece cannot yield an added token's id: its text would have been split off)."""
        listed = self._encode(text)
        ids = array("q", listed)
        self.misses += 1
        found: list[tuple[str, array[int]]] = []
        pos = 0
        piece: str | None = None
        for p in parts:
            if isinstance(p, str):
                piece = p
                continue
            try:
                j = listed.index(p, pos)  # the list: array.index boxes every id it compares
            except ValueError:
                return ids  # not the expected layout: keep the ids, cache nothing
            if piece is not None:
                found.append((piece, ids[pos:j]))
            piece, pos = None, j + 1
        if piece is not None:
            found.append((piece, ids[pos:]))
        with self._lock:
            for key, value in found:
                self._cache[key] = value
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return ids
