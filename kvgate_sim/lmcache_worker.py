"""An LMCache 0.5.6 worker speaking the real ZMQ protocol for any ``WorkerControl`` (SIMULATOR bridge).

Lets a simulated engine register with the REAL LMCache controller (``kvgate_sim.lmcache_real``):

- registration: DEALER → controller reply port, ``RegisterMsg`` → ``RegisterRetMsg{extra_config:
  {heartbeat_url}}``;
- KV state: PUSH → controller pull port, ``BatchedKVOperationMsg`` admit/evict batches. The bridge is
  an :data:`~kvgate_sim.protocol.OpSink` (:meth:`LMCacheWorkerBridge.op_sink`, or call it);
- heartbeat: DEALER → heartbeat port, ``HeartbeatMsg``; a ``FullSyncCommand`` in the reply runs the
  full-sync protocol (``FullSyncStartMsg`` → ``FullSyncBatchMsg``s + ``FullSyncEndMsg`` →
  ``FullSyncStatusMsg`` polls) with the bridge's mirror of the keys it reported for its primary
  location; ops produced meanwhile are held back and sent once the controller reports completion;
- control: a REP socket bound on **127.0.0.1** (never off loopback) answers ``Clear/Pin/Compress/
  Decompress/Health/MoveWorkerMsg`` by calling the ``WorkerControl`` (from the bridge thread) and
  replies ``*WorkerRetMsg{num_tokens}``, ``HealthWorkerRetMsg{error_code}`` or ``ErrorMsg{error}``
  (:mod:`kvgate_sim.lmcache_control`).

Messages (:mod:`kvgate_sim.lmcache_wire`) are msgspec structs tagged ``"type": "<ClassName>"`` encoded as
msgpack; names, fields and tags are copied from ``lmcache/v1/cache_controller/message.py`` and
``commands/*.py`` (0.5.6); the op batches and the full-sync messages are built by
:mod:`kvgate_sim.lmcache_outbox`; the thread and its sockets are :mod:`kvgate_sim.lmcache_bridge_thread`,
this module is the caller side (start/close, re/deregistration, the op sink, flush).
Everything runs in one background thread; :meth:`LMCacheWorkerBridge.close` stops it. The bridge
advertises ip 127.0.0.1. ``/move`` works between bridges of this process that were given a
``peer_init_url`` (the destination is found by that URL, the chunks move in-process).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from kvgate_sim.lmcache_bridge_thread import BridgeThread
from kvgate_sim.lmcache_control import register_peer, unregister_peer
from kvgate_sim.protocol import KVOp


class LMCacheWorkerBridge(BridgeThread):
    """One LMCache worker (``worker.instance_id`` / ``worker.worker_id``) registered with a real controller.

    ``controller_pull_url`` / ``controller_reply_url`` are ``host:port`` (LMCache config style).
    ``heartbeat_interval=None`` disables heartbeats (and so full syncs), like the real worker's default.
    The constructor and the thread are :class:`~kvgate_sim.lmcache_bridge_thread.BridgeThread`'s.
    """

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> LMCacheWorkerBridge:
        """Bind the REP socket, register (waits for ``RegisterRetMsg``) and start the thread."""
        self._thread = threading.Thread(target=self._run, name=f"lmcache-worker-{self.instance_id}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.close()
            raise TimeoutError(f"worker {self.instance_id}/{self.worker_id} did not register within {timeout}s")
        if self._start_error is not None:
            self.close()
            raise self._start_error
        if self.peer_init_url is not None:
            register_peer(self.peer_init_url, self)
        return self

    def close(self, deregister: bool = True) -> None:
        """Stop the thread (optionally sending ``DeRegisterMsg`` first) and close every socket."""
        if self._closed:
            return
        self._closed = True
        if self.peer_init_url is not None:
            unregister_peer(self.peer_init_url, self)
        if deregister and self._thread is not None and self._thread.is_alive():
            self._deregister_requested.set()  # sent by the thread on its way out
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> LMCacheWorkerBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reregister(self, timeout: float = 10.0) -> bool:
        """Send ``RegisterMsg`` again (the controller then clears this worker's keys, or registers it
        anew after a deregistration). Ops queued before the call are pushed first; returns once the
        controller answered (False on timeout)."""
        return self._request_and_wait(self._register_requested, self._register_done, timeout)

    def deregister(self, timeout: float = 10.0) -> bool:
        """Push ``DeRegisterMsg`` after the queued ops (the controller forgets the worker; with heartbeats
        on, the next heartbeat re-registers it and runs a full sync). Returns once it was pushed."""
        return self._request_and_wait(self._deregister_requested, self._deregister_done, timeout)

    def _request_and_wait(self, flag: threading.Event, done: threading.Event, timeout: float) -> bool:
        done.clear()
        flag.set()
        self._wake()
        return done.wait(timeout)

    # ------------------------------------------------------------------ op sink
    def op_sink(self, instance_id: str, worker_id: int, location: str, ops: list[KVOp]) -> None:
        """:data:`~kvgate_sim.protocol.OpSink`: queue ops for the controller (ids are this bridge's)."""
        if not ops:
            return
        with self._lock:
            keys = self._mirror.setdefault(location, {})
            for op in ops:
                if op.op_type == "admit":
                    keys[op.key] = None
                else:
                    keys.pop(op.key, None)
            self._queue.append((location, list(ops)))
            self._pending += 1
        self._wake()

    __call__ = op_sink

    def mirror_keys(self, location: str | None = None) -> list[int]:
        """Keys this bridge reported as held (its full-sync snapshot source)."""
        with self._lock:
            return list(self._mirror.get(location or self.location, {}))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued op was pushed and no full sync is running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending or self._sync is not None:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._idle.wait(min(left, 0.05))
        return True
