"""Machine-wide registry of running real fleets: one at a time (2 cores, ~9 GB per fleet)."""

from __future__ import annotations

import contextlib
import fcntl
import json
from typing import Any

from kvgate_real.locations import REGISTRY_DIR
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
