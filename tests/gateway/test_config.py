"""Config loading: the seed example loads unchanged; every class of error names its key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kvgate.chain import HttpFilter, get_kind, register_filter, registered_filter, registered_kinds, unregister_filter
from kvgate.cli import main
from kvgate.config import load_config, parse_config
from kvgate.durations import parse_duration
from kvgate.errors import ConfigError, RegistryError
from kvgate.redact import redact_secrets as redact
from kvgate.registry import check_config
from kvgate.server import Gateway

SEED = Path(__file__).resolve().parents[2] / "examples" / "pixiu-seed-config.yaml"
CLUSTERS = [
    {
        "name": "vllm_cluster",
        "lb_policy": "RoundRobin",
        "endpoints": [
            {
                "id": "vllm-instance-1",
                "socket_address": {"address": "127.0.0.1", "port": 8000},
                "llm_meta": {"api_key": "sk-live", "retry_policy": {"name": "ExponentialBackoff"}, "fallback": True},
            },
            {"id": "vllm-instance-2", "socket_address": {"address": "127.0.0.1", "port": 8001}},
        ],
    }
]


def seed_text() -> str:
    if SEED.exists():
        return SEED.read_text()
    pytest.fail(f"seed config missing at {SEED}")


def seed_with_clusters() -> dict[str, Any]:
    data = yaml.safe_load(seed_text())
    data["clusters"] = copy.deepcopy(CLUSTERS)
    return data


def test_seed_example_loads_unchanged(tmp_path: Path) -> None:
    # The seed's YAML, as written, plus a clusters section appended.
    f = tmp_path / "seed.yaml"
    f.write_text(seed_text() + "\n" + yaml.safe_dump({"clusters": CLUSTERS}))
    cfg = load_config(f)
    hcm = cfg.listeners[0].hcm
    assert [h.name for h in hcm.http_filters] == ["dgp.filter.ai.kvcache", "dgp.filter.llm.proxy"]
    assert cfg.listeners[0].address.socket_address.port == 8888
    assert cfg.clusters[0].lb_policy == "round_robin"
    gw = Gateway(cfg)  # every filter config validates too
    assert len(gw.listener_apps[0].filters) == 2


def test_static_resources_layout() -> None:
    data = seed_with_clusters()
    cfg = parse_config({"static_resources": {"listeners": data["listeners"], "clusters": data["clusters"]}})
    assert cfg.clusters[0].name == "vllm_cluster"


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (
            lambda d: d["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"].insert(
                0, {"name": "dgp.filter.nope"}
            ),
            "listeners[0].filter_chains.filters[0].config.http_filters[0].name",
            "unknown filter 'dgp.filter.nope'",
        ),
        (
            lambda d: d["clusters"][0].__setitem__("lb_policy", "fastest"),
            "clusters[0].lb_policy",
            "unknown lb_policy 'fastest'",
        ),
        (
            lambda d: d["clusters"][0].__setitem__("name", "other"),
            "listeners[0].filter_chains.filters[0].config.route_config.routes[0].route.cluster",
            "unknown cluster 'vllm_cluster'",
        ),
        (
            lambda d: d["clusters"][0]["endpoints"][1]["socket_address"].__setitem__("port", 70000),
            "clusters[0].endpoints[1].socket_address.port",
            "less than or equal to 65535",
        ),
        (
            lambda d: d["clusters"][0]["endpoints"][1]["socket_address"].__setitem__("port", "http"),
            "clusters[0].endpoints[1].socket_address.port",
            "valid integer",
        ),
        (
            lambda d: d["clusters"][0]["endpoints"][1].__setitem__("id", "vllm-instance-1"),
            "clusters[0].endpoints[1].id",
            "duplicate endpoint id 'vllm-instance-1'",
        ),
        (
            lambda d: d["clusters"][0]["endpoints"][0]["llm_meta"]["retry_policy"].__setitem__("name", "Forever"),
            "clusters[0].endpoints[0].llm_meta.retry_policy.name",
            "unknown retry policy 'Forever'",
        ),
        (
            lambda d: d["listeners"][0]["filter_chains"]["filters"][0]["config"].__setitem__("timeout", "5 sec"),
            "listeners[0].filter_chains.filters[0].config.timeout",
            "invalid duration",
        ),
        (
            lambda d: d["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"].pop(),
            "listeners[0].filter_chains.filters[0].config.http_filters",
            "no terminal filter",
        ),
        (lambda d: d.pop("listeners"), "listeners", "Field required"),
    ],
)
def test_config_errors_name_the_key(mutate, path: str, reason: str) -> None:
    data = seed_with_clusters()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        Gateway(parse_config(data))
    assert ei.value.path == path
    assert reason in ei.value.reason


def test_kvcache_filter_config_error_names_the_key() -> None:
    data = seed_with_clusters()
    kv = data["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
    kv["lookup_routing_timeout"] = "fast"
    with pytest.raises(ConfigError) as ei:
        Gateway(parse_config(data))
    assert ei.value.path.startswith("listeners[0].filter_chains.filters[0].config.http_filters[0].config")
    assert "lookup_routing_timeout" in ei.value.path


def test_pixiu_lb_names_and_aliases() -> None:
    for name, canon in [
        ("RoundRobin", "round_robin"),
        ("Rand", "random"),
        ("RingHashing", "ring_hash"),
        ("MaglevHashing", "maglev"),
        ("WeightRandom", "weighted_random"),
        ("round_robin", "round_robin"),
        ("random", "random"),
        ("least_request", "least_request"),
    ]:
        data = seed_with_clusters()
        data["clusters"][0]["lb_policy"] = name
        assert parse_config(data).clusters[0].lb_policy == canon


def test_go_durations() -> None:
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("2s") == 2.0
    assert parse_duration("10m") == 600.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("0") == 0.0  # Go accepts a unitless zero, and nothing else without a unit
    assert parse_duration(5) == 5.0  # a YAML number is seconds (kvgate's reading; a Go string needs a unit)
    for bad in ("5", "-5", "1.5", "5s3"):
        with pytest.raises(ValueError, match="missing unit"):  # Go: time: missing unit in duration "5"
            parse_duration(bad)
    for bad in ("5 s", "abc", "ms", "1d", True, None):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_unknown_keys_warned_and_secrets_redacted() -> None:
    data = seed_with_clusters()
    data["clusters"][0]["lb_polcy"] = "typo"
    gw = Gateway(parse_config(data))
    assert any("clusters[0].lb_polcy" in w for w in gw.warnings)
    dumped = redact(gw.config.model_dump(mode="json"))
    assert dumped["clusters"][0]["endpoints"][0]["llm_meta"]["api_key"] == "***"
    assert "sk-live" not in str(dumped)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(seed_with_clusters()))
    r = subprocess.run([sys.executable, "-m", "kvgate.cli", "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok: 1 listener(s), 1 cluster(s), 2 endpoint(s)" in r.stdout
    bad_data = seed_with_clusters()
    bad_data["clusters"][0]["endpoints"][0]["socket_address"]["port"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_data))
    r = subprocess.run([sys.executable, "-m", "kvgate.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "clusters[0].endpoints[0].socket_address.port" in r.stderr
    (tmp_path / "broken.yaml").write_text("listeners: [\n")
    r = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "check-config", str(tmp_path / "broken.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "invalid YAML" in r.stderr


def test_terminal_filter_must_be_last_and_unique() -> None:
    data = seed_with_clusters()
    hf = data["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    hf.insert(0, {"name": "dgp.filter.llm.proxy"})
    with pytest.raises(ConfigError) as ei:
        Gateway(parse_config(data))
    assert ei.value.path == "listeners[0].filter_chains.filters[0].config.http_filters[0].name"
    assert "must be the last http filter" in ei.value.reason


def test_redaction_of_url_credentials_keeps_other_keys() -> None:
    out = redact(
        {"lmcache_endpoint": "http://user:pw@127.0.0.1:9000/x", "token_cache": {"max_size": 5}, "api_key": "sk"}
    )
    assert out == {"lmcache_endpoint": "http://***@127.0.0.1:9000/x", "token_cache": {"max_size": 5}, "api_key": "***"}


@pytest.mark.parametrize(
    ("hc", "key", "reason"),
    [
        ({"interval": "0s"}, "interval", "greater than 0"),
        ({"timeout": "-1s"}, "timeout", "greater than 0"),
        ({"path": "health"}, "path", "must start with '/'"),
    ],
)
def test_active_health_check_validation(hc: dict[str, Any], key: str, reason: str) -> None:
    data = seed_with_clusters()
    data["clusters"][0]["health_check"] = hc
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert ei.value.path == f"clusters[0].health_check.{key}"
    assert reason in ei.value.reason


async def test_active_health_checks_mark_a_dead_endpoint_down() -> None:
    import asyncio

    from kvgate.app import start_gateway

    from .conftest import dead_port

    data = seed_with_clusters()
    data["clusters"][0]["endpoints"][1]["socket_address"]["port"] = dead_port()
    data["clusters"][0]["health_check"] = {"interval": "50ms", "timeout": "200ms", "unhealthy_threshold": 1}
    kv = data["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"][0]["config"]
    kv["enabled"] = False
    gw = await start_gateway(parse_config(data), host="127.0.0.1", port=0, admin_port=0)
    try:
        cluster = gw.gateway.runtime.clusters.get("vllm_cluster")
        for _ in range(100):
            if not cluster.get("vllm-instance-2").healthy():
                break
            await asyncio.sleep(0.05)
        assert not cluster.get("vllm-instance-2").healthy()
    finally:
        await gw.stop()


# -- filter registry (kvgate.chain + the plugin index kvgate.registry) ------------------------------------------------


class _NoConfig(BaseModel):
    pass


def test_a_duplicate_filter_kind_is_an_error_and_keeps_the_first() -> None:
    proxy = get_kind("dgp.filter.llm.proxy")
    assert proxy is not None and proxy.terminal
    with pytest.raises(RegistryError, match=r"'dgp\.filter\.llm\.proxy' is already registered"):
        register_filter("dgp.filter.llm.proxy", _NoConfig)(lambda cfg, rt: HttpFilter())
    assert get_kind("dgp.filter.llm.proxy") is proxy


def test_registered_filter_is_removed_after_the_block_even_on_error() -> None:
    before = registered_kinds()
    with pytest.raises(RuntimeError), registered_filter("test.tmp", _NoConfig, lambda cfg, rt: HttpFilter()) as kind:
        assert kind.name == "test.tmp" and "test.tmp" in registered_kinds()
        raise RuntimeError("boom")
    assert registered_kinds() == before
    with pytest.raises(RegistryError, match="not registered"):
        unregister_filter("test.tmp")


def test_chain_knows_no_concrete_filter_and_the_plugin_index_registers_the_builtins() -> None:
    script = (
        "import sys, kvgate.chain as c; a = c.registered_kinds(); "
        "loaded = sorted(m for m in sys.modules if m.startswith('kvgate.filters.')); "
        "import kvgate.registry as r; print(a, loaded, c.registered_kinds() == sorted(r.BUILTIN_FILTERS))"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "[]", "True"]


def test_check_config_validates_the_terminal_filter_without_a_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvgate.runtime

    def no_runtime(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_config built a runtime")

    monkeypatch.setattr(kvgate.runtime.Runtime, "__init__", no_runtime)
    data = seed_with_clusters()
    data["clusters"][0]["lb_polcy"] = "typo"
    checked = check_config(parse_config(data))
    assert [f.name for f in checked.chains[0]] == ["dgp.filter.ai.kvcache", "dgp.filter.llm.proxy"]
    assert any("clusters[0].lb_polcy" in w for w in checked.warnings)
    hf = data["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    hf.append({"name": "dgp.filter.ai.kvcache"})  # proxy no longer last
    with pytest.raises(ConfigError) as ei:
        check_config(parse_config(data))
    assert ei.value.path == "listeners[0].filter_chains.filters[0].config.http_filters[1].name"
    assert "must be the last http filter" in ei.value.reason
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(seed_with_clusters()))
    assert main(["check-config", str(good)]) == 0  # the CLI path too: no runtime
    assert "ok: 1 listener(s)" in capsys.readouterr().out
