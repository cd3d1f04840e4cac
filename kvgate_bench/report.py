"""Benchmark report: rich terminal table, ``results.json``, ``report.md`` and PNG plots.

Plots use matplotlib's object API with the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from kvgate_bench.results import ModeSummary, PhaseSummary, RequestResult, RunResults, phase_summaries

_COLUMNS: tuple[str, ...] = (
    "mode",
    "reqs",
    "ok",
    "err",
    "hit rate",
    "oracle",
    "% oracle",
    "TTFT p50",
    "TTFT p95",
    "TTFT p99",
    "E2E p50",
    "E2E p99",
    "req/s",
    "out tok/s",
    "hotspot",
    "per instance",
)


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.1f} ms"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _row(s: ModeSummary) -> list[str]:
    return [
        s.mode,
        str(s.requests),
        str(s.ok),
        str(s.errors),
        _pct(s.hit_rate),
        _pct(s.oracle),
        "–" if s.pct_of_oracle is None else f"{s.pct_of_oracle:.1f}%",
        _ms(s.ttft_p50_s),
        _ms(s.ttft_p95_s),
        _ms(s.ttft_p99_s),
        _ms(s.e2e_p50_s),
        _ms(s.e2e_p99_s),
        f"{s.throughput_rps:.2f}",
        f"{s.output_tps:.1f}",
        f"{s.hotspot:.2f}",
        " ".join(f"{k}:{v}" for k, v in s.instance_counts.items()),
    ]


def summary_table(summaries: Sequence[ModeSummary], title: str = "kvgate benchmark") -> Table:
    """A rich :class:`Table` with one row per mode."""
    table = Table(title=title, header_style="bold")
    for i, name in enumerate(_COLUMNS):
        table.add_column(name, justify="left" if i in (0, len(_COLUMNS) - 1) else "right")
    for s in summaries:
        table.add_row(*_row(s))
    return table


def print_summary(summaries: Sequence[ModeSummary], console: Console | None = None, title: str = "") -> None:
    """Print :func:`summary_table` to ``console`` (stdout by default)."""
    (console or Console()).print(summary_table(summaries, title or "kvgate benchmark"))


_PHASE_COLUMNS: tuple[str, ...] = (
    "mode", "phase", "reqs", "ok", "hit rate", "TTFT p50", "TTFT p95", "TTFT p99", "hotspot", "per instance",
)  # fmt: skip


def _phase_row(p: PhaseSummary) -> list[str]:
    return [
        p.mode,
        p.phase,
        str(p.requests),
        str(p.ok),
        _pct(p.hit_rate),
        _ms(p.ttft_p50_s),
        _ms(p.ttft_p95_s),
        _ms(p.ttft_p99_s),
        f"{p.hotspot:.2f}",
        " ".join(f"{k}:{v}" for k, v in p.instance_counts.items()),
    ]


def phase_table(phases: Sequence[PhaseSummary], title: str = "by workload phase") -> Table:
    """A rich :class:`Table` with one row per (mode, phase): hit rate = cached / prompt tokens of the phase."""
    table = Table(title=title, header_style="bold")
    for i, name in enumerate(_PHASE_COLUMNS):
        table.add_column(name, justify="left" if i in (0, 1, len(_PHASE_COLUMNS) - 1) else "right")
    for p in phases:
        table.add_row(*_phase_row(p))
    return table


def print_phases(phases: Sequence[PhaseSummary], console: Console | None = None, title: str = "") -> None:
    """Print :func:`phase_table` (nothing when the workload has no phases)."""
    if phases:
        (console or Console()).print(phase_table(phases, title or "by workload phase"))


def markdown_phase_table(phases: Sequence[PhaseSummary]) -> str:
    """The per-phase breakdown as a Markdown table."""
    lines = ["| " + " | ".join(_PHASE_COLUMNS) + " |", "|" + "|".join("---" for _ in _PHASE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in _phase_row(p)) + " |" for p in phases]
    return "\n".join(lines)


def markdown_table(summaries: Sequence[ModeSummary]) -> str:
    """The summary as a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for s in summaries:
        lines.append("| " + " | ".join(_md_escape(c) for c in _row(s)) + " |")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _meta_lines(meta: Mapping[str, Any]) -> list[str]:
    lines = ["| parameter | value |", "|---|---|"]
    for k, v in meta.items():
        if k == "runs":  # per-run summaries (--repeat): in results.json only
            continue
        val = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        lines.append(f"| {_md_escape(str(k))} | {_md_escape(str(val))} |")
    return lines


