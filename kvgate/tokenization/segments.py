"""Message-level reuse for chats: encode the rendered prompt piece by piece between added tokens, with an LRU.

Both engines split a text at added tokens (``<|im_start|>``, ``<|im_end|>``...) before anything else and then
normalise, pre-tokenise and BPE every piece on its own, so ``encode(text) == concat(encode(piece) or
[added id])`` exactly when:

- no added token strips whitespace around it (``lstrip``/``rstrip``) or requires word boundaries;
- no special tokens are added (chat prompts use ``add_special_tokens=False``);
- with an NFC normaliser, the text is already NFC (then every piece between ASCII added tokens is too; an
  un-normalised text is encoded whole).

A multi-turn chat then re-encodes only its new messages: the earlier pieces hit the cache. Pieces are cached
as ``array('I')`` (:mod:`kvgate.token_ids`) and a chat's ids are assembled as one (memory copies, no per-id
work): the token cache and the event index's chain keys take that array as it is. With a batch engine
(``fastokens``) the new pieces of a chat are encoded in one call whose flat ``uint32`` output is adopted as is.
``tests/tokenization/test_segments.py`` checks equality against whole-text encoding.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping

from kvgate.token_ids import TOKEN_TYPECODE, token_array

Encode = Callable[[str], list[int]]
# many pieces in one call (a fast engine's batch API): their ids, in order
EncodeMany = Callable[[list[str]], "list[array[int]]"]


class Split:
    """A text cut at its added tokens, only as far as asked: :meth:`head` cuts at the first added tokens (the
    lazy check of a long chat whose first block nobody holds stops there), :attr:`parts` at all of them (once).
    Not ``provable`` (no added tokens, or a text not NFC under an NFC normaliser): piecewise encoding is not
    provably identical, so the text is encoded whole and ``parts`` is ``None``."""

    __slots__ = ("_added", "_parts", "_regex", "provable", "text")

    def __init__(self, text: str, regex: re.Pattern[str] | None = None, added: Mapping[str, int] | None = None) -> None:
        self.text = text
        self.provable = regex is not None and added is not None
        self._regex = regex
        self._added = added or {}
        self._parts: list[str | int] | None = None

    def _cut(self, maxsplit: int) -> tuple[list[str | int], bool]:
        assert self._regex is not None
        raw = self._regex.split(self.text, maxsplit)
        complete = not maxsplit or len(raw) < 2 * maxsplit + 1
        if not complete:
            raw.pop()  # the rest of the text, not cut yet: may hold more added tokens
        added = self._added
        it = iter(raw)
        first = next(it)
        out: list[str | int] = [first] if first else []
        for token, piece in zip(it, it, strict=False):
            out.append(added[token])
            if piece:
                out.append(piece)
        if complete:
            self._parts = out
        return out, complete

    @property
    def parts(self) -> list[str | int] | None:
        """Text pieces and added-token ids, in order: the text's ids are the concatenation of theirs."""
        if self._parts is None and self.provable:
            self._cut(0)
        return self._parts

    def head(self, tokens: int) -> tuple[list[str | int], bool]:
        """The parts up to at least the ``tokens``-th added token (all when the text has fewer), and whether
        they are all of them (requires ``provable``)."""
        if self._parts is not None:
            return self._parts, True
        return self._cut(tokens)


