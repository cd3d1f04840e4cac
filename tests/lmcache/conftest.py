"""Real LMCache 0.5.6 controller tier: one controller process per session, always stopped.

Without the controller venv the tier is skipped (run ``scripts/setup-lmcache.sh``) unless
``KVGATE_REQUIRE_LMCACHE=1`` (CI), in which case it fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvgate_sim.lmcache_real import RealController, http_json, lmcache_available, lmcache_venv, start_real_controller
from kvgate_sim.lmcache_worker import LMCacheWorkerBridge
from kvgate_sim.protocol import DEFAULT_LOCATION, KVOp, lmcache_chunk_hashes

SETUP_HINT = "scripts/setup-lmcache.sh"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.lmcache)


def require_lmcache() -> None:
    if lmcache_available():
        return
    msg = f"real LMCache controller venv not found at {lmcache_venv()}: run {SETUP_HINT}"
    if os.environ.get("KVGATE_REQUIRE_LMCACHE") == "1":
        pytest.fail(msg + " (KVGATE_REQUIRE_LMCACHE=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def real_ctl() -> Iterator[RealController]:
    require_lmcache()
    ctl = start_real_controller()
    try:
        yield ctl
    finally:
        ctl.stop()


def api(ctl: RealController, path: str, body: Any = None) -> tuple[int, Any]:
    return http_json(ctl.url + path, body)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


_SENTINEL_SEQ = [0]


def barrier(ctl: RealController, bridge: LMCacheWorkerBridge) -> None:
    """Wait until the controller has processed every op this (registered) bridge pushed so far.

    A unique sentinel chunk is admitted behind those ops on the same PUSH socket, observed via
    ``/lookup``, then evicted again (and that is observed too)."""
    _SENTINEL_SEQ[0] += 1
    tokens = [900_000_000 + _SENTINEL_SEQ[0]] * 256
    key = lmcache_chunk_hashes(tokens)[0]
    expect = {bridge.instance_id: [DEFAULT_LOCATION, 256]}
    bridge.op_sink(bridge.instance_id, bridge.worker_id, DEFAULT_LOCATION, [KVOp("admit", key)])
    wait_until(lambda: api(ctl, "/lookup", {"tokens": tokens})[1]["layout_info"] == expect, what="sentinel admit")
    bridge.op_sink(bridge.instance_id, bridge.worker_id, DEFAULT_LOCATION, [KVOp("evict", key)])
    wait_until(lambda: api(ctl, "/lookup", {"tokens": tokens})[1]["layout_info"] == {}, what="sentinel evict")


def wait_deregistered(ctl: RealController, instance_id: str, worker_id: int) -> None:
    def gone() -> bool:
        _, body = api(ctl, "/query_worker_info", {"instance_id": instance_id})
        return all(w["worker_id"] != worker_id for w in body["worker_infos"])

    wait_until(gone, what=f"deregistration of {instance_id}/{worker_id}")
