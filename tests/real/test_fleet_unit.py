"""Pure helpers of ``kvgate_real.fleet``: no real venv, no engines (runs in the normal suite)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from kvgate_real import fleet as real
from kvgate_real.fleet import ControllerInfo, EngineInfo, RealFleet


def _fake_fleet(run_dir: Path, n: int = 2) -> RealFleet:
    f = RealFleet(run_dir, verbose=False)
    f.controller = ControllerInfo(
        pid=1,
        port=9000,
        url="http://127.0.0.1:9000",
        monitor_ports={"pull": 1, "reply": 2, "heartbeat": 3},
        log="c.log",
    )
    f.gateway_port = 8888
    for i in range(n):
        f.engines.append(
            EngineInfo(
                index=i,
                instance_id=f"engine-{i}",
                pid=100 + i,
                port=8100 + i,
                url=f"http://127.0.0.1:{8100 + i}",
                worker_port=8600 + i,
                log=f"e{i}.log",
                lmcache_config="x.yaml",
                home=str(run_dir),
                tmp_dir=str(run_dir / "tmp"),
            )
        )
    return f


def test_kvgate_config_shape(tmp_path: Path) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(_fake_fleet(tmp_path).kvgate_config()))
    listener = cfg["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port": 8888}
    hcm = listener["filter_chains"]["filters"][0]
    assert hcm["name"] == "dgp.filter.httpconnectionmanager"
    assert hcm["config"]["route_config"]["routes"] == [{"match": {"prefix": "/"}, "route": {"cluster": "vllm_cluster"}}]
    names = [f["name"] for f in hcm["config"]["http_filters"]]
    assert names == ["dgp.filter.ai.kvcache", "dgp.filter.llm.proxy"]
    kv = hcm["config"]["http_filters"][0]["config"]
    assert kv["vllm_endpoint"] == "http://127.0.0.1:8100"
    assert kv["lmcache_endpoint"] == "http://127.0.0.1:9000"
    assert kv["token_cache"]["enabled"] is True
    (cluster,) = cfg["clusters"]
    assert cluster["lb_policy"] == "RoundRobin"
    assert cluster["endpoints"] == [
        {"id": "engine-0", "socket_address": {"address": "127.0.0.1", "port": 8100}},
        {"id": "engine-1", "socket_address": {"address": "127.0.0.1", "port": 8101}},
    ]


def test_state_round_trip(tmp_path: Path) -> None:
    f = _fake_fleet(tmp_path)
    f._write_state()
    state = json.loads(f.state_path.read_text())
    assert [e["instance_id"] for e in state["engines"]] == ["engine-0", "engine-1"]
    back = RealFleet.from_state(tmp_path)
    assert back.run_id == f.run_id
    assert back.controller_url == "http://127.0.0.1:9000"
    assert [e.port for e in back.engines] == [8100, 8101]


def test_from_state_without_state_file(tmp_path: Path) -> None:
    with pytest.raises(real.FleetError, match="no state file"):
        RealFleet.from_state(tmp_path)


def test_loopback_address() -> None:
    assert real.is_loopback_address("127.0.0.1:8000")
    assert real.is_loopback_address("127.0.0.1%lo:8000")
    assert real.is_loopback_address("[::1]:8000")
    assert not real.is_loopback_address("0.0.0.0:8000")
    assert not real.is_loopback_address("*:8000")
    assert not real.is_loopback_address("[::]:8000")
    assert not real.is_loopback_address("10.0.0.5:8000")


def test_free_ports_distinct_and_bindable() -> None:
    taken: set[int] = set()
    ports = real.free_ports(6, taken)
    assert len(set(ports)) == 6 and taken == set(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_log_watch_counts_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("a\nLMCache INFO: Entering freeze mode for full sync.\n")
    watch = real._LogWatch(log)
    assert watch.frozen()
    with log.open("a") as fh:
        fh.write("LMCache INFO: Exiting freeze mode after full sync.\npartial")
    assert not watch.frozen()
    assert watch.counts[real.EXIT_FREEZE] == 1
    log.write_text("x System will operate in degraded mode (recompute).\n")  # truncated + rewritten
    assert watch.poll()[real.DEGRADED] == 1


def test_private_tmp_short_path(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 80)
    f = RealFleet(long_dir, verbose=False)
    tmp = f._private_tmp(long_dir / "engine-0", "e0")
    assert len(str(tmp)) < 60 and tmp.is_dir()
    assert f._extra_tmp == [str(tmp)]
    tmp.rmdir()


def test_env_problem_names_setup_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVGATE_REAL_VENV", str(tmp_path / "nope"))
    problem = real.real_env_problem()
    assert problem is not None and real.SETUP_SCRIPT in problem


def test_start_refuses_without_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVGATE_REAL_VENV", str(tmp_path / "nope"))
    with pytest.raises(real.FleetError, match=r"setup\.sh"):
        RealFleet(tmp_path).start(1)


def test_engine_yaml_tier_size_and_internal_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVGATE_REAL_LMCACHE_CPU_GB", raising=False)
    monkeypatch.delenv("KVGATE_REAL_PROM_MULTIPROC", raising=False)
    default = RealFleet(tmp_path, verbose=False)
    assert default.lmcache_cpu_gb == 1.0 and default.prometheus_multiproc and not default.lmcache_api
    f = RealFleet(tmp_path, verbose=False, lmcache_cpu_gb=0.05, lmcache_api=True)
    f._ports = real._Ports(1, 2, 3, 4, 5)
    plain = f._engine_yaml("engine-0", 8601)
    assert plain["max_local_cpu_size"] == 0.05
    assert "internal_api_server_enabled" not in plain
    api = f._engine_yaml("engine-0", 8601, api_port=7001)
    # LMCache 0.5.6: worker 0's server listens on port_start + 1; index list [1] leaves the scheduler's off
    assert api["internal_api_server_enabled"] is True
    assert api["internal_api_server_host"] == "127.0.0.1"
    assert api["internal_api_server_port_start"] == 7000
    assert api["internal_api_server_include_index_list"] == [1]
    monkeypatch.setenv("KVGATE_REAL_PROM_MULTIPROC", "0")
    assert not RealFleet(tmp_path, verbose=False).prometheus_multiproc
    with pytest.raises(real.FleetError, match="lmcache_cpu_gb"):
        RealFleet(tmp_path, verbose=False, lmcache_cpu_gb=0)
