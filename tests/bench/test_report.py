"""Report writer: results.json, report.md and PNG plots; rich table."""

from __future__ import annotations

import json

from rich.console import Console

from kvgate_bench.report import markdown_table, print_summary, write_report
from kvgate_bench.results import RequestResult, RunResults, summarize


def _data() -> tuple[list, list[RequestResult]]:
    rows: list[RequestResult] = []
    for mode, inst_cycle, cached in (("round_robin", ["e0", "e1"], 10), ("kvaware", ["e0", "e0", "e1"], 80)):
        for i in range(12):
            rows.append(
                RequestResult(
                    f"{mode}-{i}", mode, inst_cycle[i % len(inst_cycle)], "ok", 0.05 + 0.01 * i, 0.2 + 0.01 * i,
                    100, cached, output_tokens=8, start_s=i * 0.1,
                )
            )  # fmt: skip
    rows.append(RequestResult("kvaware-err", "kvaware", "e1", "error", None, None, 100, 0, error="boom: x|y"))
    summaries = [
        summarize("round_robin", rows, oracle=0.8, instances=["e0", "e1", "e2"]),
        summarize("kvaware", rows, oracle=0.8, instances=["e0", "e1", "e2"]),
    ]
    return summaries, rows


def test_write_report(tmp_path) -> None:
    summaries, rows = _data()
    meta = {"workload": "shared_prefix", "params": {"num_groups": 4}, "instances": 3}
    paths = write_report(tmp_path / "out", summaries, rows, meta)
    assert set(paths) == {"results_json", "report_md", "ttft_cdf", "instance_traffic", "hit_rate"}
    for key in ("ttft_cdf", "instance_traffic", "hit_rate"):
        data = paths[key].read_bytes()
        assert paths[key].suffix == ".png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    run = RunResults.load(paths["results_json"])
    assert run.meta == meta and run.summaries == summaries and run.results == rows
    json.loads(paths["results_json"].read_text())
    md = paths["report_md"].read_text()
    assert "| mode |" in md and "round_robin" in md and "kvaware" in md
    assert "num_groups" in md and "![ttft_cdf](ttft_cdf.png)" in md
    assert "boom" in md and "e2:0" in md


def test_tables() -> None:
    summaries, _ = _data()
    md = markdown_table(summaries)
    assert md.count("\n") == 3
    console = Console(record=True, width=250)
    print_summary(summaries, console=console)
    text = console.export_text()
    assert "kvaware" in text and "round_robin" in text and "hotspot" in text
