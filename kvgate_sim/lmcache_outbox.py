"""What the LMCache 0.5.6 worker bridge sends to the controller, built purely (SIMULATOR).

:func:`op_batches` numbers admit/evict ops per location (``seq_num`` counts from 0, like the real worker)
into ``BatchedKVOperationMsg`` s. :class:`FullSync` is one full sync in progress: the snapshot of keys,
its ``FullSyncStartMsg`` / ``FullSyncBatchMsg`` s + ``FullSyncEndMsg`` / ``FullSyncStatusMsg`` and the poll
bookkeeping. No sockets: the bridge thread (:mod:`kvgate_sim.lmcache_bridge_thread`) sends them, reads the replies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from kvgate_sim.lmcache_wire import (
    BatchedKVOperationMsg,
    FullSyncBatchMsg,
    FullSyncEndMsg,
    FullSyncStartMsg,
    FullSyncStatusMsg,
    KVOpEvent,
    Msg,
)
from kvgate_sim.protocol import KVOp


def op_batches(
    instance_id: str, worker_id: int, batches: Iterable[tuple[str, list[KVOp]]], seq: dict[str, int]
) -> list[Msg]:
    """One ``BatchedKVOperationMsg`` per ``(location, ops)``; ``seq`` (location → last seq_num) is advanced."""
    msgs: list[Msg] = []
    for location, ops in batches:
        events = []
        for op in ops:
            n = seq.get(location, -1) + 1
            seq[location] = n
            events.append(KVOpEvent(op.op_type, op.key, n))
        msgs.append(BatchedKVOperationMsg(instance_id, worker_id, location, events))
    return msgs


class FullSync:
    """One full sync of ``keys`` (the worker's keys in ``location``) in batches of ``batch_size``."""

    def __init__(
        self,
        instance_id: str,
        worker_id: int,
        location: str,
        keys: list[int],
        batch_size: int,
        *,
        poll_interval: float,
        max_polls: int,
    ) -> None:
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.location = location
        self.keys = keys
        self.batch_size = batch_size
        self.batch_count = max(1, (len(keys) + batch_size - 1) // batch_size)
        self.sync_id = f"{instance_id}_{worker_id}_{uuid.uuid4().hex[:8]}"
        self.poll_interval = poll_interval
        self.max_polls = max_polls
        self.polls = 0
        self.next_poll = 0.0

    def start_msg(self) -> FullSyncStartMsg:
        return FullSyncStartMsg(
            self.instance_id, self.worker_id, self.location, self.sync_id, len(self.keys), self.batch_count
        )

    def started(self, now: float) -> None:
        """The controller accepted the sync at ``now``: the first status poll is due one interval later."""
        self.next_poll = now + self.poll_interval

    def batch_msgs(self, batch_ids: Sequence[int]) -> list[Msg]:
        """The given batches, then ``FullSyncEndMsg``."""
        keys, size, sid = self.keys, self.batch_size, self.sync_id
        msgs: list[Msg] = [
            FullSyncBatchMsg(self.instance_id, self.worker_id, self.location, sid, b, keys[b * size : (b + 1) * size])
            for b in batch_ids
        ]
        msgs.append(FullSyncEndMsg(self.instance_id, self.worker_id, self.location, sid, len(keys)))
        return msgs

    def poll(self, now: float) -> FullSyncStatusMsg:
        """Count a status poll made at ``now`` (the next is due one interval later); its message."""
        self.polls += 1
        self.next_poll = now + self.poll_interval
        return FullSyncStatusMsg(self.instance_id, self.worker_id, self.sync_id)

    @property
    def exhausted(self) -> bool:
        """True once ``max_polls`` polls were made."""
        return self.polls >= self.max_polls
