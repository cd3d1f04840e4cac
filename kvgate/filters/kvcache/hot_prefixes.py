"""Hot prefixes: request counts per shared prompt prefix, and the prefix the requests share. Pure (injected clock).

The seed counts hotness per *request* key (the whole request hashed), so a system prompt shared by many
different questions is never hot. Here a request's prefix key is its first ``key_tokens`` tokens (default one
LMCache chunk): every request that starts the same way counts for the same key. Each key keeps the longest
common prefix of the token lists seen under it, compared chunk by chunk (``chunk_tokens``) — that is what
the requests share, so it is what pinning protects and replication warms; a one-off question after it
never is.

Bounded: at most ``max_keys`` keys (least recently seen dropped first), each with at most ``max_records``
timestamps within ``window`` seconds and a shared prefix of at most ``max_prefix_tokens`` tokens.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PrefixKey = int


@dataclass(slots=True)
class _Entry:
    tokens: list[int]  # longest common prefix (chunk-aligned once a second request came)
    seen: deque[float] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class HotPrefix:
    key: PrefixKey
    count: int
    tokens: list[int]


def prefix_key(tokens: Sequence[int], key_tokens: int) -> PrefixKey | None:
    """The key of a token list: a hash of its first ``key_tokens`` tokens (None when it is shorter)."""
    if len(tokens) < key_tokens:
        return None
    return hash(tuple(tokens[:key_tokens]))


def common_prefix_len(a: Sequence[int], b: Sequence[int], chunk: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` in whole ``chunk``-token chunks (slice compares run in C)."""
    n = min(len(a), len(b))
    i = 0
    while i + chunk <= n and a[i : i + chunk] == b[i : i + chunk]:
        i += chunk
    return i


class HotPrefixes:
    def __init__(
        self,
        window: float,
        *,
        key_tokens: int = 256,
        chunk_tokens: int = 256,
        max_keys: int = 1024,
        max_records: int = 300,
        max_prefix_tokens: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window = window
        self.key_tokens = key_tokens
        self.chunk_tokens = chunk_tokens
        self.max_keys = max_keys
        self.max_records = max_records
        self.max_prefix_tokens = max_prefix_tokens
        self._clock = clock
        self._keys: OrderedDict[PrefixKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def key_of(self, tokens: Sequence[int]) -> PrefixKey | None:
        return prefix_key(tokens, self.key_tokens)

    def record(self, tokens: Sequence[int]) -> PrefixKey | None:
        """Count one request; returns its prefix key (None: shorter than ``key_tokens``, not counted)."""
        key = self.key_of(tokens)
        if key is None:
            return None
        now = self._clock()
        e = self._keys.get(key)
        if e is None:
            e = self._keys[key] = _Entry(list(tokens[: self.max_prefix_tokens]))
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
            n = common_prefix_len(e.tokens, tokens, self.chunk_tokens)
            if n < len(e.tokens):
                del e.tokens[max(n, self.key_tokens) :]
        e.seen.append(now)
        self._trim(e, now)
        return key

    def _trim(self, e: _Entry, now: float) -> None:
        while e.seen and (now - e.seen[0] > self.window or len(e.seen) > self.max_records):
            e.seen.popleft()

    def count(self, key: PrefixKey | None) -> int:
        """Requests of ``key`` within the window."""
        e = self._keys.get(key) if key is not None else None
        if e is None:
            return 0
        self._trim(e, self._clock())
        return len(e.seen)

    def tokens(self, key: PrefixKey) -> list[int] | None:
        e = self._keys.get(key)
        return None if e is None else e.tokens

    def hot(self, threshold: int, limit: int = 64) -> list[HotPrefix]:
        """The keys with at least ``threshold`` requests in the window (most requested first, at most ``limit``);
        drops keys with none left in the window."""
        now = self._clock()
        out: list[HotPrefix] = []
        for key in list(self._keys):
            e = self._keys[key]
            self._trim(e, now)
            if not e.seen:
                del self._keys[key]
            elif threshold > 0 and len(e.seen) >= threshold:
                out.append(HotPrefix(key, len(e.seen), e.tokens))
        out.sort(key=lambda h: -h.count)
        return out[:limit]
