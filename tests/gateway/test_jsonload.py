"""kvgate.jsonload.loads: msgspec's speed, the standard library's semantics (values and errors)."""

from __future__ import annotations

import json
import math

import pytest

from kvgate.jsonload import loads

SAME = [
    b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9llo \\ud83d\\ude42 \xc3\xa9"}]}',
    b'{"a": 1, "a": 2}',  # the last duplicate key wins in both
    b"[1, -0, 1.5, 1e2, 12345678901234567890123, true, false, null]",
    b' {"nested": [[[{"x": ""}]]]} ',
    b'{"a": NaN, "b": Infinity, "c": -Infinity}',  # refused by msgspec, accepted by the stdlib
    b'{"big": 1e999}',  # out of range for msgspec; inf for the stdlib
    b'{"lone": "\\ud800"}',  # a lone surrogate escape
    b'\xef\xbb\xbf{"bom": 1}',  # a UTF-8 byte-order mark
]


@pytest.mark.parametrize("body", SAME)
def test_values_equal_the_stdlib(body: bytes) -> None:
    got, want = loads(body), json.loads(body)
    assert json.dumps(got) == json.dumps(want)  # NaN-safe comparison, types included (1e2 is a float)
    assert type(got) is type(want)


def test_special_floats_are_the_stdlib_values() -> None:
    got = loads(b'{"a": NaN, "b": 1e999}')
    assert math.isnan(got["a"]) and got["b"] == math.inf


@pytest.mark.parametrize("body", [b"{", b'{"a": 01}', b"[1,]", b'"\xff"', b"nul", b"{} {}", b"[" * 100_000])
def test_malformed_raises_what_the_stdlib_raises(body: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as got:
        loads(body)
    with pytest.raises((ValueError, RecursionError)) as want:
        json.loads(body)
    assert got.type is want.type
