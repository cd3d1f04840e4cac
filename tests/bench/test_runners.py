"""Benchmark runners: real time over HTTP, virtual/real agreement, mode configs, reports, missing peers, and the
external-fleet path (``--fleet real``) exercised against a simulated fleet.

No assertion depends on timing; the whole module runs in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from kvgate.config import parse_config
from kvgate_bench import cli as bench_cli
from kvgate_bench import cli_args, peers
from kvgate_bench.modes import GATEWAY_MODES, MODES, FleetSpec, gateway_config, peer_available, resolve_modes
from kvgate_bench.oracle import oracle_hit_rate
from kvgate_bench.realfleet import ExternalFleet, prepare_workload, probe_ids
from kvgate_bench.realtime import run_mode, run_modes
from kvgate_bench.realtime_metrics import parse_hit_counters
from kvgate_bench.results import summarize
from kvgate_bench.virtual import run_virtual
from kvgate_bench.virtual_requests import prepare
from kvgate_bench.workloads import Request, get_workload
from kvgate_sim.fleet import Fleet, start_fleet

SPEC = FleetSpec(engines=2, time_scale=0.5)
HIT_TOLERANCE = 0.08  # absolute hit-rate difference allowed between the virtual and real-time runners


def _small_workload():  # type: ignore[no-untyped-def]
    return get_workload("multi_round_qa", num_users=3, num_rounds=3, system_prompt_len=200, history_len=300,
                        answer_len=6, qps=30.0)  # fmt: skip


def _stub_fleet() -> Fleet:
    """A :class:`Fleet` whose engines are address stubs (nothing started): enough for ``gateway_config``."""
    engines = [SimpleNamespace(instance_id=f"sim-{i}", url=f"http://127.0.0.1:{20000 + i}", port=20000 + i)
               for i in range(3)]  # fmt: skip
    return Fleet(engines, "http://127.0.0.1:19999")  # type: ignore[arg-type]


def test_modes_produce_distinct_valid_configs() -> None:
    fleet = _stub_fleet()
    dumped = []
    for name in GATEWAY_MODES:
        mode_cfg = gateway_config(MODES[name], fleet)
        parse_config(mode_cfg)  # every mode's config is accepted by the gateway
        dumped.append(json.dumps(mode_cfg, sort_keys=True))
    assert len(set(dumped)) == len(GATEWAY_MODES)
    kv = gateway_config(MODES["kvcache"], fleet)
    filters = kv["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    assert filters[0]["name"] == "dgp.filter.ai.kvcache"
    assert filters[0]["config"]["tokenize_on_miss"] is True
    assert kv["clusters"][0]["lb_policy"] == "least_request"
    seed = gateway_config(MODES["kvcache-seed"], fleet)
    assert seed["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"][
        "tokenize_on_miss"] is False  # fmt: skip
    rr = gateway_config(MODES["round_robin"], fleet)
    names = [f["name"] for f in rr["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]]
    assert names == ["dgp.filter.llm.proxy"]
    with pytest.raises(KeyError):
        resolve_modes(["nope"])


def test_parse_hit_counters() -> None:
    text = (
        "# HELP vllm:prefix_cache_queries_total x\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0\n'
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 10.0\n'
        "vllm:prefix_cache_queries_created 1.7e9\n"
    )
    c = parse_hit_counters(text)
    assert c["vllm:prefix_cache_queries_total"] == 100.0
    assert c["vllm:prefix_cache_hits_total"] + c["vllm:external_prefix_cache_hits_total"] == 50.0


async def test_realtime_counts_every_request_once_and_agrees_with_virtual() -> None:
    wl = _small_workload()
    vreqs = prepare(wl)
    for name in ("round_robin", "kvcache"):
        mode = MODES[name]
        run = await run_mode(mode, wl, SPEC)
        ids = [r.req_id for r in run.results]
        assert sorted(ids) == sorted(r.req_id for r in wl.requests)  # every request exactly once
        assert all(r.ok for r in run.results), [r.error for r in run.results if not r.ok]
        s = summarize(name, run.results, hit_rate=run.hit_rate, instances=run.instances)
        assert sum(s.instance_counts.values()) == len(wl.requests) == s.requests
        assert set(s.instance_counts) == set(run.instances)
        assert all(r.instance in run.instances for r in run.results)
        virt = run_virtual(mode, vreqs, SPEC, wl.closed_loop)
        assert abs(run.hit_rate - virt.hit_rate) <= HIT_TOLERANCE, (name, run.hit_rate, virt.hit_rate)


async def test_missing_peer_is_skipped_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "find_peer", lambda name: None)
    mode = MODES["vllm-router:cache_aware"]
    ok, why = peer_available(mode)
    assert not ok and "not installed" in why and "vllm-router" in why
    messages: list[str] = []
    runs = await run_modes([mode], _small_workload(), SPEC, show_progress=False, on_skip=messages.append)
    assert runs == [] and messages == [why]


def test_cli_virtual_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    code = bench_cli.main(["--workload", "multi_round_qa", "--virtual", "--engines", "2", "--param", "num_users=3",
                           "--param", "num_rounds=2", "--modes", "round_robin,kvcache,vllm-router:cache_aware",
                           "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    for name in ("report.md", "results.json", "ttft_cdf.png", "instance_traffic.png", "hit_rate.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert [s["mode"] for s in data["summaries"]] == ["round_robin", "kvcache"]
    assert len(data["requests"]) == 2 * 3 * 2
    text = capsys.readouterr().out
    assert "vllm-router:cache_aware: skipped" in text and "report.md" in text


def test_cli_param_parsing() -> None:
    assert cli_args.parse_param("qps=4") == ("qps", 4)
    assert cli_args.parse_param("block_tokens_scale=1/16") == ("block_tokens_scale", 1 / 16)
    assert cli_args.parse_param("distribution=zipf") == ("distribution", "zipf")
    assert cli_args.parse_param("ordered=true") == ("ordered", True)


# --------------------------------------------------------------------------------------------------
# external fleet (--fleet real / --fleet-state): exercised against a simulated fleet, no real engines
# --------------------------------------------------------------------------------------------------


def _external(fleet: Fleet) -> ExternalFleet:
    state = {
        "run_id": "test",
        "model_name": SPEC.model,
        "controller": {"url": fleet.controller_url},
        "engines": [{"instance_id": e.instance_id, "url": e.url, "port": e.port, "alive": True} for e in fleet.engines],
    }
    return ExternalFleet.from_state(state, label="sim-external")


async def _cached_tokens(session: aiohttp.ClientSession, url: str, req: Request, model: str) -> int:
    async with session.post(url + req.path(), json=req.body(model, stream=False)) as resp:
        assert resp.status == 200, await resp.text()
        usage = (await resp.json())["usage"]
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


async def test_external_fleet_resets_caches_between_modes() -> None:
    wl = _small_workload()
    sim = await start_fleet(2, engine_config=SPEC.base_engine_config(), seed=SPEC.seed)
    try:
        fleet = _external(sim)
        assert fleet.instance_ids == sim.instance_ids and fleet.model == SPEC.model
        wl2, facts = await prepare_workload(fleet, wl)  # /tokenize of the sim = the workload's own ids
        assert [r.prompt_token_ids for r in wl2.requests] == [r.prompt_token_ids for r in wl.requests]
        assert facts["oracle_by_block_size"][16] == pytest.approx(oracle_hit_rate(wl.requests))
        runs = await run_modes([MODES["round_robin"], MODES["kvcache"]], wl2, SPEC, show_progress=False, fleet=fleet)
        assert [r.mode for r in runs] == ["round_robin", "kvcache"]
        for run in runs:
            assert sorted(r.req_id for r in run.results) == sorted(r.req_id for r in wl.requests)
            assert all(r.ok for r in run.results), [r.error for r in run.results if not r.ok]
            assert {r.instance for r in run.results} <= set(fleet.instance_ids)
            assert run.info["reset"]["probes"] == len(probe_ids(wl2)) > 0
            assert run.info["engine_counters"]["vllm:prefix_cache_queries_total"] == wl2.total_prompt_tokens
        assert runs[1].info["reset"]["cleared_tokens"] and sum(runs[1].info["reset"]["cleared_tokens"].values()) > 0
        assert runs[1].hit_rate > runs[0].hit_rate  # kvcache routing still works with the external fleet
        # after a reset nothing is found: no controller lookup hit, no engine prefix-cache hit
        last = max(wl2.requests, key=lambda r: r.num_prompt_tokens)
        async with aiohttp.ClientSession() as session:
            await _cached_tokens(session, fleet.urls[0], last, fleet.model)  # stored again on engine 0
            assert await fleet.lookup(session, last.prompt_token_ids)
            info = await fleet.reset(session, probe_ids(wl2))
            assert info["lookup_polls"] >= 1
            for p in probe_ids(wl2):
                assert await fleet.lookup(session, p) == {}
            assert await _cached_tokens(session, fleet.urls[0], last, fleet.model) == 0
        cfg = gateway_config(MODES["kvcache"], fleet)
        parse_config(cfg)
        assert [e["id"] for e in cfg["clusters"][0]["endpoints"]] == fleet.instance_ids
        kv = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
        assert kv["default_model"] == SPEC.model and kv["lmcache_endpoint"] == fleet.controller_url
        assert kv["min_match_ratio"] == MODES["kvcache"].kvcache["min_match_ratio"]  # mode settings unchanged
    finally:
        await sim.stop()


def test_cli_fleet_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args.build_parser().parse_args(["--fleet", "real"])
    assert args.fleet == "real" and args.engines is None and args.fleet_state is None
    with pytest.raises(SystemExit):
        bench_cli.main(["--fleet", "real", "--virtual", "--modes", "round_robin"])
    assert "real time only" in capsys.readouterr().err
    code = bench_cli.main(["--fleet-state", str(tmp_path / "nope.json"), "--modes", "round_robin", "--no-progress",
                           "--out", str(tmp_path / "rep")])  # fmt: skip
    assert code == 1
    assert "no fleet state file" in capsys.readouterr().out
