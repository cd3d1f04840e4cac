"""Routers run as subprocesses: external peers, and kvgate itself (TEST AND BENCHMARK TOOL).

Only ``vllm-router`` (PyPI ``vllm-router``: a Python launcher around a Rust router) is supported. It is an
optional peer: :func:`find_peer` returns ``None`` when it is not installed and the runner skips its modes
with a message. A started peer lives in its own process group on 127.0.0.1 and is always killed (SIGTERM,
then SIGKILL) by :meth:`PeerRouter.stop`, also when startup fails. :func:`start_gateway_process` runs
``kvgate serve`` the same way, so the gateway under test gets its own process like the peer does.
Logs and temporary config files are removed on a clean stop (kept when startup fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SUPPORTED_PEERS = ("vllm-router",)


def which(binary: str) -> str | None:
    """``shutil.which`` that also looks next to the running interpreter (a venv's ``bin``)."""
    local = Path(sys.executable).parent / binary
    if local.is_file():
        return str(local)
    return shutil.which(binary)


def find_peer(name: str) -> str | None:
    """Path of the peer's executable, or ``None`` when it is not installed (or not a supported peer)."""
    if name not in SUPPORTED_PEERS:
        return None
    return which(name)


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port free right now on ``host`` (the peer binds it itself, so there is a tiny race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class PeerRouter:
    """A running peer router subprocess."""

    name: str
    policy: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    admin_url: str | None = None
    _stopped: bool = field(default=False, repr=False)
    _cleanup: list[Path] = field(default_factory=list, repr=False)

    async def stop(self, grace_s: float = 3.0) -> None:
        """Terminate the whole process group; SIGKILL after ``grace_s``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.to_thread(_kill_group, self.process, grace_s)
        for path in self._cleanup:
            with contextlib.suppress(OSError):
                path.unlink()

    def log_tail(self, n: int = 20) -> str:
        """Last ``n`` lines of the peer's log (for error messages)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
    else:  # the launcher exited; make sure nothing it spawned survives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def vllm_router_argv(binary: str, port: int, worker_urls: list[str], policy: str, metrics_port: int) -> list[str]:
    """Command line of ``vllm-router`` on loopback (prometheus exporter on loopback too)."""
    return [
        binary,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(metrics_port),
        "--log-level", "warning",
    ]  # fmt: skip


async def start_peer(
    name: str, policy: str, worker_urls: list[str], *, ready_timeout: float = 60.0, log_dir: Path | None = None
) -> PeerRouter:
    """Start peer ``name`` with ``policy`` in front of ``worker_urls``; returns once ``/health`` answers 200."""
    binary = find_peer(name)
    if binary is None:
        raise FileNotFoundError(f"peer {name!r} is not installed")
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"kvgate-bench-{name}-{policy}-{os.getpid()}-{port}.log"
    argv = vllm_router_argv(binary, port, worker_urls, policy, metrics_port)
    with log_path.open("wb") as log_fh:
        proc = subprocess.Popen(  # noqa: ASYNC220 - non-blocking spawn, the wait is async below
            argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    peer = PeerRouter(name, policy, f"http://127.0.0.1:{port}", proc, log_path, metrics_port, _cleanup=[log_path])
    try:
        await _wait_ready(peer, ready_timeout)
    except BaseException:
        peer._cleanup.clear()  # keep the log of a failed start
        await peer.stop()
        raise
    return peer


async def start_gateway_process(
    config: dict[str, Any], *, ready_timeout: float = 30.0, log_dir: Path | None = None
) -> PeerRouter:
    """Run ``kvgate serve`` on ``config`` in its own process (group) on 127.0.0.1, ephemeral ports.

    Gives the gateway its own interpreter and event loop, as in a deployment, instead of sharing the
    benchmark process with the simulated fleet and the client; the peer router gets the same treatment.
    """
    port, admin_port = free_port(), free_port()
    while admin_port == port:
        admin_port = free_port()
    log_dir = log_dir or Path(tempfile.gettempdir())
    stem = f"kvgate-bench-gateway-{os.getpid()}-{port}"
    cfg_path = log_dir / f"{stem}.json"
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    log_path = log_dir / f"{stem}.log"
    argv = [
        sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg_path), "--host", "127.0.0.1",
        "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin_port), "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as log_fh:
        proc = subprocess.Popen(  # noqa: ASYNC220 - non-blocking spawn, the wait is async below
            argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    gw = PeerRouter("kvgate", "serve", f"http://127.0.0.1:{port}", proc, log_path, admin_port,
                    admin_url=f"http://127.0.0.1:{admin_port}", _cleanup=[cfg_path, log_path])  # fmt: skip
    try:
        await _wait_ready(gw, ready_timeout, path="/readyz", base=gw.admin_url)
    except BaseException:
        gw._cleanup.remove(log_path)  # keep the log of a failed start
        await gw.stop()
        raise
    return gw


async def _wait_ready(peer: PeerRouter, limit_s: float, path: str = "/health", base: str | None = None) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            if peer.process.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {peer.process.returncode}:\n{peer.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get((base or peer.url) + path) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{peer.name} not ready after {limit_s:.0f}s:\n{peer.log_tail()}")
            await asyncio.sleep(0.1)
