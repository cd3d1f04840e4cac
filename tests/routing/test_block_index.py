"""The pure block prefix index: keying by own chain hash, removal through engine hashes, media, bounds."""

from __future__ import annotations

import pytest

from kvgate.routing.block_index import BlockIndex

BS = 4


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def store(
    idx: BlockIndex,
    inst: str,
    ids: list[int],
    hashes: list[int],
    parent: int | None = None,
    bs: int = BS,
    medium: str | None = "GPU",
) -> int:
    return idx.apply_stored(inst, hashes, parent, ids, bs, medium)


def test_longest_prefix_per_instance() -> None:
    idx = BlockIndex()
    prompt = toks(20)
    store(idx, "a", prompt[:16], [1, 2, 3, 4])
    store(idx, "b", prompt[:8], [11, 12])
    assert idx.match(prompt) == {"a": 16, "b": 8}
    # a different first block matches nothing even though later tokens are equal
    assert idx.match([999, *prompt[1:]]) == {}
    # partial trailing block never counts
    assert idx.match(prompt[:7]) == {"a": 4, "b": 4}
    assert idx.match(prompt, limit=19) == {"a": 16, "b": 8}
    assert idx.match(prompt, limit=15) == {"a": 12, "b": 8}


def test_engine_hashes_are_not_trusted_for_keys() -> None:
    # two engines with different vLLM hashes (different seeds) for the same tokens share the index key
    idx = BlockIndex()
    store(idx, "a", toks(8), [1, 2])
    store(idx, "b", toks(8), [777, 888])
    assert len(idx) == 2
    assert idx.match(toks(8)) == {"a": 8, "b": 8}


def test_parent_chain_continues_across_events() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(4), [1])
    store(idx, "a", toks(4, 4), [2], parent=1)
    assert idx.match(toks(12)) == {"a": 8}
    # an unknown parent makes the chain unknown: refused and counted
    assert store(idx, "a", toks(4, 8), [3], parent=42) == 0
    assert idx.stats.orphan_events == 1


def test_removed_uses_engine_hash_map_and_keeps_other_holders() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(8), [1, 2])
    store(idx, "b", toks(8), [5, 6])
    assert idx.apply_removed("a", [2]) == 1
    assert idx.match(toks(8)) == {"a": 4, "b": 8}
    assert idx.apply_removed("b", [5, 6]) == 2
    assert idx.match(toks(8)) == {"a": 4}
    assert len(idx) == 1
    assert idx.apply_removed("a", [99]) == 0
    assert idx.stats.unknown_removals == 1


def test_hole_in_the_middle_ends_the_prefix() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(12), [1, 2, 3])
    idx.apply_removed("a", [2])
    assert idx.match(toks(12)) == {"a": 4}


def test_media_are_per_block_attributes() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(8), [1, 2], medium="GPU")
    store(idx, "b", toks(16), [9], bs=16, medium="cpu")  # LMCache chunk, lower-case medium
    assert idx.block_sizes == [BS, 16]
    assert idx.match(toks(16)) == {"a": 8, "b": 16}
    assert idx.match(toks(16), media=["GPU"]) == {"a": 8}
    assert idx.match(toks(16), media=["CPU"]) == {"b": 16}
    # removing the CPU chunk leaves the GPU blocks
    idx.apply_removed("b", [9], "cpu")
    assert idx.match(toks(16)) == {"a": 8}


def test_same_block_in_two_media_of_one_instance() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(4), [1], medium="GPU")
    store(idx, "a", toks(4), [100], medium="CPU")
    idx.apply_removed("a", [1])
    assert idx.match(toks(4), media=["CPU"]) == {"a": 4}
    assert idx.match(toks(4), media=["GPU"]) == {}


def test_clear_and_instance_removal() -> None:
    idx = BlockIndex()
    store(idx, "a", toks(8), [1, 2])
    store(idx, "b", toks(8), [3, 4])
    assert idx.clear_instance("a") == 2
    assert idx.match(toks(8)) == {"b": 8}
    assert idx.instances() == ["b"]
    idx.clear_instance("b")
    assert len(idx) == 0
    assert idx.match(toks(8)) == {}
    # after a clear the same engine hashes can be stored again (engine restart)
    store(idx, "a", toks(8), [1, 2])
    assert idx.match(toks(8)) == {"a": 8}


