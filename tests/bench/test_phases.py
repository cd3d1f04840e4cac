"""Per-phase breakdown of a benchmark run (pure, on synthetic rows): hit rate and TTFT per (mode, phase)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate_bench.report import phase_table, render_markdown, write_report
from kvgate_bench.results import RequestResult, RunResults, has_phases, phase_summaries, summarize


def _row(mode: str, phase: str, inst: str | None, ttft: float | None, prompt: int, cached: int, status: str = "ok"):  # type: ignore[no-untyped-def]
    return RequestResult(f"{mode}-{phase}-{inst}-{ttft}-{prompt}", mode, inst, status, ttft,
                         None if ttft is None else ttft + 0.5, prompt, cached, phase=phase)  # fmt: skip


ROWS = [
    # kvcache: hot requests half cached, churn never
    _row("kvcache", "churn", "sim-0", 0.20, 2000, 0),
    _row("kvcache", "hot", "sim-0", 0.10, 1000, 0),
    _row("kvcache", "hot", "sim-0", 0.02, 1000, 1000),
    _row("kvcache", "hot", "sim-1", 0.30, 1000, 0),
    _row("kvcache", "hot", "sim-1", 0.04, 1000, 1000),
    _row("kvcache", "hot", "sim-1", None, 1000, 1000, status="timeout"),  # failed: no tokens, no TTFT
    # managed: hot requests fully cached
    _row("kvcache-managed", "hot", "sim-0", 0.01, 1000, 1000),
    _row("kvcache-managed", "hot", "sim-1", 0.03, 1000, 750),
    _row("kvcache-managed", "churn", "sim-1", 0.25, 2000, 0),
    _row("kvcache-managed", "", "sim-1", 0.05, 100, 0),  # no phase among phased rows: "main"
]


def test_phase_summaries_per_mode_and_phase() -> None:
    phases = phase_summaries(ROWS, ["sim-0", "sim-1", "sim-2"])
    assert [(p.mode, p.phase) for p in phases] == [
        ("kvcache", "hot"), ("kvcache", "churn"),
        ("kvcache-managed", "hot"), ("kvcache-managed", "churn"), ("kvcache-managed", "main"),
    ]  # fmt: skip
    hot = phases[0]
    assert (hot.requests, hot.ok) == (5, 4)
    assert hot.prompt_tokens == 4000 and hot.cached_tokens == 2000 and hot.hit_rate == pytest.approx(0.5)
    # percentiles over the 4 successful TTFTs 0.02, 0.04, 0.10, 0.30 (linear interpolation)
    assert hot.ttft_p50_s == pytest.approx(0.07)
    assert hot.ttft_p95_s == pytest.approx(0.10 + 0.85 * 0.20)
    assert hot.ttft_p99_s == pytest.approx(0.10 + 0.97 * 0.20)
    # traffic counts every request that reached an instance, idle instances included (hotspot 3 × 3/5)
    assert hot.instance_counts == {"sim-0": 2, "sim-1": 3, "sim-2": 0}
    assert hot.hotspot == pytest.approx(3 * 3 / 5)
    managed_hot = phases[2]
    assert managed_hot.hit_rate == pytest.approx(0.875)
    assert managed_hot.ttft_p50_s == pytest.approx(0.02)
    assert phases[1].hit_rate == 0.0 and phases[1].ttft_p99_s == pytest.approx(0.20)
    # the whole-mode summary is unchanged by phases
    assert summarize("kvcache", ROWS).requests == 6


def test_no_phases_no_breakdown() -> None:
    plain = [RequestResult("a", "m", "sim-0", "ok", 0.1, 0.2, 10, 5), RequestResult("b", "m", "sim-0", "ok", 0.1,
             0.2, 10, 5, phase="main")]  # fmt: skip
    assert not has_phases(plain)
    assert phase_summaries(plain) == []
    assert has_phases(ROWS)


def test_phases_in_results_json_and_report(tmp_path: Path) -> None:
    summaries = [summarize(m, ROWS) for m in ("kvcache", "kvcache-managed")]
    paths = write_report(tmp_path / "with", summaries, ROWS, {"title": "t"})
    data = RunResults.load(paths["results_json"])
    assert [(p.mode, p.phase, p.hit_rate) for p in data.phases][:2] == [("kvcache", "hot", 0.5), ("kvcache", "churn",
                                                                                                    0.0)]  # fmt: skip
    assert data.results[1].phase == "hot"
    md = paths["report_md"].read_text(encoding="utf-8")
    assert "## By workload phase" in md and "| kvcache-managed | hot | 2 | 2 | 87.5% |" in md
    # no phases: no "phases" key, no section
    plain = [RequestResult("a", "m", "sim-0", "ok", 0.1, 0.2, 10, 5)]
    paths = write_report(tmp_path / "without", [summarize("m", plain)], plain, {"title": "t"})
    assert '"phases"' not in paths["results_json"].read_text(encoding="utf-8")
    assert "By workload phase" not in render_markdown([summarize("m", plain)], {}, {})
    assert phase_table(phase_summaries(ROWS)).row_count == 5
