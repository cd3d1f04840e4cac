"""Controller → worker commands of the LMCache 0.5.6 worker bridge, and its in-process peers (SIMULATOR).

:func:`dispatch_control` answers one decoded control request (``Clear/Pin/Compress/Decompress/Health/
MoveWorkerMsg``) by calling a :class:`~kvgate_sim.protocol.WorkerControl` and returns the reply message:
``*WorkerRetMsg{num_tokens}``, ``HealthWorkerRetMsg{error_code}`` or ``ErrorMsg{error}``. ``/move`` works
between bridges of this process that registered their ``peer_init_url`` here (:func:`register_peer`): the
destination is found by that URL and the chunks move in-process. No sockets: the bridge
(:mod:`kvgate_sim.lmcache_bridge_thread`) receives and sends.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from kvgate_sim.controller_core import move_tokens
from kvgate_sim.lmcache_wire import (
    ClearWorkerMsg,
    ClearWorkerRetMsg,
    CompressWorkerMsg,
    CompressWorkerRetMsg,
    DecompressWorkerMsg,
    DecompressWorkerRetMsg,
    ErrorMsg,
    HealthWorkerMsg,
    HealthWorkerRetMsg,
    MoveWorkerMsg,
    MoveWorkerRetMsg,
    Msg,
    PinWorkerMsg,
    PinWorkerRetMsg,
)
from kvgate_sim.protocol import WorkerControl


class Peer(Protocol):
    """What the peer registry keeps: anything with the ``worker`` it controls (a bridge)."""

    @property
    def worker(self) -> WorkerControl: ...


# peer_init_url -> bridge, for in-process /move between bridges
_PEERS: dict[str, Peer] = {}
_PEERS_LOCK = threading.Lock()


def register_peer(url: str, peer: Peer) -> None:
    """Make ``peer`` the in-process ``/move`` destination for ``url``."""
    with _PEERS_LOCK:
        _PEERS[url] = peer


def unregister_peer(url: str, peer: Peer) -> None:
    """Forget ``url`` if it still points at ``peer``."""
    with _PEERS_LOCK:
        if _PEERS.get(url) is peer:
            del _PEERS[url]


def dispatch_control(w: WorkerControl, req: Any) -> Msg:
    """The reply to the control request ``req`` for worker ``w`` (exceptions are the caller's ``ErrorMsg``)."""
    if isinstance(req, ClearWorkerMsg):
        return ClearWorkerRetMsg(int(w.clear(req.location)))
    if isinstance(req, PinWorkerMsg):
        return PinWorkerRetMsg(int(w.pin(req.tokens, req.location)))
    if isinstance(req, CompressWorkerMsg):
        return CompressWorkerRetMsg(int(w.compress(req.tokens or [], req.location, req.method)))
    if isinstance(req, DecompressWorkerMsg):
        return DecompressWorkerRetMsg(int(w.decompress(req.tokens or [], req.location, req.method)))
    if isinstance(req, HealthWorkerMsg):
        return HealthWorkerRetMsg(int(w.health()))
    if isinstance(req, MoveWorkerMsg):
        with _PEERS_LOCK:
            dst = _PEERS.get(req.new_position[0])
        if dst is None:
            raise RuntimeError(f"no in-process peer at {req.new_position[0]}")
        n = move_tokens(w, dst.worker, req.tokens or [], req.old_position, req.new_position[1], bool(req.copy))
        return MoveWorkerRetMsg(n)
    return ErrorMsg(error=f"Unknown message: {req}")
