"""LMCache 0.5.6 controller <-> worker wire messages: msgspec structs tagged with the class name, as msgpack.

Names, fields and tags are copied from ``lmcache/v1/cache_controller/message.py`` and ``commands/*.py`` (0.5.6).
"""

from __future__ import annotations

from typing import Any

import msgspec


class Msg(msgspec.Struct, tag=True):
    """Base: ``tag=True`` → ``"type": "<ClassName>"`` like ``MsgBase``."""


class RegisterMsg(Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None


class DeRegisterMsg(Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int


class KVOpEvent(msgspec.Struct):
    op_type: str  # "admit" | "evict" (OpType enum values)
    key: int
    seq_num: int


class BatchedKVOperationMsg(Msg):
    instance_id: str
    worker_id: int
    location: str
    operations: list[KVOpEvent]


class HeartbeatMsg(Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None


class FullSyncStartMsg(Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    total_keys: int
    batch_count: int


class FullSyncBatchMsg(Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    batch_id: int
    keys: list[int]


class FullSyncEndMsg(Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    actual_total_keys: int


class FullSyncStatusMsg(Msg):
    instance_id: str
    worker_id: int
    sync_id: str


class HeartbeatCommand(msgspec.Struct, tag_field="command_type", tag=True):
    reason: str | None = None
    args: dict[str, Any] | None = None


class FullSyncCommand(HeartbeatCommand, tag="full_sync"):
    pass


class RegisterRetMsg(Msg):
    extra_config: dict[str, str] = {}


class HeartbeatRetMsg(Msg):
    commands: list[FullSyncCommand | HeartbeatCommand] = []


class FullSyncStartRetMsg(Msg):
    sync_id: str
    accepted: bool
    error_msg: str | None = None


class FullSyncStatusRetMsg(Msg):
    sync_id: str
    is_complete: bool
    global_progress: float
    can_exit_freeze: bool
    missing_batches: list[int] = []


class ErrorMsg(Msg):
    error: str


class ClearWorkerMsg(Msg):
    worker_event_id: str
    location: str


class PinWorkerMsg(Msg):
    worker_event_id: str
    location: str
    tokens: list[int]


class CompressWorkerMsg(Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class DecompressWorkerMsg(Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class MoveWorkerMsg(Msg):
    worker_event_id: str
    old_position: str
    new_position: tuple[str, str]
    tokens: list[int] | None = None
    copy: bool | None = True


class HealthWorkerMsg(Msg):
    worker_event_id: str


class CheckFinishWorkerMsg(Msg):
    worker_event_id: str


class ClearWorkerRetMsg(Msg):
    num_tokens: int


class PinWorkerRetMsg(Msg):
    num_tokens: int


class CompressWorkerRetMsg(Msg):
    num_tokens: int


class DecompressWorkerRetMsg(Msg):
    num_tokens: int


class MoveWorkerRetMsg(Msg):
    num_tokens: int


class HealthWorkerRetMsg(Msg):
    error_code: int


ControlRequest = (
    ClearWorkerMsg
    | PinWorkerMsg
    | CompressWorkerMsg
    | DecompressWorkerMsg
    | MoveWorkerMsg
    | HealthWorkerMsg
    | CheckFinishWorkerMsg
)
ControllerReply = RegisterRetMsg | HeartbeatRetMsg | FullSyncStartRetMsg | FullSyncStatusRetMsg | ErrorMsg

encode = msgspec.msgpack.Encoder().encode
decode_control = msgspec.msgpack.Decoder(ControlRequest).decode
decode_reply = msgspec.msgpack.Decoder(ControllerReply).decode
