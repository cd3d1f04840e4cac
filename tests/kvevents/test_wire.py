"""The KVEventBatch codec against vLLM's wire shape (tagged maps inside an array batch)."""

from __future__ import annotations

import msgspec
import pytest

from kvgate.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    WireError,
    decode_message,
    decode_payload,
    encode_message,
    is_replay_end,
    replay_end_message,
)


def vllm_payload(events: list[object], dp_rank: int | None = None) -> bytes:
    # what vLLM 0.32's msgspec encoder writes: array batch, tagged maps, defaulted fields omitted
    batch: list[object] = [1796144087.83, events]
    if dp_rank is not None:
        batch.append(dp_rank)
    return msgspec.msgpack.encode(batch)


def test_round_trip() -> None:
    batch = KVEventBatch(
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[1, b"\x01\x02"], parent_block_hash=None, token_ids=[1, 2], block_size=1, medium="GPU"
            ),
            BlockRemoved(block_hashes=[2**64 - 1], medium="cpu"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    frames = encode_message(b"kv", 42, batch)
    assert frames[1] == (42).to_bytes(8, "big")
    msg = decode_message(frames)
    assert (msg.topic, msg.seq, msg.batch, msg.skipped_events) == (b"kv", 42, batch, 0)
    # the events are maps tagged by "type", like vLLM's
    raw = msgspec.msgpack.decode(frames[2])
    assert raw[1][0]["type"] == "BlockStored"
    assert raw[1][2] == {"type": "AllBlocksCleared"}


def test_decodes_vllm_shape_with_extra_and_missing_optional_fields() -> None:
    payload = vllm_payload(
        [
            {
                "type": "BlockStored",
                "block_hashes": [15652531915685397350],
                "parent_block_hash": None,
                "token_ids": [0, 284],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "group_idx": 0,
                "kv_cache_spec_kind": "full",
                "some_future_field": [1, 2],
            },
            {"type": "BlockRemoved", "block_hashes": [15652531915685397350], "medium": "GPU", "locality": "x"},
        ]
    )
    batch, skipped = decode_payload(payload)
    assert skipped == 0
    assert batch.data_parallel_rank is None
    stored = batch.events[0]
    assert isinstance(stored, BlockStored) and stored.block_hashes == [15652531915685397350]
    assert isinstance(batch.events[1], BlockRemoved)


def test_unknown_and_malformed_events_are_skipped_not_fatal() -> None:
    payload = vllm_payload(
        [
            {"type": "FutureEvent", "x": 1},
            {"type": "BlockStored", "block_hashes": "not a list"},
            {"type": "AllBlocksCleared"},
            "garbage",
        ],
        dp_rank=3,
    )
    batch, skipped = decode_payload(payload)
    assert batch.events == [AllBlocksCleared()]
    assert skipped == 3
    assert batch.data_parallel_rank == 3


@pytest.mark.parametrize(
    "frames",
    [
        [b"kv", b"\x00" * 8],
        [b"kv", b"\x00" * 7, vllm_payload([])],
        [b"kv", b"\x00" * 8, b"\xc1not msgpack"],
        [b"kv", b"\x00" * 8, msgspec.msgpack.encode({"not": "an array"})],
    ],
)
def test_bad_messages_raise_wire_error(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode_message(frames)


def test_replay_end_marker() -> None:
    assert is_replay_end(replay_end_message())
    assert not is_replay_end(encode_message(b"", 0, KVEventBatch(ts=0.0, events=[])))