def render_markdown(
    summaries: Sequence[ModeSummary],
    meta: Mapping[str, Any],
    plots: Mapping[str, Path],
    phases: Sequence[PhaseSummary] = (),
) -> str:
    """Full ``report.md`` text: results table, per-phase breakdown (when the workload has phases), errors,
    plots, parameters."""
    title = str(meta.get("title") or meta.get("workload") or "kvgate benchmark")
    out = [f"# {title}", "", "## Results", "", markdown_table(summaries), ""]
    out += [
        "hit rate = prompt tokens served from cache; oracle = infinite cache with perfect routing; "
        "hotspot = instances × largest traffic share (1.00 = balanced).",
        "",
    ]
    if phases:
        out += [
            "## By workload phase",
            "",
            markdown_phase_table(phases),
            "",
            "hit rate = cached / prompt tokens of the phase's requests (engine-reported per request).",
            "",
        ]
    repeat = int(meta.get("repeat") or 1)
    if repeat > 1:
        out += [
            f"Every mode ran {repeat} times (a fresh fleet per run, modes interleaved); each rate, latency and "
            "throughput above is the median of its runs, request/error counts are totals (per-run summaries: "
            "`runs` in results.json).",
            "",
        ]
    errs = [(s.mode, k, n) for s in summaries for k, n in s.error_kinds.items()]
    if errs:
        out += ["## Errors", "", "| mode | kind | count |", "|---|---|---|"]
        out += [f"| {_md_escape(m)} | {_md_escape(k)} | {n} |" for m, k, n in errs]
        out.append("")
    if plots:
        out += ["## Plots", ""]
        for name, path in plots.items():
            out += [f"![{name}]({path.name})", ""]
    out += ["## Parameters", "", *_meta_lines(meta), ""]
    return "\n".join(out)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_ttft_cdf(per_mode: Mapping[str, Sequence[RequestResult]], path: Path) -> Path:
    """Empirical TTFT CDF, one line per mode (successful requests only)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for mode, rows in per_mode.items():
        xs = sorted(r.ttft_s * 1000 for r in rows if r.ok and r.ttft_s is not None)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=mode)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("TTFT CDF")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path)


def plot_instance_traffic(summaries: Sequence[ModeSummary], path: Path) -> Path:
    """Grouped bars: requests per instance, one group per instance, one bar per mode."""
    instances = sorted({name for s in summaries for name in s.instance_counts})
    fig = Figure(figsize=(max(6.0, 1.2 * len(instances) + 3), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(summaries), 1)
    width = 0.8 / n
    for j, s in enumerate(summaries):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(instances))]
        ax.bar(xs, [s.instance_counts.get(name, 0) for name in instances], width=width, label=s.mode)
    ax.set_xticks(list(range(len(instances))))
    ax.set_xticklabels(instances, rotation=20)
    ax.set_ylabel("requests")
    ax.set_title("Traffic per instance")
    ax.grid(True, axis="y", alpha=0.3)
    if summaries:
        ax.legend()
    return _save(fig, path)


def plot_hit_rate(summaries: Sequence[ModeSummary], path: Path) -> Path:
    """Bars: prompt-token hit rate per mode, with the oracle bound as a dashed line per bar."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(summaries) + 2), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(summaries)))
    ax.bar(xs, [s.hit_rate * 100 for s in summaries], width=0.6, label="hit rate")
    oracle_drawn = False
    for x, s in zip(xs, summaries, strict=True):
        if s.oracle is not None:
            ax.hlines(
                s.oracle * 100, x - 0.4, x + 0.4, colors="black", linestyles="dashed",
                label="_nolegend_" if oracle_drawn else "oracle",
            )  # fmt: skip
            oracle_drawn = True
    ax.set_xticks(xs)
    ax.set_xticklabels([s.mode for s in summaries], rotation=20)
    ax.set_ylabel("prompt tokens from cache (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Hit rate vs oracle")
    ax.grid(True, axis="y", alpha=0.3)
    if summaries:
        ax.legend()
    return _save(fig, path)


def write_report(
    out_dir: str | Path,
    summaries: Sequence[ModeSummary],
    per_request_results: Iterable[RequestResult],
    meta: Mapping[str, Any],
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``ttft_cdf.png``, ``instance_traffic.png``, ``hit_rate.png``.

    When requests carry workload phases (:func:`~kvgate_bench.results.phase_summaries`), results.json gets a
    ``phases`` list and report.md a "By workload phase" table.

    ``per_request_results`` may mix modes (grouped by ``RequestResult.mode``). Returns the written paths
    keyed ``results_json``, ``report_md``, ``ttft_cdf``, ``instance_traffic``, ``hit_rate``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(per_request_results)
    per_mode: dict[str, list[RequestResult]] = defaultdict(list)
    for s in summaries:  # keep summary order; modes without results still get an (empty) entry
        per_mode.setdefault(s.mode, [])
    for r in results:
        per_mode[r.mode].append(r)
    plots = {
        "ttft_cdf": plot_ttft_cdf(per_mode, out / "ttft_cdf.png"),
        "instance_traffic": plot_instance_traffic(summaries, out / "instance_traffic.png"),
        "hit_rate": plot_hit_rate(summaries, out / "hit_rate.png"),
    }
    instances = sorted({name for s in summaries for name in s.instance_counts})
    phases = phase_summaries(results, instances)
    json_path = RunResults(dict(meta), list(summaries), results, phases).save(out / "results.json")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(summaries, meta, plots, phases), encoding="utf-8")
    return {"results_json": json_path, "report_md": md_path, **plots}
