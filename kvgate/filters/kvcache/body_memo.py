"""Parsed requests memoized by their exact body bytes: a repeated body skips the JSON parse and the SHA-256 key.

A request's :class:`~kvgate.filters.kvcache.extract.Extracted` and cache key are a pure function of the body
bytes (and the filter's ``default_model``, fixed per filter), so an identical body can reuse them. Looking a
body up hashes it once (Python's bytes hash) and compares it byte for byte on a hit, several times cheaper than
parsing a long chat and hashing its canonical JSON (benchmarks/overhead.py, py-spy). Bounded by entries and by
total body bytes; bodies outside ``[min_bytes, max_body_bytes]`` are not kept (short ones are cheap to parse).
The cached values are shared: callers must not mutate them (the filter never does). Event-loop use only.
"""

from __future__ import annotations

from collections import OrderedDict

from kvgate.filters.kvcache.extract import Extracted

Parsed = tuple[Extracted, str]


class BodyMemo:
    def __init__(
        self, max_entries: int = 256, max_bytes: int = 8 << 20, min_bytes: int = 1024, max_body_bytes: int = 1 << 20
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.max_body_bytes = max_body_bytes
        self._data: OrderedDict[bytes, Parsed] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._data)

    def _fits(self, body: object) -> bool:
        return type(body) is bytes and self.min_bytes <= len(body) <= self.max_body_bytes

    def get(self, body: bytes) -> Parsed | None:
        if not self._fits(body):
            return None
        hit = self._data.get(body)
        if hit is not None:
            self._data.move_to_end(body)
            self.hits += 1
        return hit

    def put(self, body: bytes, parsed: Parsed) -> None:
        if not self._fits(body) or body in self._data:
            return
        self._data[body] = parsed
        self._bytes += len(body)
        while self._data and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
            old, _ = self._data.popitem(last=False)
            self._bytes -= len(old)