def test_token_count_mismatch_is_refused() -> None:
    idx = BlockIndex()
    assert idx.apply_stored("a", [1], None, toks(BS + 2), BS, "cpu") == 0
    assert idx.apply_stored("a", [1, 2], None, toks(BS), BS, "cpu") == 0
    assert idx.stats.token_mismatch_events == 2
    assert len(idx) == 0


def test_lmcache_one_extra_trailing_token_is_trimmed() -> None:
    # LMCache 0.5.6 sends token_ids[start:end + 1]: each chunk but the last carries the next chunk's first token
    idx = BlockIndex()
    prompt = toks(3 * BS)
    assert idx.apply_stored("a", [1], None, prompt[: BS + 1], BS, "cpu") == 1
    assert idx.apply_stored("a", [2], 1, prompt[BS : 2 * BS + 1], BS, "cpu") == 1
    assert idx.apply_stored("a", [3], 2, prompt[2 * BS :], BS, "cpu") == 1
    assert idx.stats.trimmed_events == 2
    assert idx.match(prompt) == {"a": 3 * BS}


def test_block_sizes_are_bounded() -> None:
    idx = BlockIndex(max_block_sizes=2)
    assert idx.apply_stored("a", [1], None, toks(4), 4) == 1
    assert idx.apply_stored("a", [2], None, toks(8), 8) == 1
    assert idx.apply_stored("a", [3], None, toks(5), 5) == 0  # e.g. a partial chunk of odd length
    assert idx.stats.refused_sizes == 1
    assert idx.block_sizes == [4, 8]
    idx.clear_instance("a")  # emptied sizes free their slot
    assert idx.apply_stored("a", [3], None, toks(5), 5) == 1


def test_cap_refuses_and_counts() -> None:
    idx = BlockIndex(max_blocks=3)
    assert store(idx, "a", toks(20), [1, 2, 3, 4, 5]) == 3
    assert idx.stats.refused_blocks == 2
    assert len(idx) == 3
    assert idx.match(toks(20)) == {"a": 12}
    # a held block can still gain holders at the cap
    assert store(idx, "b", toks(4), [7]) == 1
    with pytest.raises(ValueError):
        BlockIndex(max_blocks=0)


def test_chain_keys_match_what_match_walks() -> None:
    keys = BlockIndex.chain_keys(toks(9), BS)
    assert len(keys) == 2
    assert keys != BlockIndex.chain_keys(toks(9, 1), BS)
    assert BlockIndex.chain_keys(toks(8), BS)[:1] == keys[:1]


def test_invented_media_names_share_one_bit() -> None:
    idx = BlockIndex()
    for i in range(20):
        store(idx, "a", toks(4, 100 * i), [i], medium=f"tier{i}")
    store(idx, "b", toks(4), [99], medium="GPU")
    assert idx.match(toks(4), media=["GPU"]) == {"b": 4}
    assert idx.match(toks(4)) == {"a": 4, "b": 4}
    idx.apply_removed("a", [0])
    assert idx.match(toks(4)) == {"b": 4}


def test_keys_are_the_same_for_a_list_and_a_uint32_array_and_huge_ids_still_work() -> None:
    """Chain keys hash the ids' uint32 bytes (the token cache's ``array('I')`` as it is); an event whose ids do
    not fit uint32 (garbage from a broken publisher: negative, 2**32 and beyond) is keyed block by block
    instead, never a crash."""
    from array import array

    idx = BlockIndex()
    prompt = toks(12)
    assert BlockIndex.chain_keys(prompt, BS) == BlockIndex.chain_keys(array("I", prompt), BS)
    assert BlockIndex.chain_keys(prompt, BS) == BlockIndex.chain_keys(array("q", prompt), BS)
    store(idx, "a", prompt, [1, 2, 3])
    assert idx.match(array("I", prompt)) == {"a": 12}
    assert idx.first_block_held(array("I", prompt), BS) and idx.first_block_held(prompt, BS)
    huge = [2**70, 2**32, -1, 5, *toks(8, 100)]
    assert store(idx, "b", huge, [21, 22, 23]) == 3
    assert idx.match(huge) == {"b": 12}
    assert idx.match([*huge[:4], *toks(8, 200)]) == {"b": 4}  # the block keyed by its tuple, then the chain
