"""The thread of the LMCache 0.5.6 worker bridge: its ZMQ sockets and poll loop (SIMULATOR).

:class:`BridgeThread` holds the bridge's state and runs, in one background thread: registration
(DEALER → controller reply port), op pushes (PUSH → controller pull port), heartbeats and the full-sync
protocol (DEALER → heartbeat port), and the control REP socket on 127.0.0.1. The caller side (start/close,
the op sink, flush) is :class:`~kvgate_sim.lmcache_worker.LMCacheWorkerBridge`; the messages are built in
:mod:`kvgate_sim.lmcache_outbox` and the control replies in :mod:`kvgate_sim.lmcache_control`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from kvgate_sim.lmcache_control import dispatch_control
from kvgate_sim.lmcache_outbox import FullSync, op_batches
from kvgate_sim.lmcache_wire import (
    DeRegisterMsg,
    ErrorMsg,
    FullSyncCommand,
    FullSyncStartRetMsg,
    FullSyncStatusRetMsg,
    HeartbeatMsg,
    HeartbeatRetMsg,
    Msg,
    RegisterMsg,
    RegisterRetMsg,
    decode_control,
    decode_reply,
    encode,
)
from kvgate_sim.protocol import DEFAULT_LOCATION, KVOp, WorkerControl

log = logging.getLogger("kvgate_sim.lmcache_worker")  # the bridge's logger, as before the split

LOOPBACK = "127.0.0.1"


def _tcp(url: str) -> str:
    return url if "://" in url else f"tcp://{url}"


class BridgeThread:
    """State and background thread of one worker bridge (the socket side; see ``LMCacheWorkerBridge``)."""

    def __init__(
        self,
        worker: WorkerControl,
        controller_pull_url: str,
        controller_reply_url: str,
        *,
        location: str = DEFAULT_LOCATION,
        heartbeat_interval: float | None = 1.0,
        peer_init_url: str | None = None,
        port: int = 0,
        request_timeout: float = 5.0,
        sync_batch_size: int = 2000,
        sync_poll_interval: float = 0.05,
        sync_max_polls: int = 200,
    ) -> None:
        self.worker = worker
        self.instance_id = worker.instance_id
        self.worker_id = worker.worker_id
        self.location = location
        self.ip = LOOPBACK
        self.port = port
        self.peer_init_url = peer_init_url
        self._pull_url = _tcp(controller_pull_url)
        self._reply_url = _tcp(controller_reply_url)
        self.heartbeat_url: str | None = None
        self._hb_interval = heartbeat_interval
        self._timeout_ms = int(request_timeout * 1000)
        self._sync_batch_size = sync_batch_size
        self._sync_poll_interval = sync_poll_interval
        self._sync_max_polls = sync_max_polls

        self._lock = threading.Lock()
        self._queue: deque[tuple[str, list[KVOp]]] = deque()
        self._mirror: dict[str, dict[int, None]] = {}  # location -> keys reported as admitted
        self._seq: dict[str, int] = {}
        self._pending = 0  # ops queued but not yet pushed
        self._idle = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

        self._stop = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._register_requested = threading.Event()
        self._register_done = threading.Event()
        self._deregister_requested = threading.Event()
        self._deregister_done = threading.Event()
        self._closed = False

        # owned by the bridge thread
        self._ctx: zmq.Context[Any] | None = None
        self._push: zmq.Socket[Any] | None = None
        self._dealer: zmq.Socket[Any] | None = None
        self._hb: zmq.Socket[Any] | None = None
        self._rep: zmq.Socket[Any] | None = None
        self._hb_outstanding_since: float | None = None
        self._next_hb = 0.0
        self._sync: FullSync | None = None  # in-progress full sync
        self.full_syncs_completed = 0
        self.heartbeats_sent = 0

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x00")

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            self._open()
            self._register()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            self._close_sockets()
            return
        self._started.set()
        try:
            self._loop()
            if self._sync is None:
                self._flush_ops()
            if self._deregister_requested.is_set():
                self._send_push([DeRegisterMsg(self.instance_id, self.worker_id, self.ip, self.port)])
        except Exception:
            log.exception("lmcache worker bridge %s/%s crashed", self.instance_id, self.worker_id)
        finally:
            self._close_sockets()
            with self._idle:
                self._idle.notify_all()

    def _open(self) -> None:
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 1000)
        self._push.connect(self._pull_url)
        self._dealer = self._new_dealer(self._reply_url)
        self._rep = self._ctx.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        if self.port:
            self._rep.bind(f"tcp://{LOOPBACK}:{self.port}")
        else:
            self.port = self._rep.bind_to_random_port(f"tcp://{LOOPBACK}")

    def _new_dealer(self, url: str) -> zmq.Socket[Any]:
        assert self._ctx is not None
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        return sock

    def _close_sockets(self) -> None:
        for sock in (self._push, self._dealer, self._hb, self._rep):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close(linger=0 if sock is not self._push else 500)
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.term()

    def _request(self, msg: Msg) -> Any:
        """Synchronous DEALER request to the controller's reply port; recreates the socket on timeout."""
        assert self._dealer is not None
        self._dealer.send_multipart([b"", encode(msg)])
        if not self._dealer.poll(self._timeout_ms, zmq.POLLIN):
            self._dealer.close(linger=0)
            self._dealer = self._new_dealer(self._reply_url)
            raise TimeoutError(f"controller did not answer {type(msg).__name__}")
        return decode_reply(self._dealer.recv_multipart()[-1])

    def _register_msg(self) -> RegisterMsg:
        return RegisterMsg(self.instance_id, self.worker_id, self.ip, self.port, self.peer_init_url)

    def _register(self) -> None:
        ret = self._request(self._register_msg())
        if not isinstance(ret, RegisterRetMsg):
            raise RuntimeError(f"unexpected register reply {type(ret).__name__}")
        url = ret.extra_config.get("heartbeat_url")
        if url and self._hb is None and self._hb_interval:
            self.heartbeat_url = url
            self._hb = self._new_dealer(_tcp(url))
            self._next_hb = time.monotonic() + self._hb_interval

    def _loop(self) -> None:
        assert self._rep is not None
        poller = zmq.Poller()
        poller.register(self._rep, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        hb_registered: zmq.Socket[Any] | None = None
        while not self._stop.is_set():
            if self._hb is not hb_registered:
                if hb_registered is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(hb_registered)
                if self._hb is not None:
                    poller.register(self._hb, zmq.POLLIN)
                hb_registered = self._hb
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self._rep in events:
                self._serve_control()
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
            if self._hb is not None and self._hb in events:
                self._on_heartbeat_reply()
            if self._deregister_requested.is_set() and not self._stop.is_set():
                self._deregister_requested.clear()
                self._flush_ops()
                self._send_push([DeRegisterMsg(self.instance_id, self.worker_id, self.ip, self.port)])
                self._deregister_done.set()
            if self._register_requested.is_set():
                self._register_requested.clear()
                self._flush_ops()
                try:
                    self._register()
                    self._register_done.set()
                except Exception as exc:
                    log.warning("re-registration of %s/%s failed: %s", self.instance_id, self.worker_id, exc)
            if self._sync is None:
                self._flush_ops()
            self._timers()

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [now + 1.0]
        if self._hb is not None and self._hb_interval:
            due.append(self._next_hb)
        if self._sync is not None:
            due.append(self._sync.next_poll)
        return max(0, int((min(due) - now) * 1000))

    # ------------------------------------------------------------------ push
    def _send_push(self, msgs: Sequence[Msg]) -> None:
        assert self._push is not None
        if msgs:
            self._push.send_multipart([encode(m) for m in msgs])

    def _flush_ops(self) -> None:
        with self._lock:
            batches = list(self._queue)
            self._queue.clear()
            drained = self._pending
        if batches:
            self._send_push(op_batches(self.instance_id, self.worker_id, batches, self._seq))
        with self._idle:
            self._pending -= drained
            self._idle.notify_all()

    # ------------------------------------------------------------------ heartbeat + full sync
    def _timers(self) -> None:
        now = time.monotonic()
        if self._hb is not None and self._hb_interval and now >= self._next_hb:
            self._next_hb = now + self._hb_interval
            if self._hb_outstanding_since is not None and now - self._hb_outstanding_since > self._timeout_ms / 1000:
                self._hb.close(linger=0)  # lost reply: recreate, like LMCacheWorker
                assert self.heartbeat_url is not None
                self._hb = self._new_dealer(_tcp(self.heartbeat_url))
                self._hb_outstanding_since = None
            if self._hb_outstanding_since is None:
                msg = HeartbeatMsg(self.instance_id, self.worker_id, self.ip, self.port, self.peer_init_url)
                self._hb.send_multipart([b"", encode(msg)])
                self._hb_outstanding_since = now
                self.heartbeats_sent += 1
        if self._sync is not None and now >= self._sync.next_poll:
            self._poll_sync()

    def _on_heartbeat_reply(self) -> None:
        assert self._hb is not None
        try:
            ret = decode_reply(self._hb.recv_multipart()[-1])
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("undecodable heartbeat reply")
            return
        finally:
            self._hb_outstanding_since = None
        if isinstance(ret, HeartbeatRetMsg):
            for cmd in ret.commands:
                if isinstance(cmd, FullSyncCommand) and self._sync is None:
                    self._start_sync()

    def _start_sync(self) -> None:
        with self._lock:
            keys = list(self._mirror.get(self.location, {}))
        sync = FullSync(
            self.instance_id,
            self.worker_id,
            self.location,
            keys,
            self._sync_batch_size,
            poll_interval=self._sync_poll_interval,
            max_polls=self._sync_max_polls,
        )
        try:
            ret = self._request(sync.start_msg())
        except Exception as exc:
            log.warning("full sync start failed: %s", exc)
            return
        if not isinstance(ret, FullSyncStartRetMsg) or not ret.accepted:
            log.warning("full sync not accepted")
            return
        sync.started(time.monotonic())
        self._sync = sync
        self._send_push(sync.batch_msgs(range(sync.batch_count)))

    def _poll_sync(self) -> None:
        sync = self._sync
        assert sync is not None
        msg = sync.poll(time.monotonic())
        try:
            ret = self._request(msg)
        except Exception as exc:
            log.warning("full sync status failed: %s", exc)
            ret = None
        if isinstance(ret, FullSyncStatusRetMsg):
            if ret.is_complete:
                self._finish_sync(True)
                return
            if ret.missing_batches:
                self._send_push(sync.batch_msgs(list(ret.missing_batches)))
        if sync.exhausted:
            self._finish_sync(False)

    def _finish_sync(self, ok: bool) -> None:
        if ok:
            self.full_syncs_completed += 1
        else:
            log.warning("full sync of %s/%s did not complete", self.instance_id, self.worker_id)
        with self._idle:
            self._sync = None
            self._idle.notify_all()

    # ------------------------------------------------------------------ control requests
    def _serve_control(self) -> None:
        assert self._rep is not None
        raw = self._rep.recv()
        try:
            reply = dispatch_control(self.worker, decode_control(raw))
        except Exception as exc:
            reply = ErrorMsg(error=f"Worker error: {exc}")
        self._rep.send(encode(reply))
