"""The simulated fleet end to end: engines + controller wired, config usable by the gateway, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from kvgate.app import start_gateway
from kvgate.config import parse_config
from kvgate_sim.fleet import start_fleet
from kvgate_sim.tokenizer import get_tokenizer


async def test_fleet_engines_report_to_controller_and_gateway_config_works() -> None:
    fleet = await start_fleet(2, time_scale=0.01)
    try:
        cfg = fleet.gateway_config(kvcache=False)
        assert [e["id"] for e in cfg["clusters"][0]["endpoints"]] == ["sim-0", "sim-1"]
        gw = await start_gateway(parse_config(cfg), port=0, with_admin=False)
        try:
            text = "hello " * 300
            async with aiohttp.ClientSession() as s:
                served = []
                for _ in range(2):
                    async with s.post(
                        f"{gw.url}/v1/completions",
                        json={"model": "qwen2.5-7b-instruct", "prompt": text, "max_tokens": 2},
                    ) as r:
                        assert r.status == 200
                        served.append(r.headers["x-kvgate-sim-instance"])
                assert sorted(served) == ["sim-0", "sim-1"]  # round robin
                ids = get_tokenizer().encode(text)
                async with s.post(f"{fleet.controller_url}/lookup", json={"tokens": ids}) as r:
                    layout = (await r.json())["layout_info"]
        finally:
            await gw.stop()
        # Both engines stored the full 256-token chunks; the first registered instance is credited.
        assert layout == {"sim-0": ["LocalCPUBackend", (len(ids) // 256) * 256]}
    finally:
        await fleet.stop()


def test_sim_cli_writes_config_and_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "fleet.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvgate.cli", "sim", "--engines", "2", "--time-scale", "0.01", "--config-out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "SIMULATED" in text and "sim-0" in text and "sim-1" in text
        cfg = yaml.safe_load(out.read_text())
        parse_config(cfg)
        ports = [e["socket_address"]["port"] for e in cfg["clusters"][0]["endpoints"]]

        async def probe() -> list[int]:
            async with aiohttp.ClientSession() as s:
                res = []
                for p in ports:
                    async with s.get(f"http://127.0.0.1:{p}/health") as r:
                        res.append(r.status)
                return res

        assert asyncio.run(probe()) == [200, 200]
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "fleet stopped." in rest
    assert os.path.exists(out)
