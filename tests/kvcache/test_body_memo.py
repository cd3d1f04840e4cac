"""BodyMemo: a repeated body reuses its parsed request and key; the memo is bounded and never confuses bodies."""

from __future__ import annotations

import json

from kvgate.filters.kvcache.body_memo import BodyMemo
from kvgate.filters.kvcache.request import read_request
from tests.kvcache.test_filter_integration import make_ctx


def body(i: int, n: int = 2000) -> bytes:
    return json.dumps({"model": "m", "prompt": f"prompt {i} " + "x" * n}).encode()


async def test_read_request_with_memo_equals_without() -> None:
    memo = BodyMemo()
    for b in [body(1), body(2), body(1), body(2, 100), body(2, 100)]:
        plain = await read_request(make_ctx(b), "d")
        first = await read_request(make_ctx(b), "d", memo)
        again = await read_request(make_ctx(b), "d", memo)
        assert plain == first == again
    assert memo.hits == 4  # the long bodies after their first read; the short one (100 chars) is never kept
    assert len(memo) == 2


async def test_chat_bodies_and_different_bodies() -> None:
    memo = BodyMemo(min_bytes=0)
    a = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 300}]}).encode()
    b = a.replace(b"hello", b"hellO", 1)
    ra = await read_request(make_ctx(a), "d", memo)
    rb = await read_request(make_ctx(b), "d", memo)
    assert ra is not None and rb is not None and ra[1] != rb[1]
    assert await read_request(make_ctx(a), "d", memo) == ra
    assert await read_request(make_ctx(b), "d", memo) == rb


def test_bounds() -> None:
    memo = BodyMemo(max_entries=3, max_bytes=10_000, min_bytes=10, max_body_bytes=5_000)
    parsed = object()
    for i in range(5):
        memo.put(body(i, 1000), parsed)  # type: ignore[arg-type]
    assert len(memo) == 3 and memo.get(body(0, 1000)) is None and memo.get(body(4, 1000)) is parsed
    memo.put(body(9, 6000), parsed)  # type: ignore[arg-type]  # above max_body_bytes
    assert memo.get(body(9, 6000)) is None
    big = BodyMemo(max_entries=100, max_bytes=5_000, min_bytes=10)
    for i in range(10):
        big.put(body(i, 1000), parsed)  # type: ignore[arg-type]
    assert 0 < len(big) <= 5 and big._bytes <= 5_000
    memo.put(bytearray(body(7, 1000)), parsed)  # type: ignore[arg-type]  # unhashable kinds are never kept
    assert memo.get(bytearray(body(7, 1000))) is None  # type: ignore[arg-type]
