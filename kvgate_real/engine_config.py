"""What each process of a real fleet is started with: environment, command line, LMCache YAML, KV-event config.

Pure: builds dicts and argument lists from ports and options; starting the processes is :mod:`kvgate_real.fleet`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvgate_real.locations import CHUNK_SIZE, LOOPBACK, MODEL_NAME, RUN_TAG, SHIMS_DIR, model_dir, real_python, venv_dir


@dataclass
class Ports:
    """Every loopback port of one run, chosen before anything starts."""

    controller_http: int
    pull: int
    reply: int
    heartbeat: int
    gateway: int
    engines: list[tuple[int, int]] = field(default_factory=list)  # (http, worker)
    kv_events: int = 0  # the gateway's KV-event SUB port (engines connect their PUB to it); 0 = events off
    replay: list[int] = field(default_factory=list)  # per engine: vLLM's replay ROUTER port
    lmcache_api: list[int] = field(default_factory=list)  # per engine: LMCache internal API server port (metrics)


def base_env(run_id: str, home: Path, tmp_dir: Path) -> dict[str, str]:
    """The environment every process of the run shares: run tag, shims, offline switches, private caches under
    ``home`` and ``tmp_dir`` (the caller creates ``home/cache`` and ``tmp_dir``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    cache = home / "cache"
    env.update(
        {
            RUN_TAG: run_id,
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
    return env


def controller_monitor_ports(p: Ports) -> dict[str, int]:
    return {"pull": p.pull, "reply": p.reply, "heartbeat": p.heartbeat}


def controller_cmd(p: Ports) -> list[str]:
    """``lmcache_controller`` (LMCache's API server) on loopback, quick health checks so workers re-register."""
    return [
        str(real_python()), "-m", "lmcache.v1.api_server",
        "--host", LOOPBACK, "--port", str(p.controller_http),
        "--monitor-ports", json.dumps(controller_monitor_ports(p)),
        "--health-check-interval", "2", "--lmcache-worker-timeout", "6",
    ]  # fmt: skip


def lmcache_yaml(
    p: Ports,
    instance_id: str,
    worker_port: int,
    *,
    lmcache_cpu_gb: float,
    kv_events: bool,
    api_port: int = 0,
) -> dict[str, Any]:
    """The engine's ``LMCACHE_CONFIG_FILE``: CPU tier of ``lmcache_cpu_gb``, the controller's ports, its worker
    port; LMCache's KV events when ``kv_events``; its internal API server on ``api_port`` (0: off)."""
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
        "max_local_cpu_size": lmcache_cpu_gb,
        "enable_controller": True,
        "lmcache_instance_id": instance_id,
        "controller_pull_url": f"{LOOPBACK}:{p.pull}",
        "controller_reply_url": f"{LOOPBACK}:{p.reply}",
        "lmcache_worker_ports": [worker_port],
        "lmcache_worker_heartbeat_time": 2,
        "lmcache_worker_heartbeat_delay_time": 2,
        # LMCache 0.5.6: its stores ("cpu" BlockStored) join vLLM's KV-event stream (no removals in-process)
        **({"enable_kv_events": True} if kv_events else {}),
        **api,
    }


def vllm_kv_events(p: Ports, i: int, instance_id: str) -> dict[str, Any]:
    """vLLM's ``--kv-events-config`` for engine ``i``: a non-wildcard endpoint, so the engine connects its PUB
    to the gateway's bound SUB; one topic per engine; a replay ROUTER on its own loopback port."""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://{LOOPBACK}:{p.kv_events}",
        "topic": f"kv.{instance_id}",
        "replay_endpoint": f"tcp://{LOOPBACK}:{p.replay[i]}",
    }


def engine_env_overrides(i: int, lmcache_config: Path) -> dict[str, str]:
    """What engine ``i`` adds to :func:`base_env`: its LMCache config, KV space, OpenMP core, dev routes."""
    bind = os.environ.get("KVGATE_REAL_OMP_BIND", "spread")
    ncpu = os.cpu_count() or 1
    return {
        "LMCACHE_CONFIG_FILE": str(lmcache_config),
        "LMCACHE_DISABLE_BANNER": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("KVGATE_REAL_KVCACHE_GB", "1"),
        # "spread": engine i on core i % ncpu ("auto" would put every engine on core 0)
        "VLLM_CPU_OMP_THREADS_BIND": str(i % ncpu) if bind == "spread" else bind,
        "VLLM_HOST_IP": LOOPBACK,
        "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache
    }


def engine_cmd(http_port: int, kv_events: dict[str, Any] | None) -> list[str]:
    """vLLM-CPU's OpenAI server for the tiny model with the LMCache connector (and ``--kv-events-config``)."""
    cmd = [
        str(real_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir()), "--served-model-name", MODEL_NAME,
        "--host", LOOPBACK, "--port", str(http_port),
        "--max-model-len", "4096", "--dtype", "float32",
        "--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--kv-transfer-config", json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}),
    ]  # fmt: skip
    if kv_events is not None:
        cmd += ["--kv-events-config", json.dumps(kv_events)]
    return cmd
