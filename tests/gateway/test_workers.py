"""`kvgate serve --workers 2` as a real process: both workers serve the one port, /metrics adds them up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.mmap_dict import MmapedDict

from .conftest import Upstreams, gateway_config

N_REQUESTS = 40


async def _read_ready(proc: asyncio.subprocess.Process) -> tuple[str, str, list[int]]:
    url = admin = ""
    pids: list[int] = []
    assert proc.stdout is not None
    while not (url and admin and pids):
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "kvgate serve --workers exited before it was ready"
        if "listening on" in line:
            url = line.rsplit(" ", 1)[1].strip()
        if "admin on" in line:
            admin = line.split("admin on ", 1)[1].split(" ", 1)[0]
        if "workers (pids" in line:
            pids = [int(p) for p in re.findall(r"\d+", line.split("pids", 1)[1])]
    return url, admin, pids


def _requests_by_pid(prom_dir: Path) -> dict[int, float]:
    """kvgate_requests_total (status 200) per worker, read from each worker's own multiprocess file."""
    out: dict[int, float] = {}
    for f in prom_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(f)):
            _metric, name, labels, _help = json.loads(key)
            if name == "kvgate_requests_total" and labels.get("status") == "200":
                out[pid] = out.get(pid, 0.0) + value
    return out


async def test_two_workers_share_the_port_and_metrics_add_up(upstreams: Upstreams, tmp_path: Path) -> None:
    a = await upstreams.add("a")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config([a])))
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {**os.environ, "KVGATE_ADMIN_PORT": "0", "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    argv = [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg), "--port", "0", "--workers", "2"]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--log-level", "warning", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        url, admin, pids = await _read_ready(proc)
        assert len(set(pids)) == 2
        # a new connection per request: SO_REUSEPORT spreads connections (not requests) over the workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(N_REQUESTS):
                async with s.post(f"{url}/v1/completions", json={"prompt": "x"}) as r:
                    assert r.status == 200
                    await r.read()
            # a worker counts a request after its last byte went out: wait (bounded) for the last count
            for _ in range(100):
                by_pid = _requests_by_pid(prom_dir)
                if sum(by_pid.values()) >= N_REQUESTS:
                    break
                await asyncio.sleep(0.05)
            assert set(by_pid) == set(pids), by_pid  # both workers served requests
            assert sum(by_pid.values()) == N_REQUESTS
            # every scrape, whichever worker answers it, reports the sum over both workers
            pattern = re.compile(r'^kvgate_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', re.M)
            for _ in range(6):
                async with s.get(f"{admin}/metrics") as r:
                    assert r.status == 200
                    text = await r.text()
                assert [float(v) for v in pattern.findall(text)] == [float(N_REQUESTS)]
                healthy_pids = set(re.findall(r'kvgate_endpoint_healthy\{[^}]*pid="(\d+)"', text))
                assert healthy_pids == {str(p) for p in pids}  # per-worker gauge: one series per worker
            async with s.get(f"{admin}/readyz") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        for pid in pids:  # the workers are gone too
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"worker {pid} still running after the supervisor exited")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor stops its workers
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()  # the workers notice a dead supervisor within a second and stop themselves
                await proc.wait()


def test_workers_must_be_positive(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config([("a", 8000)])))
    r = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--workers" in r.stderr and "at least 1" in r.stderr
