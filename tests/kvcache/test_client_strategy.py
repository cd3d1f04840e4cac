from __future__ import annotations

import json

import pytest

from kvgate.filters.kvcache.config import CacheStrategyConfig
from kvgate.filters.kvcache.errors import DecodeError, NotSupportedError, StatusError
from kvgate.filters.kvcache.lmcache_client import (
    ActionResult,
    InstanceMatch,
    LookupResult,
    controller_body,
    parse_lookup,
    stdlib_body,
)
from kvgate.filters.kvcache.signals import LoadSnapshot, ProcessSignals, StaticSignals
from kvgate.filters.kvcache.strategy import StrategyExecutor, make_decision, resolve_target


def test_layout_info_both_shapes() -> None:
    real = parse_lookup(
        {"event_id": "Lookup1", "layout_info": {"instA": ["LocalCPUBackend", 512], "instB": ["LocalCPUBackend", 768]}}
    )
    mock = parse_lookup(
        {
            "event_id": "e",
            "layout_info": {"instA": {"0": "LocalCPUBackend", "1": 512}, "instB": {"0": "LocalCPUBackend", "1": 768}},
        }
    )
    assert (
        real.layout
        == mock.layout
        == {"instA": InstanceMatch("LocalCPUBackend", 512), "instB": InstanceMatch("LocalCPUBackend", 768)}
    )
    assert real.matches == {"instA": 512, "instB": 768}
    assert real.best() == ("instB", InstanceMatch("LocalCPUBackend", 768))
    assert parse_lookup({"event_id": "e", "layout_info": {}}).layout == {}
    assert parse_lookup({"event_id": "e"}).layout == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"layout_info": []},
        {"layout_info": {"a": "x"}},
        {"layout_info": {"a": ["x"]}},
        {"layout_info": {"a": ["x", "y"]}},
        [1],
    ],
)
def test_layout_info_bad_shapes(bad: object) -> None:
    with pytest.raises(DecodeError):
        parse_lookup(bad)


def cs(**kw: object) -> CacheStrategyConfig:
    return CacheStrategyConfig.model_validate(kw)


def test_decision_rules() -> None:
    all_on = dict(enable_compression=True, enable_pinning=True, enable_eviction=True)
    d = make_decision(
        cs(**all_on, load_threshold=0.7, memory_threshold=0.8, hot_content_threshold=2),
        LoadSnapshot(0.7, 0.8),
        hot=True,
    )
    assert d.actions() == ["compress", "pin", "evict"] and d.reason == "hot_content"
    d = make_decision(
        cs(**all_on, load_threshold=0.7, memory_threshold=0.8, hot_content_threshold=2),
        LoadSnapshot(0.69, 0.79),
        hot=False,
    )
    assert not d and d.actions() == []
    # Pixiu's TestCacheStrategyMakeDecision
    d = make_decision(
        cs(enable_pinning=True, enable_eviction=True, load_threshold=0, memory_threshold=1e-7, hot_content_threshold=2),
        LoadSnapshot(0.5, 0.1),
        hot=True,
    )
    assert d.pin and d.evict and not d.compress and d.reason == "hot_content"


def test_zero_thresholds_disable() -> None:
    d = make_decision(
        cs(enable_compression=True, enable_pinning=True, enable_eviction=True), LoadSnapshot(1.0, 1.0), hot=True
    )
    assert not d
    d = make_decision(cs(load_threshold=0.1, memory_threshold=0.1, hot_content_threshold=1), LoadSnapshot(1, 1), True)
    assert not d  # enable_* flags off


def test_resolve_target() -> None:
    lk = LookupResult("e", {"a": InstanceMatch("LocalCPUBackend", 256), "b": InstanceMatch("LocalDiskBackend", 512)})
    assert resolve_target("cfg", "loc", lk) == resolve_target("cfg", "loc", None)
    assert resolve_target("cfg", "loc", lk).instance_id == "cfg"  # type: ignore[union-attr]
    t = resolve_target("", "", lk)
    assert t is not None and (t.instance_id, t.location) == ("b", "LocalDiskBackend")
    t = resolve_target("a", "", lk)
    assert t is not None and t.location == "LocalCPUBackend"
    assert resolve_target("", "", None) is None
    assert resolve_target("", "", LookupResult("e", {})) is None


class FakeClient:
    def __init__(self, fail: dict[str, Exception] | None = None):
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.fail = fail or {}

    async def _do(self, name: str, *args: object) -> ActionResult:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]
        return ActionResult(name, 1)

    async def compress(self, tokens, iid, loc, method, *, deadline=None):  # type: ignore[no-untyped-def]
        return await self._do("compress", iid, loc, method)

    async def pin(self, tokens, iid, loc, *, deadline=None):  # type: ignore[no-untyped-def]
        return await self._do("pin", iid, loc)

    async def evict(self, tokens, iid, *, deadline=None):  # type: ignore[no-untyped-def]
        return await self._do("evict", iid)


async def _direct(fn):  # type: ignore[no-untyped-def]
    return await fn()


