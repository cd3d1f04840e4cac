"""Machine-wide registry of running real fleets: one at a time (2 cores, ~9 GB per fleet)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvgate_real.locations import REGISTRY_DIR, FleetError
from kvgate_real.procs import pid_alive, pids_in_group


# -- machine-wide registry: one real fleet at a time (2 cores, ~9 GB per fleet) --------------------------------------
@contextlib.contextmanager
def _registry_lock() -> Any:
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    with (REGISTRY_DIR / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _entry_live(entry: dict[str, Any]) -> bool:
    if pid_alive(int(entry.get("owner_pid", 0) or 0)) and entry.get("owner_holds", True):
        return True
    return any(pids_in_group(int(p)) for p in entry.get("root_pids", []))


def running_fleets() -> list[dict[str, Any]]:
    """Registered fleets of any checkout on this machine that still have live processes (stale entries removed)."""
    out = []
    for path in sorted(REGISTRY_DIR.glob("*.json")) if REGISTRY_DIR.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _entry_live(entry):
            out.append(entry)
        else:
            path.unlink(missing_ok=True)
    return out


def entry_path(run_id: str) -> Path:
    return REGISTRY_DIR / f"{run_id}.json"


def write_entry(entry: dict[str, Any]) -> None:
    """Record (or update) a fleet: ``run_id``, ``run_dir``, ``owner_pid``, ``owner_holds``, ``root_pids``."""
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    path = entry_path(str(entry["run_id"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    tmp.replace(path)


def claim(run_id: str, wait: float, entry: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
    """Claim the machine-wide slot for ``run_id`` (writing ``entry()``); wait (polling) while another live fleet
    holds it; :class:`FleetError` after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        with _registry_lock():
            others = [e for e in running_fleets() if e.get("run_id") != run_id]
            if not others:
                write_entry(entry())
                return
        if time.monotonic() > deadline:
            raise FleetError(
                f"another real fleet is running on this machine: {others}; "
                f"stop it (kvgate real --run-dir DIR down) or wait"
            )
        if not announced:
            log(f"waiting up to {wait:.0f} s for another real fleet to stop: {[e.get('run_dir') for e in others]}")
            announced = True
        time.sleep(5.0)
