from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvgate.durations import parse_duration
from kvgate.errors import ConfigError
from kvgate.filters.kvcache.config import KVCacheConfig

SEED = Path(__file__).resolve().parents[2] / "examples" / "pixiu-seed-config.yaml"
BASE = {"enabled": True, "vllm_endpoint": "http://127.0.0.1:8000", "lmcache_endpoint": "http://127.0.0.1:9000"}


def load(**kw: object) -> KVCacheConfig:
    return KVCacheConfig.model_validate({**BASE, **kw})


def error_of(data: dict[str, object]) -> ConfigError:
    from pydantic import ValidationError

    from kvgate.config import config_error_from_validation

    with pytest.raises(ValidationError) as info:
        KVCacheConfig.model_validate(data)
    return config_error_from_validation(info.value)


def test_defaults() -> None:
    c = load()
    assert c.request_timeout == 2.0
    assert c.lookup_routing_timeout == 0.05
    assert c.hot_window == 300.0
    assert c.hot_max_records == 300
    assert c.hot_max_keys == 0
    assert c.token_cache.enabled is False and c.token_cache.max_size == 0 and c.token_cache.ttl == 0
    assert c.cache_strategy.compress_method == "zstd"
    r = c.retry
    assert (r.max_attempts, r.base_backoff, r.max_backoff, r.jitter) == (3, 0.1, 2.0, False)
    cb = c.circuit_breaker
    assert (cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls) == (5, 10.0, 2)
    assert (c.max_background_tasks, c.background_queue_size, c.min_match_tokens) == (8, 1024, 0)


def test_non_positive_values_get_defaults_and_set_values_are_kept() -> None:
    c = load(
        request_timeout="0s",
        lookup_routing_timeout="-5ms",
        hot_max_keys=-3,
        hot_max_records=0,
        retry={"max_attempts": -1, "base_backoff": "0s", "max_backoff": "-1s"},
        circuit_breaker={"failure_threshold": 0, "recovery_timeout": "0s", "half_open_max_calls": -2},
    )
    assert (c.request_timeout, c.lookup_routing_timeout, c.hot_max_keys, c.hot_max_records) == (2.0, 0.05, 0, 300)
    assert (c.retry.max_attempts, c.retry.base_backoff, c.retry.max_backoff) == (3, 0.1, 2.0)
    assert c.circuit_breaker.failure_threshold == 5
    c = load(request_timeout="3s", lookup_routing_timeout="80ms", retry={"max_attempts": 7, "base_backoff": "10ms"})
    assert (c.request_timeout, c.lookup_routing_timeout) == (3, 0.08)
    assert (c.retry.max_attempts, c.retry.base_backoff) == (7, 0.01)


def test_trailing_slash_trimmed() -> None:
    c = load(vllm_endpoint=" http://h:8000/ ", lmcache_endpoint="http://h:9000/")
    assert c.vllm_endpoint == "http://h:8000" and c.lmcache_endpoint == "http://h:9000"


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (
            {"enabled": True, "lmcache_endpoint": "x"},
            "vllm_endpoint",
            "[kvcache] vllm_endpoint is required when enabled",
        ),
        (
            {"enabled": True, "vllm_endpoint": "  ", "lmcache_endpoint": ""},
            "vllm_endpoint",
            "[kvcache] vllm_endpoint is required when enabled",
        ),
        (
            {"enabled": True, "vllm_endpoint": "x"},
            "lmcache_endpoint",
            "[kvcache] lmcache_endpoint is required when enabled",
        ),
        (
            {**BASE, "token_cache": {"max_size": -1}},
            "token_cache.max_size",
            "[kvcache] token_cache.max_size must be >= 0",
        ),
        (
            {**BASE, "cache_strategy": {"memory_threshold": 1.5, "load_threshold": 2}},
            "cache_strategy.memory_threshold",
            "[kvcache] cache_strategy.memory_threshold must be between 0 and 1",
        ),
        (
            {**BASE, "cache_strategy": {"memory_threshold": -0.1}},
            "cache_strategy.memory_threshold",
            "[kvcache] cache_strategy.memory_threshold must be between 0 and 1",
        ),
        (
            {**BASE, "cache_strategy": {"load_threshold": 1.01}},
            "cache_strategy.load_threshold",
            "[kvcache] cache_strategy.load_threshold must be between 0 and 1",
        ),
        (
            {**BASE, "cache_strategy": {"hot_content_threshold": -1}},
            "cache_strategy.hot_content_threshold",
            "[kvcache] cache_strategy.hot_content_threshold must be >= 0",
        ),
        ({**BASE, "max_background_tasks": 0}, "max_background_tasks", "[kvcache] max_background_tasks must be >= 1"),
        ({**BASE, "background_queue_size": 0}, "background_queue_size", "[kvcache] background_queue_size must be >= 1"),
        ({**BASE, "min_match_tokens": -1}, "min_match_tokens", "[kvcache] min_match_tokens must be >= 0"),
    ],
)
def test_validation_messages_in_order(data: dict[str, object], path: str, message: str) -> None:
    err = error_of(data)
    assert err.reason == message
    assert err.path == path