CFG = dict(
    enable_compression=True,
    enable_pinning=True,
    enable_eviction=True,
    load_threshold=0.5,
    memory_threshold=0.5,
    hot_content_threshold=1,
    pin_instance_id="p",
    pin_location="LP",
    compress_instance_id="c",
    compress_location="LC",
    evict_instance_id="e",
)


async def test_execute_order_and_stop_on_first_error() -> None:
    cfg = cs(**CFG)
    d = make_decision(cfg, LoadSnapshot(1, 1), True)
    client = FakeClient()
    ex = StrategyExecutor(cfg, client, _direct)  # type: ignore[arg-type]
    assert await ex.execute(d, [1], None) == [("compress", "ok"), ("pin", "ok"), ("evict", "ok")]
    assert client.calls == [("compress", ("c", "LC", "zstd")), ("pin", ("p", "LP")), ("evict", ("e",))]
    client = FakeClient({"compress": StatusError("compress", 500, "x")})
    results: list[tuple[str, str]] = []
    ex = StrategyExecutor(cfg, client, _direct, on_result=lambda a, r: results.append((a, r)))  # type: ignore[arg-type]
    with pytest.raises(StatusError):
        await ex.execute(d, [1], None)
    assert [c[0] for c in client.calls] == ["compress"] and results == [("compress", "error")]


async def test_unsupported_reported_once_then_reprobed_after_backoff() -> None:
    """Issue 10 item 13: a 404 used to disable the action until restart; now it is re-probed after a back-off."""
    cfg = cs(**CFG)
    d = make_decision(cfg, LoadSnapshot(1, 1), True)
    client = FakeClient({"evict": NotSupportedError("evict", 404, "Not Found")})
    reported: list[tuple[str, int, float]] = []
    back: list[str] = []
    now = [0.0]
    ex = StrategyExecutor(
        cfg,
        client,  # type: ignore[arg-type]
        _direct,
        on_unsupported=lambda a, e, n, b: reported.append((a, n, b)),
        on_supported=back.append,
        clock=lambda: now[0],
    )
    for _ in range(3):
        out = await ex.execute(d, [1], None)
        assert out[-1] == ("evict", "unsupported")
    assert reported == [("evict", 1, 30.0)] and ex.unsupported == {"evict"}
    assert [c[0] for c in client.calls].count("evict") == 1  # skipped inside the back-off
    now[0] = 30.0
    await ex.execute(d, [1], None)  # re-probe: still 404 → back-off doubles
    assert reported[-1] == ("evict", 2, 60.0)
    assert [c[0] for c in client.calls].count("evict") == 2
    now[0] = 60.0
    await ex.execute(d, [1], None)
    assert [c[0] for c in client.calls].count("evict") == 2  # 30 + 60 > 60: still waiting
    for strikes in range(3, 12):  # the back-off is capped
        now[0] = ex._disabled["evict"].retry_at
        await ex.execute(d, [1], None)
        assert reported[-1][1] == strikes
    assert reported[-1][2] == 1800.0
    client.fail.pop("evict")  # the route is back (e.g. the rollout finished)
    now[0] = ex._disabled["evict"].retry_at
    out = await ex.execute(d, [1], None)
    assert out[-1] == ("evict", "ok") and back == ["evict"] and ex.unsupported == set()
    assert (await ex.execute(d, [1], None))[-1] == ("evict", "ok")


def test_signals() -> None:
    proc = iter([0.0, 1.0, 1.5])
    wall = iter([0.0, 1.0, 2.0])
    s = ProcessSignals(
        process_clock=lambda: next(proc), wall_clock=lambda: next(wall), cpu_count=2, rss=lambda: 300, memory_limit=1000
    )
    first = s.sample()
    assert first.cpu_usage == 0.0 and first.memory_usage == pytest.approx(0.3)  # first sample → 0
    assert s.sample().cpu_usage == pytest.approx(0.5)  # 1 cpu-s over 1 s × 2 cpus
    assert s.sample().cpu_usage == pytest.approx(0.25)
    s = ProcessSignals(
        process_clock=lambda: 0.0,
        wall_clock=iter([0.0, 1.0]).__next__,
        cpu_count=1,
        rss=lambda: 5000,
        memory_limit=1000,
    )
    s.sample()
    snap = s.sample()
    assert snap.cpu_usage == 0.0 and snap.memory_usage == 1.0  # clamped
    real = ProcessSignals()
    real.sample()
    snap = real.sample()
    assert 0 <= snap.cpu_usage <= 1 and 0 < snap.memory_usage <= 1
    assert StaticSignals(0.2, 0.3).sample() == LoadSnapshot(0.2, 0.3)


def test_controller_bodies_are_the_json_the_stdlib_writes() -> None:
    payload = {"tokens": [1, 2, 4294967295], "instance_id": "engine-é", "location": "LocalCPUBackend"}
    assert json.loads(controller_body(payload)) == json.loads(stdlib_body(payload)) == payload
    # an id msgspec cannot encode (a lone surrogate echoed from a controller answer) is written as before
    odd = {"tokens": [1], "instance_id": "\ud800"}
    assert controller_body(odd) == stdlib_body(odd) == b'{"tokens":[1],"instance_id":"\\ud800"}'
