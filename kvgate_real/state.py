"""What a real fleet's processes are, and its state file (``<run dir>/state.json``) that ``status``/``down`` read.

A run started by ``kvgate real up`` outlives that command: another process re-attaches from this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvgate_real.locations import FleetError
from kvgate_real.procs import pids_in_group, pids_with_tag


@dataclass
class ControllerInfo:
    pid: int
    port: int
    url: str
    monitor_ports: dict[str, int]
    log: str


@dataclass
class EngineInfo:
    index: int
    instance_id: str
    pid: int
    port: int
    url: str
    worker_port: int
    log: str
    lmcache_config: str
    home: str
    tmp_dir: str
    alive: bool = True
    kv_events: dict[str, Any] | None = None  # the --kv-events-config it was started with (None: off)
    # LMCache's internal API server of the engine's worker (``/metrics`` with the lmcache:* series); "" = off
    lmcache_api_url: str = ""


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def read_state_file(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FleetError(f"no state file {path}") from None
    return state


def live_pids_of_state(path: Path) -> list[int]:
    """Live processes of the run recorded in ``path`` (tagged or in its process groups); [] without a readable
    state file."""
    if not path.exists():
        return []
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    left = pids_with_tag(str(state.get("run_id", "")))
    for proc in [state.get("controller") or {}, *state.get("engines", [])]:
        if proc.get("pid"):
            left += pids_in_group(int(proc["pid"]))
    return left