def test_boundaries_are_closed_intervals() -> None:
    c = load(cache_strategy={"memory_threshold": 1, "load_threshold": 0})
    assert c.cache_strategy.memory_threshold == 1


def test_disabled_skips_validation() -> None:
    c = KVCacheConfig.model_validate(
        {"enabled": False, "token_cache": {"max_size": -5}, "cache_strategy": {"load_threshold": 9}}
    )
    assert c.enabled is False
    assert c.request_timeout == 2.0  # defaults still applied
    assert KVCacheConfig.model_validate({}).enabled is False


def test_go_durations() -> None:
    c = load(request_timeout="1m30s", lookup_routing_timeout="1500us", hot_window="1.5h", token_cache={"ttl": "10m"})
    assert c.request_timeout == 90.0
    assert c.lookup_routing_timeout == pytest.approx(0.0015)
    assert c.hot_window == 5400.0
    assert c.token_cache.ttl == 600.0
    assert parse_duration("50ms") == pytest.approx(0.05)
    err = error_of({**BASE, "request_timeout": "2 seconds"})
    assert err.path == "request_timeout" and "invalid duration" in err.reason


def test_seed_config_filter_block_loads() -> None:
    seed = yaml.safe_load(SEED.read_text())
    filters = seed["listeners"][0]["filter_chains"]["filters"][0]["config"]["http_filters"]
    block = next(f for f in filters if f["name"] == "dgp.filter.ai.kvcache")
    c = KVCacheConfig.model_validate(block["config"])
    assert c.enabled and c.vllm_endpoint == "http://127.0.0.1:8000" and c.lmcache_endpoint == "http://127.0.0.1:9000"
    assert c.default_model == "demo"
    assert (c.request_timeout, c.lookup_routing_timeout, c.hot_window, c.hot_max_records) == (2.0, 0.05, 300.0, 300)
    assert c.token_cache.enabled and c.token_cache.max_size == 1024 and c.token_cache.ttl == 600
    s = c.cache_strategy
    assert s.enable_compression and s.enable_pinning and s.enable_eviction
    assert (s.load_threshold, s.memory_threshold, s.hot_content_threshold) == (0.7, 0.85, 10)
    assert (s.pin_instance_id, s.pin_location, s.compress_method, s.evict_instance_id) == (
        "vllm-instance-1",
        "LocalCPUBackend",
        "zstd",
        "vllm-instance-1",
    )
    assert c.model_extra == {}  # every seed key is a known key


def test_registered_through_chain_validation() -> None:
    import kvgate.filters.kvcache  # noqa: F401  (registers the kind)
    from kvgate.chain import _REGISTRY

    kind = _REGISTRY["dgp.filter.ai.kvcache"]
    assert kind.config_model is KVCacheConfig and not kind.terminal


