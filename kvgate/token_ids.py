"""How kvgate holds a prompt's token ids: an ``array('I')``, 4 bytes per id (unsigned 32-bit).

Every vocabulary fits (the largest have ~260k entries), so the token cache, the tokenizers' piece cache and the
event index's chain keys share one compact layout: a cached chat of 8k tokens is 32 KB, a fast engine's flat
``uint32`` output is adopted with one copy (``frombytes``), and chain keys hash 4 bytes per id. Ids that do
not fit (negative, or at least 2**32: only garbage from a broken peer) are refused where they come in
(``/tokenize`` answers) or keyed another way (KV events: :mod:`kvgate.routing.block_index`).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

TOKEN_TYPECODE = "I"
MAX_TOKEN_ID = 2**32 - 1
assert array(TOKEN_TYPECODE).itemsize == 4, "array('I') must hold 32-bit ids on this platform"


def token_array(ids: Sequence[int]) -> array[int]:
    """``ids`` as a new ``array('I')`` (a plain copy when it already is one); ``OverflowError`` for an id that
    does not fit, ``TypeError`` for one that is not an integer."""
    return array(TOKEN_TYPECODE, ids)


def from_uint32_bytes(raw: bytes) -> array[int]:
    """Little-endian ``uint32`` ids (a fast engine's flat output) as an ``array('I')``, with one copy."""
    out: array[int] = array(TOKEN_TYPECODE)
    out.frombytes(raw)
    if sys.byteorder != "little":
        out.byteswap()
    return out
