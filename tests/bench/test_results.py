"""summarize(): percentiles, hit rate, throughput, per-instance counts and hotspot; JSON round-trip."""

from __future__ import annotations

import math

import pytest

from kvgate_bench.results import ModeSummary, RequestResult, RunResults, hotspot_factor, percentile, summarize


def _results() -> list[RequestResult]:
    rows = [
        RequestResult(f"r{i}", "kv", inst, "ok", ttft, ttft * 2, 100, cached, output_tokens=10, start_s=float(i))
        for i, (inst, ttft, cached) in enumerate(
            [("a", 0.1, 0), ("a", 0.2, 50), ("a", 0.3, 50), ("b", 0.4, 100), ("a", 0.5, 0)]
        )
    ]
    rows.append(RequestResult("r5", "kv", "b", "error", None, None, 100, 0, error="HTTPError: 503 busy", start_s=5.0))
    rows.append(RequestResult("r6", "kv", None, "timeout", None, None, 100, 0))
    rows.append(RequestResult("x0", "other", "a", "ok", 9.0, 9.0, 100, 100))
    return rows


def test_percentile_linear() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 95) == pytest.approx(4.8)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


def test_summarize_hand_built() -> None:
    s = summarize("kv", _results(), oracle=0.5, instances=["a", "b", "c"])
    assert (s.requests, s.ok, s.errors) == (7, 5, 2)
    assert s.prompt_tokens == 500 and s.cached_tokens == 200 and s.output_tokens == 50
    assert s.hit_rate == pytest.approx(0.4)
    assert s.pct_of_oracle == pytest.approx(80.0)
    assert s.ttft_p50_s == pytest.approx(0.3)
    assert s.ttft_p95_s == pytest.approx(0.48)
    assert s.ttft_p99_s == pytest.approx(0.496)
    assert s.ttft_mean_s == pytest.approx(0.3)
    assert s.e2e_p50_s == pytest.approx(0.6) and s.e2e_p99_s == pytest.approx(0.992)
    # wall: first send 0.0 → last completion 4.0 + 1.0
    assert s.wall_s == pytest.approx(5.0)
    assert s.throughput_rps == pytest.approx(1.0) and s.output_tps == pytest.approx(10.0)
    assert s.instance_counts == {"a": 4, "b": 2, "c": 0}
    assert s.hotspot == pytest.approx(3 * 4 / 6)
    assert s.error_kinds == {"HTTPError": 1, "timeout": 1}
    explicit = summarize("kv", _results(), hit_rate=0.25, oracle=None, wall_s=10.0)
    assert explicit.hit_rate == 0.25 and explicit.pct_of_oracle is None
    assert explicit.throughput_rps == pytest.approx(0.5)
    assert explicit.instance_counts == {"a": 4, "b": 2} and explicit.hotspot == pytest.approx(2 * 4 / 6)


def test_summarize_empty_and_hotspot() -> None:
    s = summarize("none", [], instances=["a", "b"])
    assert s.requests == 0 and s.ttft_p50_s is None and s.hit_rate == 0.0 and s.throughput_rps == 0.0
    assert s.hotspot == 0.0 and s.instance_counts == {"a": 0, "b": 0}
    assert hotspot_factor({"a": 5, "b": 5}) == 1.0
    assert hotspot_factor({"a": 10}, ["a", "b", "c", "d"]) == 4.0


def test_json_round_trip(tmp_path) -> None:
    rows = _results()
    summaries = [summarize("kv", rows, oracle=0.5), summarize("other", rows)]
    run = RunResults({"workload": "demo", "seed": 1, "bad": math.inf}, summaries, rows)
    path = run.save(tmp_path / "r.json")
    back = RunResults.load(path)
    assert back.results == rows
    assert back.summaries == summaries
    assert back.meta["bad"] is None
    assert ModeSummary.from_dict({**summaries[0].to_dict(), "extra": 1}) == summaries[0]
    assert RequestResult.from_dict(rows[0].to_dict()) == rows[0]
