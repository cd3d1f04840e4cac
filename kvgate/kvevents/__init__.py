"""vLLM KV-cache events: the wire codec and an asyncio ZMQ subscriber feeding the block index."""

from kvgate.kvevents.subscriber import EventSource, KVEventSubscriber, SubscriberStats, apply_batch
from kvgate.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    KVEventBatch,
    WireError,
    decode_message,
    decode_payload,
    encode_message,
    encode_payload,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "EventSource",
    "KVEventBatch",
    "KVEventSubscriber",
    "SubscriberStats",
    "WireError",
    "apply_batch",
    "decode_message",
    "decode_payload",
    "encode_message",
    "encode_payload",
]
