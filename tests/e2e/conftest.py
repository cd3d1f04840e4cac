"""The one place where the e2e tests of issue 10 (bad input, chaos) touch the simulator package."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

SIM_MODULE = "kvgate.cli"  # `python -m kvgate.cli sim ...` starts a simulated fleet in its own process


@pytest.fixture
async def sim_fleet() -> AsyncIterator[Any]:
    """An in-process simulated fleet (2 engines + controller), fast time scale."""
    from kvgate_sim.fleet import start_fleet

    f = await start_fleet(2, time_scale=0.02)
    try:
        yield f
    finally:
        await f.stop()


@dataclass
class SimProcess:
    """One `kvgate sim` process: its engines and (optionally) its controller."""

    proc: subprocess.Popen[bytes]
    config: dict[str, Any]

    @property
    def engines(self) -> list[tuple[str, int]]:
        return [(e["id"], int(e["socket_address"]["port"])) for e in self.config["clusters"][0]["endpoints"]]

    @property
    def controller_url(self) -> str:
        kv = self.config["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]
        return str(kv["config"]["lmcache_endpoint"]) if kv["name"] == "dgp.filter.ai.kvcache" else ""

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)


@dataclass
class SimProcesses:
    tmp: Path
    started: list[SimProcess] = field(default_factory=list)

    def start(self, *args: str, timeout_s: float = 60.0) -> SimProcess:
        out = self.tmp / f"sim-{len(self.started)}.yaml"
        cmd = [sys.executable, "-m", SIM_MODULE, "sim", "--time-scale", "0.02", "--config-out", str(out), *args]
        log = self.tmp / f"sim-{len(self.started)}.log"
        with log.open("wb") as sink:  # a file, not a pipe: nobody reads it while the test runs
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        cfg: Any = None
        while not (isinstance(cfg, dict) and "clusters" in cfg):  # written once the servers listen
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise RuntimeError(f"kvgate sim did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
            with contextlib.suppress(OSError, yaml.YAMLError):
                cfg = yaml.safe_load(out.read_text())
        sp = SimProcess(proc, cfg)
        self.started.append(sp)
        return sp

    def stop(self) -> None:
        for sp in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sp.proc.pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                sp.proc.terminate()
        for sp in self.started:
            try:
                sp.proc.wait(10)
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait(5)


@pytest.fixture
def sim_processes(tmp_path: Path) -> Iterator[SimProcesses]:
    """`kvgate sim` fleets as separate processes (for SIGKILL / SIGSTOP); always stopped."""
    procs = SimProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()