class SegmentEncoder:
    def __init__(
        self,
        added: Mapping[str, int],
        encode: Encode,
        *,
        nfc: bool,
        max_entries: int = 8192,
        encode_many: EncodeMany | None = None,
    ) -> None:
        self._added = dict(added)
        ordered = sorted(self._added, key=len, reverse=True)  # longest first: leftmost-longest like both engines
        # one capturing group: ``re.split`` returns [text, token, text, token, ..., text] in one C call
        self._split = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None
        self._encode = encode
        self._encode_many = encode_many
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
        ids = token_array(self._encode(piece))
        with self._lock:
            self._cache[piece] = ids
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return ids

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def split(self, text: str) -> Split:
        """``text``, to be cut at its added tokens (lazily; see :class:`Split`)."""
        if self._split is None or (self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text)):
            return Split(text)
        return Split(text, self._split, self._added)

    def parts(self, text: str) -> list[str | int] | None:
        """``text`` cut into text pieces and added-token ids, in order (``encode(text)`` is the concatenation of
        their ids); ``None`` when piecewise encoding is not provably identical for this text (not NFC)."""
        return self.split(text).parts

    def missing(self, s: Split) -> int:
        """How many characters of ``s`` are in pieces not cached yet (all of them when not provable)."""
        parts = s.parts
        if parts is None:
            return len(s.text)
        with self._lock:
            return sum(len(p) for p in parts if isinstance(p, str) and p not in self._cache)

    def encode_prefix(self, s: Split, min_tokens: int, max_chars: int) -> tuple[array[int], bool] | None:
        """The first ids of ``s``'s text, piece by piece, until at least ``min_tokens`` are known: ``(ids,
        complete)`` where ``ids`` is an exact prefix of ``encode(s.text)`` (all of it when ``complete``). ``None``
        when piecewise encoding is not provable for the text, or when more than ``max_chars`` characters of new
        (uncached) pieces would have to be encoded (the caller then encodes the whole text its own way)."""
        if not s.provable:
            return None
        out: array[int] = array(TOKEN_TYPECODE)
        budget = max_chars
        done = 0  # parts already taken
        cut = 4  # added tokens cut so far: a chat's first block usually lies within its first message or two
        while True:
            parts, complete = s.head(cut)
            for p in parts[done:]:
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
            if complete:
                return out, True
            done = len(parts)
            cut *= 4

    def encode_if_known(self, text: str, max_new_chars: int) -> array[int] | None:
        """``encode(text)`` when at most ``max_new_chars`` characters of it are in pieces not cached yet (the
        next turn of a known chat: cheap enough for the event loop); else ``None`` (nothing encoded)."""
        s = self.split(text)
        if s.parts is None or self.missing(s) > max_new_chars:
            return None
        return self.join(s.parts)

    def join(self, parts: list[str | int], fresh: Mapping[str, array[int]] | None = None) -> array[int]:
        """The ids of a split text, piece by piece (cached pieces are copied, new ones encoded and cached;
        ``fresh``: pieces just encoded)."""
        out: array[int] = array(TOKEN_TYPECODE)
        for p in parts:
            if isinstance(p, int):
                out.append(p)
            else:
                ids = fresh.get(p) if fresh else None
                out += ids if ids is not None else self._piece(p)
        return out

    def _encode_new(self, parts: list[str | int], encode_many: EncodeMany) -> dict[str, array[int]]:
        """Encode the pieces not cached yet in one batch call, and cache them."""
        with self._lock:
            new = list(dict.fromkeys(p for p in parts if isinstance(p, str) and p not in self._cache))
        if not new:
            return {}
        fresh = dict(zip(new, encode_many(new), strict=True))
        with self._lock:
            self.misses += len(new)
            self._cache.update(fresh)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return fresh

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> array[int]:
        """``encode(text)`` as an ``array('I')``."""
        return self.encode_split(self.split(text))

    def encode_split(self, s: Split) -> array[int]:
        """``encode(s.text)`` for a text already split (:meth:`split`): with a batch engine its new pieces in one
        batch call; otherwise mostly new text in one encode call (cheaper than many), else piece by piece."""
        parts = s.parts
        if parts is None:
            return token_array(self._encode(s.text))
        if self._encode_many is not None:
            return self.join(parts, self._encode_new(parts, self._encode_many))
        if self.missing(s) * 2 > len(s.text):
            return self._encode_whole(s.text, parts)
        return self.join(parts)

    def _encode_whole(self, text: str, parts: list[str | int]) -> array[int]:
        """Mostly new text: one encode call, then cache its pieces by cutting the ids at the added-token ids (a
        piece cannot yield an added token's id: its text would have been split off)."""
        listed = self._encode(text)
        ids = token_array(listed)
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
