"""The config ``kvgate sim`` writes: recommended routing keys + local tokenizer + event index (issue 9 item 5)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvgate.tokenization import LocalTokenizer
from kvgate_sim.cli import recommended_kvcache
from kvgate_sim.fleet import KVCACHE_RECOMMENDED_LOOKUP, default_kv_events, start_fleet
from kvgate_sim.tokenizer import get_tokenizer


def _kvcache(cfg: dict[str, Any]) -> dict[str, Any]:
    filters = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    return next(f["config"] for f in filters if f["name"] == "dgp.filter.ai.kvcache")


async def _written_config(tmp_path: Path, *, events: bool = True, controller: bool = True) -> tuple[Path, Any]:
    kv = default_kv_events() if events else None
    fleet = await start_fleet(2, time_scale=0.01, kv_events=kv, controller=controller)
    cfg = fleet.gateway_config(kvcache=recommended_kvcache(fleet))
    out = tmp_path / "kvgate-sim.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out, fleet


async def test_sim_config_uses_local_tokenizer_and_event_index(tmp_path: Path) -> None:
    out, fleet = await _written_config(tmp_path)
    try:
        kv = _kvcache(yaml.safe_load(out.read_text()))
        for key, value in KVCACHE_RECOMMENDED_LOOKUP.items():
            assert kv[key] == value
        assert kv["index_source"] == "events"
        # the gateway's LocalTokenizer, loaded from the written path, gives the engines' ids
        local = LocalTokenizer.from_dir(kv["local_tokenizer"]["path"])
        text = "The routing decision is local now. 你好 🙂"
        assert local.encode_prompt(text) == get_tokenizer().encode(text)
        ev = kv["kv_events"]
        assert [s["instance"] for s in ev["sources"]] == ["sim-0", "sim-1"]
        assert [s["topic"] for s in ev["sources"]] == ["kv.sim-0", "kv.sim-1"]
        async with aiohttp.ClientSession() as s:
            for e, src in zip(fleet.engines, ev["sources"], strict=True):
                async with s.get(f"{e.url}/kv_event_sources") as r:
                    engine_cfg = (await r.json())["0"]
                assert engine_cfg["endpoint"] == ev["bind"]  # engines connect to the gateway's bind address
                assert engine_cfg["topic"] == src["topic"]
                assert engine_cfg["replay_endpoint"] == src["replay_endpoint"]
                assert not src["replay_endpoint"].endswith(":*")
    finally:
        await fleet.stop()


async def test_sim_config_without_events_keeps_lookup_index(tmp_path: Path) -> None:
    out, fleet = await _written_config(tmp_path, events=False)
    try:
        kv = _kvcache(yaml.safe_load(out.read_text()))
        assert "kv_events" not in kv and "index_source" not in kv  # the seed's default: /lookup
        assert "local_tokenizer" in kv
    finally:
        await fleet.stop()


async def test_sim_config_passes_check_config(tmp_path: Path) -> None:
    out, fleet = await _written_config(tmp_path)
    await fleet.stop()
    cmd = [sys.executable, "-m", "kvgate.cli", "check-config", str(out)]
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unknown key" not in proc.stdout + proc.stderr


def test_sim_cli_rejects_bad_kv_events_config(capsys: pytest.CaptureFixture[str]) -> None:
    from kvgate_sim.cli import build_parser, run

    for bad, why in [
        ('{"endpoint": "tcp://127.0.0.1:5557", "topic": "kv"}', "distinct topics"),
        ('{"endpoint": "tcp://*:5557", "nope": 1}', "unknown key"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
    ]:
        args = build_parser().parse_args(["--engines", "2", "--kv-events-config", bad])
        assert asyncio.run(run(args)) == 2, why
        assert why in capsys.readouterr().out