def test_kvgate_routing_keys_validated() -> None:
    import pytest as _pytest

    from kvgate.errors import ConfigError as _CE
    from kvgate.filters.kvcache.config import KVCacheConfig

    base = {"enabled": True, "vllm_endpoint": "http://127.0.0.1:1", "lmcache_endpoint": "http://127.0.0.1:2"}
    cfg = KVCacheConfig.model_validate(base)
    assert (cfg.tokenize_on_miss, cfg.cold_placement, cfg.min_match_ratio, cfg.max_imbalance_abs) == (
        False,
        "lb",
        0.0,
        0,
    )
    for key, bad, msg in [
        ("cold_placement", "random", "cold_placement must be 'lb' or 'lru'"),
        ("min_match_ratio", 1.5, "min_match_ratio must be between 0 and 1"),
        ("max_imbalance_abs", -1, "max_imbalance_abs must be >= 0"),
        ("max_imbalance_rel", 0.5, "max_imbalance_rel must be >= 1"),
    ]:
        with _pytest.raises((_CE, ValueError)) as ei:
            KVCacheConfig.model_validate({**base, key: bad})
        assert msg in str(ei.value)


# --- local routing keys (issue 9) ---


def test_local_routing_defaults_are_the_seed() -> None:
    c = load()
    assert c.local_tokenizer is None and c.index_source == "lookup"
    assert c.kv_events.sources == [] and c.kv_events.bind is None


def test_local_routing_contract_parses() -> None:
    c = load(
        local_tokenizer={"path": "/some/dir"},
        index_source="events",
        kv_events={
            "bind": "tcp://127.0.0.1:5557",
            "sources": [
                {"instance": "sim-0", "topic": "kv.sim-0", "replay_endpoint": "tcp://127.0.0.1:5560"},
                {"instance": "sim-1", "endpoint": "tcp://127.0.0.1:5558"},
            ],
        },
    )
    assert c.local_tokenizer is not None and c.local_tokenizer.path == "/some/dir"
    assert [s.instance for s in c.kv_events.sources] == ["sim-0", "sim-1"]
    assert c.kv_events.cpu_ttl == 120.0 and c.kv_events.hint_ttl == 30.0


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"index_source": "magic"}, "index_source"),
        ({"local_tokenizer": {"path": " "}}, "local_tokenizer.path"),
        ({"index_source": "events"}, "kv_events.sources"),
        ({"index_source": "both", "kv_events": {"sources": [{"instance": "a"}]}}, "kv_events.sources[0].endpoint"),
        (
            {"index_source": "events", "kv_events": {"bind": "tcp://127.0.0.1:1", "sources": [{"instance": "a"}]}},
            "kv_events.sources[0].topic",
        ),
        (
            {
                "index_source": "events",
                "kv_events": {
                    "bind": "tcp://127.0.0.1:1",
                    "sources": [{"instance": "a", "topic": "t"}, {"instance": "b", "topic": "t"}],
                },
            },
            "kv_events.sources[1].topic",
        ),
        (
            {"index_source": "events", "kv_events": {"sources": [{"instance": "a", "endpoint": "x"}, {}]}},
            "kv_events.sources[0].endpoint",
        ),
        (
            {"index_source": "events", "kv_events": {"sources": [{"instance": "a", "endpoint": "tcp://h:1"}, {}]}},
            "kv_events.sources[1].instance",
        ),
        ({"index_source": "events", "kv_events": {"bind": "5557", "sources": [{"instance": "a"}]}}, "kv_events.bind"),
        (
            {
                "index_source": "events",
                "kv_events": {"cpu_ttl": -1, "sources": [{"instance": "a", "endpoint": "tcp://h:1"}]},
            },
            "kv_events.cpu_ttl",
        ),
    ],
)
def test_local_routing_errors_name_the_key(kw: dict[str, object], path: str) -> None:
    err = error_of({**BASE, **kw})
    assert err.path == path, err


def test_bad_tokenizer_dir_is_a_config_error(tmp_path: Path) -> None:
    from kvgate.filters.kvcache.route_tokens import load_local_tokenizer

    with pytest.raises(ConfigError) as info:
        load_local_tokenizer(load(local_tokenizer={"path": str(tmp_path)}))
    assert info.value.path == "local_tokenizer.path"
