"""Hot prefixes (issue 13): hotness per shared prefix, not per request; the shared part, chunk-aligned. Virtual time."""

from __future__ import annotations

import pytest

from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.hot_prefixes import HotPrefixes, common_prefix_len
from tests.kvcache.test_config import error_of


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


SYSTEM = list(range(1000, 1000 + 700))  # 700 shared tokens: 2 whole chunks of 256 + 188


def request(question: int) -> list[int]:
    return SYSTEM + [question] * 40


def test_different_questions_after_one_system_prompt_count_as_one_hot_prefix() -> None:
    hp = HotPrefixes(60.0, clock=Clock())
    keys = {hp.record(request(q)) for q in range(3)}
    assert len(keys) == 1
    (hot,) = hp.hot(3)
    assert hot.count == 3
    assert hot.tokens == SYSTEM[:512]  # the shared part, in whole chunks: never a question's tokens
    assert hp.hot(4) == []


def test_one_offs_short_prompts_and_the_window() -> None:
    clock = Clock()
    hp = HotPrefixes(10.0, clock=clock, max_keys=2)
    assert hp.record(list(range(100))) is None  # shorter than one key: not counted
    a = hp.record([1] * 300)
    hp.record([2] * 300)
    hp.record([3] * 300)  # evicts the least recently seen key
    assert hp.count(a) == 0 and len(hp) == 2
    clock.t = 11.0
    assert hp.hot(1) == [] and len(hp) == 0  # aged out of the window and dropped


def test_common_prefix_len_is_chunk_aligned() -> None:
    a = list(range(600))
    b = list(range(520)) + [0] * 80
    assert common_prefix_len(a, b, 256) == 512
    assert common_prefix_len(a, a, 256) == 512  # a partial last chunk is never shared
    assert common_prefix_len(a, [9, *a[1:]], 256) == 0


@pytest.mark.parametrize(
    ("over", "path"),
    [
        ({"cache_strategy": {"signals": "gpu"}}, "cache_strategy.signals"),
        ({"cache_strategy": {"max_pinned_share": 1.5}}, "cache_strategy.max_pinned_share"),
        ({"cache_strategy": {"pin_ttl": "0s"}}, "cache_strategy.pin_ttl"),
        ({"cache_strategy": {"hot_prefix_tokens": 0}}, "cache_strategy.hot_prefix_tokens"),
        ({"engine_metrics": {"timeout": "0s"}}, "engine_metrics.timeout"),
        (
            {"engine_metrics": {"endpoints": [{"metrics_url": "http://x/metrics"}]}},
            "engine_metrics.endpoints[0].instance",
        ),
        (
            {"engine_metrics": {"endpoints": [{"instance": "a", "metrics_url": "ftp://x"}]}},
            "engine_metrics.endpoints[0].metrics_url",
        ),
        ({"engine_metrics": {"lmcache_capacity_chunks": -1}}, "engine_metrics.lmcache_capacity_chunks"),
        ({"replication": {"rate": 0}}, "replication.rate"),
        ({"replication": {"max_imbalance_rel": 0.5}}, "replication.max_imbalance_rel"),
    ],
)
def test_bad_management_keys_name_the_key(over: dict[str, object], path: str) -> None:
    cfg = {"enabled": True, "vllm_endpoint": "http://127.0.0.1:1", "lmcache_endpoint": "http://127.0.0.1:2", **over}
    assert error_of(cfg).path == path


def test_the_seed_defaults_are_unchanged() -> None:
    cfg = KVCacheConfig.model_validate({"enabled": True, "vllm_endpoint": "http://a", "lmcache_endpoint": "http://b"})
    assert cfg.cache_strategy.signals == "process"
    assert not cfg.engine_managed and not cfg.needs_engine_metrics and not cfg.replication.enabled
