"""The processes of a real fleet: start the controller and the engines (ports, environment, LMCache YAML, logs),
find every process of the run, kill process groups, and the machine-wide registry entry.

:class:`FleetProcesses` is the base of :class:`kvgate_real.fleet.RealFleet`, which adds the lifecycle (start, wait
until ready, stop), the state file and the kvgate config.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from kvgate_real import engine_config, readiness, registry
from kvgate_real.engine_config import Ports
from kvgate_real.locations import LOOPBACK, FleetError
from kvgate_real.procs import (
    _LogWatch,
    is_loopback_address,
    kill_group,
    listeners,
    pids_in_group,
    pids_with_tag,
    spawn_logged,
)
from kvgate_real.state import ControllerInfo, EngineInfo


def _say(msg: str) -> None:
    print(f"[real-fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class FleetProcesses:
    """Starts and kills the processes of one run; :class:`~kvgate_real.fleet.RealFleet` sets every attribute."""

    run_dir: Path
    run_id: str
    verbose: bool
    kv_events: bool
    lmcache_cpu_gb: float
    prometheus_multiproc: bool
    controller: ControllerInfo | None
    engines: list[EngineInfo]
    _ports: Ports | None
    _procs: dict[int, subprocess.Popen[bytes]]
    _watches: dict[int, _LogWatch]
    _extra_tmp: list[str]  # short TMPDIRs outside the run dir, removed by stop()

    def _write_state(self) -> None:
        """Record the fleet in its state file (RealFleet); called as soon as a process started."""
        raise NotImplementedError

    def _log(self, msg: str) -> None:
        if self.verbose:
            _say(msg)

    # -- machine-wide registry (kvgate_real.registry) --------------------------------------------------------------
    @property
    def _registry_entry(self) -> Path:
        return registry.entry_path(self.run_id)

    def _register(self, wait: float) -> None:
        """Claim the machine-wide slot; wait (polling) while another live fleet holds it."""
        registry.claim(self.run_id, wait, lambda: self._registry_record(owner_holds=True), self._log)

    def _registry_record(self, owner_holds: bool) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "owner_pid": os.getpid(),
            "owner_holds": owner_holds,
            "root_pids": self.root_pids(),
        }

    def _update_registry(self, owner_holds: bool = True) -> None:
        registry.write_entry(self._registry_record(owner_holds))

    def release(self) -> None:
        """Hand the fleet over to its processes (CLI ``up`` exits while the fleet keeps running)."""
        self._update_registry(owner_holds=False)

    # -- start processes -------------------------------------------------------------------------------------------
    def _base_env(self, home: Path, tmp_dir: Path) -> dict[str, str]:
        env = engine_config.base_env(self.run_id, home, tmp_dir)
        for d in (home / "cache", tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        return env

    def _private_tmp(self, home: Path, tag: str) -> Path:
        """TMPDIR under the run dir, unless that path is too long for vLLM's ``ipc://`` sockets (108-byte limit)."""
        tmp = home / "tmp"
        if len(str(tmp)) <= 60:
            return tmp
        short = Path(tempfile.mkdtemp(prefix=f"kvgate-real-{self.run_id[:8]}-{tag}-"))
        self._extra_tmp.append(str(short))
        return short

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, fresh_log: bool) -> int:
        proc = spawn_logged(name, cmd, env, log_path, self.run_dir, fresh_log)
        self._procs[proc.pid] = proc
        self._watches[proc.pid] = _LogWatch(log_path)
        if self._registry_entry.exists():
            self._update_registry()
        self._log(f"started {name} pid {proc.pid} (log {log_path})")
        return proc.pid

    def _start_controller(self, fresh_log: bool) -> None:
        assert self._ports is not None
        p = self._ports
        home = self.run_dir / "controller"
        env = self._base_env(home, self._private_tmp(home, "ctl"))
        cmd = engine_config.controller_cmd(p)
        log = self.run_dir / "logs" / "controller.log"
        pid = self._spawn("controller", cmd, env, log, fresh_log)
        self.controller = ControllerInfo(
            pid=pid,
            port=p.controller_http,
            url=f"http://{LOOPBACK}:{p.controller_http}",
            monitor_ports=engine_config.controller_monitor_ports(p),
            log=str(log),
        )
        self._write_state()  # early, so `down` finds a half-started fleet too

    def _wait_controller(self, deadline: float) -> None:
        assert self.controller is not None
        readiness.wait_controller(self.controller, self._watches, deadline)

    def _engine_yaml(self, instance_id: str, worker_port: int, api_port: int = 0) -> dict[str, Any]:
        assert self._ports is not None
        return engine_config.lmcache_yaml(
            self._ports,
            instance_id,
            worker_port,
            lmcache_cpu_gb=self.lmcache_cpu_gb,
            kv_events=self.kv_events,
            api_port=api_port,
        )

    def _engine_kv_events(self, i: int, instance_id: str) -> dict[str, Any] | None:
        """vLLM's ``--kv-events-config`` for engine ``i`` (None when events are off)."""
        p = self._ports
        if not self.kv_events or p is None or not p.kv_events:
            return None
        return engine_config.vllm_kv_events(p, i, instance_id)

    def _start_engine(self, i: int) -> None:
        assert self._ports is not None
        http, worker = self._ports.engines[i]
        instance_id = f"engine-{i}"
        home = self.run_dir / instance_id
        home.mkdir(parents=True, exist_ok=True)
        cfg_path = home / "lmcache.yaml"
        api_port = self._ports.lmcache_api[i] if self._ports.lmcache_api else 0
        cfg_path.write_text(yaml.safe_dump(self._engine_yaml(instance_id, worker, api_port), sort_keys=False))
        tmp_dir = self._private_tmp(home, f"e{i}")
        env = self._base_env(home, tmp_dir)
        env.update(engine_config.engine_env_overrides(i, cfg_path))
        if self.prometheus_multiproc:
            prom = home / "prometheus"
            shutil.rmtree(prom, ignore_errors=True)  # prometheus_client needs an empty dir per run
            prom.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        kv_events = self._engine_kv_events(i, instance_id)
        cmd = engine_config.engine_cmd(http, kv_events)
        log = self.run_dir / "logs" / f"{instance_id}.log"
        pid = self._spawn(instance_id, cmd, env, log, fresh_log=True)
        self.engines.append(
            EngineInfo(
                index=i,
                instance_id=instance_id,
                pid=pid,
                port=http,
                url=f"http://{LOOPBACK}:{http}",
                worker_port=worker,
                log=str(log),
                lmcache_config=str(cfg_path),
                home=str(home),
                tmp_dir=str(tmp_dir),
                kv_events=kv_events,
                lmcache_api_url=f"http://{LOOPBACK}:{api_port}" if api_port else "",
            )
        )
        self._write_state()

    # -- kill ------------------------------------------------------------------------------------------------------
    def _reap(self, pid: int) -> None:
        proc = self._procs.get(pid)
        if proc is not None:
            proc.poll()

    def _kill_group(self, pgid: int, name: str, first_signal: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """Signal the process group; escalate to SIGKILL after ``grace`` seconds; wait until it is empty."""
        kill_group(pgid, name, self._reap, self._log, first_signal=first_signal, grace=grace)

    # -- the run's processes -------------------------------------------------------------------------------------
    def root_pids(self) -> list[int]:
        """The process-group leaders this fleet started (controller, engines)."""
        return ([self.controller.pid] if self.controller else []) + [e.pid for e in self.engines]

    def fleet_pids(self) -> set[int]:
        """Every live process of the fleet: members of its process groups plus anything carrying the run tag.

        Both are needed: vLLM's children call ``setproctitle``, which overwrites ``/proc/<pid>/environ`` (the tag
        disappears), while a child that called ``setsid`` would leave the group.
        """
        pids = set(pids_with_tag(self.run_id))
        for pgid in self.root_pids():
            pids.update(pids_in_group(pgid))
        return pids

    def _check_loopback(self) -> None:
        rows = listeners(self.fleet_pids())
        if rows is None:
            self._log("ss not found; loopback check skipped")
            return
        bad = [r for r in rows if not is_loopback_address(r[1])]
        if bad:
            raise FleetError(f"non-loopback listeners: {bad}")
        self._log(f"loopback check: {len(rows)} listening sockets, all on 127.0.0.1")
