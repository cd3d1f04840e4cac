"""``kvgate bench --repeat N``: per-metric medians over N runs of every mode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvgate_bench import cli as bench_cli
from kvgate_bench.results import ModeSummary, median_summary


def _summary(mode: str, ttft: float, hit: float, errors: int, inst: dict[str, int]) -> ModeSummary:
    return ModeSummary(
        mode=mode, requests=10, ok=10 - errors, errors=errors, hit_rate=hit, oracle=0.8, pct_of_oracle=hit / 0.8 * 100,
        ttft_p50_s=ttft, ttft_p95_s=ttft * 2, ttft_p99_s=None if ttft > 5 else ttft * 3, ttft_mean_s=ttft,
        e2e_p50_s=ttft * 4, e2e_p99_s=ttft * 5, e2e_mean_s=ttft * 4, throughput_rps=1 / ttft, output_tps=2 / ttft,
        wall_s=ttft * 10, prompt_tokens=1000, cached_tokens=int(1000 * hit), output_tokens=100,
        instance_counts=inst, hotspot=1.0, error_kinds={"timeout": errors} if errors else {},
    )  # fmt: skip


def test_median_summary_takes_medians_and_totals() -> None:
    runs = [
        _summary("kv", 0.1, 0.5, 0, {"a": 6, "b": 4}),
        _summary("kv", 0.9, 0.2, 2, {"a": 5, "b": 5}),
        _summary("kv", 0.3, 0.4, 1, {"a": 4, "b": 6}),
    ]
    m = median_summary(runs)
    assert m.ttft_p50_s == pytest.approx(0.3) and m.ttft_p95_s == pytest.approx(0.6)
    assert m.hit_rate == pytest.approx(0.4) and m.e2e_p99_s == pytest.approx(1.5)
    assert m.throughput_rps == pytest.approx(1 / 0.3)
    assert (m.requests, m.ok, m.errors) == (30, 27, 3)
    assert m.instance_counts == {"a": 15, "b": 15} and m.error_kinds == {"timeout": 3}
    assert median_summary(runs[:1]) == runs[0]
    assert median_summary([replace(runs[0], ttft_p99_s=None), runs[1]]).ttft_p99_s == pytest.approx(2.7)
    with pytest.raises(ValueError):
        median_summary([runs[0], replace(runs[1], mode="rr")])


def test_cli_repeat_reports_medians(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    code = bench_cli.main(["--workload", "multi_round_qa", "--virtual", "--engines", "2", "--param", "num_users=3",
                           "--param", "num_rounds=2", "--modes", "round_robin,kvcache", "--repeat", "3",
                           "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["repeat"] == 3
    assert [r["mode"] for r in data["meta"]["runs"]] == ["round_robin", "kvcache"] * 3
    assert [s["mode"] for s in data["summaries"]] == ["round_robin", "kvcache"]
    for s in data["summaries"]:
        per = sorted(r["ttft_p95_s"] for r in data["meta"]["runs"] if r["mode"] == s["mode"])
        assert s["ttft_p95_s"] == pytest.approx(per[1])
        assert s["requests"] == 3 * sum(1 for r in data["meta"]["runs"] if r["mode"] == s["mode"]) * 2
    report = (out / "report.md").read_text()
    assert "medians of 3 runs" in report and "ran 3 times" in report
    with pytest.raises(SystemExit):
        bench_cli.main(["--virtual", "--repeat", "0", "--modes", "round_robin"])
