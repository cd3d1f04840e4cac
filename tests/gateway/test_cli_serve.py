"""`kvgate serve` as a real process: starts from a YAML file, serves, drains a stream on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from .conftest import Upstreams, gateway_config


async def _read_ready(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    url = admin = ""
    assert proc.stdout is not None
    while not (url and admin):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "kvgate serve exited before it was ready"
        if "listening on" in line:
            url = line.rsplit(" ", 1)[1].strip()
        if "admin on" in line:
            admin = line.split("admin on ", 1)[1].split(" ", 1)[0]
    return url, admin


async def test_serve_drains_in_flight_stream_on_sigterm(upstreams: Upstreams, tmp_path: Path) -> None:
    a = await upstreams.add("a")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config([a])))
    env = {**os.environ, "KVGATE_ADMIN_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvgate.cli",
        "serve",
        "-c",
        str(cfg),
        "--port",
        "0",
        "--log-level",
        "warning",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url, admin = await _read_ready(proc)
        assert url.startswith("http://127.0.0.1:") and admin.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/readyz") as r:
                assert r.status == 200
            async with s.post(
                f"{url}/v1/completions", json={"prompt": "x", "stream": True, "x_chunks": 6, "x_gap": 0.2}
            ) as r:
                first = await r.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)  # mid-stream
                rest = await asyncio.wait_for(r.read(), 20)
        assert first.startswith(b"data: ")
        assert rest.count(b"data: ") == 6  # 5 remaining chunks + [DONE]: the stream was drained, not cut
        assert rest.endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_rejects_an_invalid_config_with_the_key(tmp_path: Path) -> None:
    bad = gateway_config([("a", 8000)])
    bad["clusters"][0]["lb_policy"] = "nope"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    r = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "clusters[0].lb_policy" in r.stderr


async def _serve_lines_until_ready(cfg: Path, *extra: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg), "--port", "0", *extra,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "KVGATE_ADMIN_PORT": "0"},
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while not any("admin on" in line for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, f"kvgate serve exited before it was ready: {lines}"
            lines.append(line)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    return lines


async def test_serve_freezes_the_startup_heap_unless_told_not_to(upstreams: Upstreams, tmp_path: Path) -> None:
    a = await upstreams.add("a")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config([a])))
    tuned = await _serve_lines_until_ready(cfg, "--log-level", "info", "--gc-threshold", "12345")
    assert any("startup objects frozen, first threshold 12345" in line for line in tuned), tuned
    untouched = await _serve_lines_until_ready(cfg, "--log-level", "info", "--gc-threshold", "0")
    assert not any("frozen" in line for line in untouched), untouched


def test_serve_refuses_a_negative_gc_threshold(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(tmp_path / "x.yaml"), "--gc-threshold", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--gc-threshold: must be at least 0" in r.stderr
