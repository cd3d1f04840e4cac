"""When a real fleet is ready (reference real-vllm-lmcache-cpu.md §9), polled over HTTP and the processes' logs.

Controller HTTP up; every engine ``/health`` 200 with no ``degraded mode`` in its log; every instance in
``/controller/workers``; every engine out of LMCache freeze mode (its ``Entering/Exiting freeze mode`` log lines
balance) and a >=256-token probe prompt (ids from ``/tokenize``, so with the BOS) found by the controller's
``/lookup`` under that engine.

``controller_url`` arguments are read at each use (they raise :class:`FleetError` before the controller started).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kvgate_real.client import complete, http_json, tokenize, wait_for_lookup, workers
from kvgate_real.locations import CHUNK_SIZE, DEGRADED, ENTER_FREEZE, EXIT_FREEZE, FleetError
from kvgate_real.procs import _LogWatch, pid_alive, pids_in_group, rss_mb
from kvgate_real.state import ControllerInfo, EngineInfo


def wait_controller(controller: ControllerInfo, watches: Mapping[int, _LogWatch], deadline: float) -> None:
    """Until the controller answers ``/controller/key-stats``; fails when it exits or at ``deadline``."""
    pid = controller.pid
    while True:
        if not pid_alive(pid):
            raise FleetError(f"controller exited during startup:\n{watches[pid].tail()}")
        try:
            status, _ = http_json("GET", f"{controller.url}/controller/key-stats", timeout=3)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FleetError(f"controller HTTP not up in time:\n{watches[pid].tail()}")
        time.sleep(0.5)


def check_engine_log(eng: EngineInfo, watches: Mapping[int, _LogWatch]) -> None:
    """Fail fast when the engine exited or LMCache fell back to degraded mode (the CPU shim is not active)."""
    watch = watches[eng.pid]
    if not pid_alive(eng.pid):
        raise FleetError(f"{eng.instance_id} exited:\n{watch.tail()}")
    if watch.poll()[DEGRADED]:
        raise FleetError(f"{eng.instance_id}: LMCache is in degraded mode (shim not active?):\n{watch.tail()}")


def wait_engines_healthy(engines: Iterable[EngineInfo], watches: Mapping[int, _LogWatch], deadline: float) -> None:
    pending = [e for e in engines if e.alive]
    while pending:
        for eng in list(pending):
            check_engine_log(eng, watches)
            try:
                status, _ = http_json("GET", f"{eng.url}/health", timeout=3)
            except OSError:
                continue
            if status == 200:
                pending.remove(eng)
        if pending and time.monotonic() > deadline:
            raise FleetError(f"engines not healthy in time: {[e.instance_id for e in pending]}")
        if pending:
            time.sleep(1.0)


def freeze_exits(engines: Iterable[EngineInfo], watches: Mapping[int, _LogWatch]) -> dict[int, int]:
    """Per engine pid: how many times its log said it left LMCache freeze mode (full sync done)."""
    return {e.pid: watches[e.pid].poll()[EXIT_FREEZE] for e in engines if e.pid in watches}


def wait_registered(
    engines: Sequence[EngineInfo],
    watches: Mapping[int, _LogWatch],
    controller_url: Callable[[], str],
    deadline: float,
) -> None:
    """Until every live engine's instance id is in the controller's ``/controller/workers``."""
    want = {e.instance_id for e in engines if e.alive}
    got: set[str] = set()
    while True:
        for eng in engines:
            if eng.alive:
                check_engine_log(eng, watches)
        try:
            got = {str(w.get("instance_id")) for w in workers(controller_url())}
        except (OSError, FleetError):
            got = set()
        if want <= got:
            return
        if time.monotonic() > deadline:
            raise FleetError(f"instances not registered with the controller: {sorted(want - got)} (got {got})")
        time.sleep(0.5)


def probe_text(instance_id: str, run_id: str, counter: int) -> str:
    """A readiness probe prompt of well over :data:`CHUNK_SIZE` tokens, unique per engine, run and try."""
    words = " ".join(f"w{k * 7 + counter}" for k in range(320))
    return f"# readiness probe {instance_id} run {run_id} try {counter}\n{words}\n"


def wait_storing(
    eng: EngineInfo,
    watches: Mapping[int, _LogWatch],
    controller_url: Callable[[], str],
    deadline: float,
    min_exits: int,
    next_probe: Callable[[EngineInfo], str],
    log: Callable[[str], None],
) -> None:
    """Wait out freeze mode (log lines), then send probes until ``/lookup`` credits the engine.

    A full sync (freeze mode: stores are skipped) starts ~5 s after the first heartbeat, both at engine start
    and after a controller restart; wait until the log shows ``min_exits`` exits, or 20 s without a sync.
    """
    watch = watches.get(eng.pid)
    settle_until = time.monotonic() + 20.0
    while watch is not None:
        check_engine_log(eng, watches)
        counts = watch.poll()
        frozen = counts[ENTER_FREEZE] > counts[EXIT_FREEZE]
        if not frozen and (counts[EXIT_FREEZE] >= min_exits or time.monotonic() > settle_until):
            break
        if time.monotonic() > deadline:
            raise FleetError(f"{eng.instance_id} still in LMCache freeze mode:\n{watch.tail()}")
        time.sleep(0.5)
    while True:
        check_engine_log(eng, watches)
        prompt = next_probe(eng)
        ids = tokenize(eng.url, prompt)
        if len(ids) < CHUNK_SIZE or ids[0] != 0:
            raise FleetError(f"probe prompt has {len(ids)} ids (first {ids[:1]}); need >= {CHUNK_SIZE} with BOS 0")
        complete(eng.url, prompt, max_tokens=1)
        try:
            wait_for_lookup(controller_url(), ids, eng.instance_id, CHUNK_SIZE, timeout=4.0)
            return
        except FleetError:
            if time.monotonic() > deadline:
                raise
        log(f"{eng.instance_id}: probe not stored yet (freeze mode?); retrying")


def process_status(name: str, pid: int, health_url: str) -> dict[str, Any]:
    """One process group of the fleet for ``kvgate real status``: alive, members, RSS, health answered 200."""
    group = pids_in_group(pid)
    try:
        http_ok = http_json("GET", health_url, timeout=3)[0] == 200
    except OSError:
        http_ok = False
    return {
        "name": name,
        "pid": pid,
        "alive": pid_alive(pid),
        "group_pids": group,
        "rss_mb": rss_mb(group),
        "http_ok": http_ok,
    }
