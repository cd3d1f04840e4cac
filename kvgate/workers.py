"""``kvgate serve --workers N``: N gateway processes sharing the listener and admin ports (SO_REUSEPORT).

Each worker is a whole gateway in its own process: its own token cache, breakers, outlier ejections, health
checks and upstream connection pools (nothing is shared; a breaker opens per worker). The kernel spreads new
client connections over the workers' listening sockets. Metrics use prometheus_client's multiprocess mode:
this supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (or uses the one set in the
environment), every worker writes its values there, and ``/metrics`` of whichever worker answers reports
counters and histograms summed over all workers; ``kvgate_endpoint_in_flight`` is summed over live workers and
per-worker gauges (``kvgate_endpoint_healthy``, the kvcache filter's gauges) carry a ``pid`` label.

The supervisor forwards SIGTERM/SIGINT to the workers (each drains its own connections) and stops all workers
when one of them exits (no restart: run it under a process manager that restarts kvgate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from kvgate.config import GatewayConfig
from kvgate.gctune import DEFAULT_GEN0_THRESHOLD, tune_for_serving
from kvgate.metrics import MULTIPROC_ENV

log = logging.getLogger("kvgate.workers")


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker serves (ports resolved by the supervisor: never 0 here)."""

    config_path: str
    host: str | None
    port: int
    admin_host: str
    admin_port: int
    log_level: str
    drain_timeout: float
    gc_threshold: int = DEFAULT_GEN0_THRESHOLD


@dataclass(frozen=True)
class Addresses:
    listeners: list[tuple[str, int]]
    admin: tuple[str, int]


def _worker_main(spec: WorkerSpec, events: Any) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter that imports prometheus_client after
    ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    from kvgate.app import serve_forever, start_gateway
    from kvgate.config import load_config
    from kvgate.errors import ConfigError
    from kvgate.serving import run_async, setup_logging

    setup_logging(spec.log_level)

    async def main() -> None:
        running = await start_gateway(
            load_config(spec.config_path),
            host=spec.host,
            port=spec.port,
            admin_host=spec.admin_host,
            admin_port=spec.admin_port,
            log_level="warning",
            drain_timeout=spec.drain_timeout,
            reuse_port=True,
        )
        tune_for_serving(spec.gc_threshold)
        events.put(("ready", os.getpid(), ""))
        watch = asyncio.create_task(_watch_supervisor(os.getppid()))
        try:
            await serve_forever(running, spec.drain_timeout)
        finally:
            watch.cancel()

    try:
        run_async(main())
    except ConfigError as exc:
        events.put(("config_error", os.getpid(), str(exc)))
        sys.exit(2)
    except OSError as exc:
        events.put(("bind_error", os.getpid(), str(exc)))
        sys.exit(1)


async def _watch_supervisor(ppid: int, every: float = 1.0) -> None:
    """A worker whose supervisor died (SIGKILL, crash) stops itself: drains like on SIGTERM."""
    while True:
        await asyncio.sleep(every)
        if os.getppid() != ppid:
            break
    log.warning("supervisor %d is gone: stopping this worker", ppid)
    os.kill(os.getpid(), signal.SIGTERM)


def resolve_addresses(
    cfg: GatewayConfig, host: str | None, port: int | None, admin_host: str | None, admin_port: int | None
) -> tuple[Addresses, list[socket.socket]]:
    """Every listener's and the admin's (host, port); an ephemeral port (0) is reserved here so that all
    workers bind the same number. Returns the reservation sockets (keep them open while the workers run)."""
    from kvgate.serving import reserve_port

    held: list[socket.socket] = []

    def fixed(h: str, p: int) -> int:
        if p != 0:
            return p
        sock = reserve_port(h)
        held.append(sock)
        return int(sock.getsockname()[1])

    listeners = []
    for i, lst in enumerate(cfg.listeners):
        addr = lst.address.socket_address
        h = host if host is not None else addr.address
        p = port if (port is not None and i == 0) else addr.port
        listeners.append((h, fixed(h, p)))
    ah = admin_host or cfg.admin.address
    ap = admin_port if admin_port is not None else cfg.admin.port
    return Addresses(listeners, (ah, fixed(ah, ap))), held


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_workers(
    cfg: GatewayConfig,
    *,
    config_path: str,
    workers: int,
    host: str | None,
    port: int | None,
    admin_host: str | None,
    admin_port: int | None,
    log_level: str,
    drain_timeout: float,
    ready_timeout: float = 60.0,
    gc_threshold: int = DEFAULT_GEN0_THRESHOLD,
) -> int:
    """Run ``workers`` gateway processes until SIGTERM/SIGINT; the exit code of ``kvgate serve``."""
    from kvgate import __version__

    if any(lst.address.socket_address.port == 0 for lst in cfg.listeners[1:]):
        print(
            "kvgate: invalid config: with --workers every listener after the first needs a fixed port", file=sys.stderr
        )
        return 2
    created: str | None = None
    if not os.environ.get(MULTIPROC_ENV):
        created = tempfile.mkdtemp(prefix="kvgate-metrics-")
        os.environ[MULTIPROC_ENV] = created
    elif os.listdir(os.environ[MULTIPROC_ENV]):
        log.warning("%s is not empty: values of earlier runs are added to /metrics", MULTIPROC_ENV)
    addrs, held = resolve_addresses(cfg, host, port, admin_host, admin_port)
    spec = WorkerSpec(
        config_path, host, addrs.listeners[0][1], addrs.admin[0], addrs.admin[1], log_level, drain_timeout, gc_threshold
    )
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(spec, events), name=f"kvgate-worker-{i}") for i in range(workers)]
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        for p in procs:
            p.start()
        rc = _wait_ready(procs, events, workers, ready_timeout, lambda: stop)
        if rc == 0 and not stop:
            for h, p_ in addrs.listeners:
                print(f"kvgate {__version__}: listening on {_url(h, p_)}", flush=True)
            print(f"kvgate: admin on {_url(*addrs.admin)} (/metrics /healthz /readyz /config)", flush=True)
            print(f"kvgate: {workers} workers (pids {', '.join(str(p.pid) for p in procs)})", flush=True)
            while not stop:
                ended = wait([p.sentinel for p in procs], timeout=0.5)
                dead = [p for p in procs if p.sentinel in ended]
                if dead and not stop:  # (a signal to the whole process group stops the workers first)
                    log.error("worker %s exited (code %s): stopping the other workers", dead[0].pid, dead[0].exitcode)
                    rc = 1
                    break
    finally:
        _stop_all(procs, drain_timeout)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sock in held:
            sock.close()
        _metrics_cleanup(procs, created)
    return rc


def _wait_ready(procs: list[Any], events: Any, workers: int, limit: float, stopping: Any) -> int:
    ready = 0
    deadline = time.monotonic() + limit
    while ready < workers:
        if stopping():
            return 0
        try:
            kind, pid, detail = events.get(timeout=0.2)
        except Exception:  # queue.Empty
            if any(p.exitcode is not None for p in procs):
                print("kvgate: a worker exited during start-up", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"kvgate: workers not ready within {limit:g}s", file=sys.stderr)
                return 1
            continue
        if kind == "ready":
            ready += 1
        elif kind == "config_error":
            print(f"kvgate: invalid config: {detail}", file=sys.stderr)
            return 2
        else:
            print(f"kvgate: cannot bind: {detail} (worker {pid})", file=sys.stderr)
            return 1
    return 0


def _stop_all(procs: list[Any], drain_timeout: float) -> None:
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout + 5.0
    for p in procs:
        if p.pid is not None:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


def _metrics_cleanup(procs: list[Any], created: str | None) -> None:
    from prometheus_client import multiprocess

    path = os.environ.get(MULTIPROC_ENV)
    if path and created is None:  # a directory of the operator's: drop the live gauges of our dead workers
        for p in procs:
            if p.pid is not None:
                with contextlib.suppress(OSError):
                    multiprocess.mark_process_dead(p.pid, path)  # type: ignore[no-untyped-call]
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
