"""Benchmark result records and per-mode summaries (TEST AND BENCHMARK TOOL, not product code).

A *mode* is one routing configuration under test (e.g. ``round_robin``, ``kvaware``). Runners produce one
:class:`RequestResult` per request; :func:`summarize` folds them into a :class:`ModeSummary`.
Everything (de)serialises to plain JSON; no prompt text is ever stored.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STATUS_OK = "ok"


@dataclass(slots=True)
class RequestResult:
    """Outcome of one request in one mode.

    ``status`` is ``"ok"`` or a failure kind (``"error"``, ``"timeout"``, ``"http_503"``…). Times are in
    seconds from the request's send; ``start_s`` is the send time from the start of the run.
    ``cached_tokens`` are prompt tokens served from cache (engine-reported); ``instance`` is the backend
    that served the request (``None`` if it never reached one); ``phase`` is the workload request's phase.
    """

    req_id: str
    mode: str
    instance: str | None
    status: str
    ttft_s: float | None
    e2e_s: float | None
    prompt_tokens: int
    cached_tokens: int
    error: str | None = None
    output_tokens: int = 0
    start_s: float | None = None
    phase: str = ""  # the workload request's phase ("hot", "churn", "other", "warmup"…; "" or "main": none)

    @property
    def ok(self) -> bool:
        """True when the request completed successfully."""
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestResult:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(slots=True)
class ModeSummary:
    """Aggregates for one mode. Latencies in seconds (``None`` without successful requests).

    ``hit_rate`` is the prompt-token cache hit rate; ``oracle`` the infinite-cache perfect-routing bound
    (both fractions in [0, 1]); ``pct_of_oracle = 100 × hit_rate / oracle``. ``hotspot`` is
    ``len(instances) × largest traffic share``: 1.0 is perfectly balanced, ``len(instances)`` means all
    traffic hit one instance.
    """

    mode: str
    requests: int
    ok: int
    errors: int
    hit_rate: float
    oracle: float | None
    pct_of_oracle: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    ttft_mean_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    e2e_mean_s: float | None
    throughput_rps: float
    output_tps: float
    wall_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    instance_counts: dict[str, int] = field(default_factory=dict)
    hotspot: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModeSummary:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def percentile(values: Sequence[float], q: float) -> float | None:
    """``q``-th percentile (0–100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def hotspot_factor(counts: Mapping[str, int], instances: Sequence[str] | None = None) -> float:
    """``number of instances × largest traffic share`` (0.0 when there is no traffic)."""
    names = list(instances) if instances else list(counts)
    total = sum(counts.values())
    if total == 0 or not names:
        return 0.0
    return len(names) * max(counts.values()) / total


_MEDIAN_FIELDS = (
    "hit_rate", "oracle", "pct_of_oracle", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "ttft_mean_s", "e2e_p50_s",
    "e2e_p99_s", "e2e_mean_s", "throughput_rps", "output_tps", "wall_s", "hotspot",
)  # fmt: skip
_SUM_FIELDS = ("requests", "ok", "errors", "prompt_tokens", "cached_tokens", "output_tokens")


def median_summary(runs: Sequence[ModeSummary]) -> ModeSummary:
    """One mode's summary over repeated runs: every rate, latency and throughput is the median of the runs'
    values (``None`` values left out); request/token counts, instance traffic and error kinds are totals."""
    if not runs:
        raise ValueError("median_summary needs at least one run")
    if len({r.mode for r in runs}) != 1:
        raise ValueError("median_summary: runs of different modes")
    if len(runs) == 1:
        return runs[0]
    kw: dict[str, Any] = {"mode": runs[0].mode}
    for name in _MEDIAN_FIELDS:
        vals = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        kw[name] = statistics.median(vals) if vals else None
    for name in _SUM_FIELDS:
        kw[name] = sum(getattr(r, name) for r in runs)
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in runs:
        counts.update(r.instance_counts)
        kinds.update(r.error_kinds)
    kw["instance_counts"] = dict(sorted(counts.items()))
    kw["error_kinds"] = dict(kinds)
    return ModeSummary(**kw)


def _error_kind(r: RequestResult) -> str:
    if r.error:
        head = r.error.split(":", 1)[0].strip()
        return head[:60] or r.status
    return r.status


def summarize(
    mode: str,
    results: Iterable[RequestResult],
    hit_rate: float | None = None,
    oracle: float | None = None,
    wall_s: float | None = None,
    instances: Sequence[str] | None = None,
) -> ModeSummary:
    """Fold ``results`` of one mode into a :class:`ModeSummary`.

    ``hit_rate`` defaults to cached / prompt tokens over successful requests (pass the engines' own
    counter-based rate if you have it). ``wall_s`` defaults to the span from the first send to the last
    completion when ``start_s`` is recorded, else the sum of E2E times. ``instances`` lists every backend
    (so idle ones count in the per-instance table and the hotspot factor); by default the ones seen.
    Traffic counts include failed requests that reached an instance.
    """
    rows = [r for r in results if r.mode == mode]
    ok_rows = [r for r in rows if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok_rows)
    cached_tokens = sum(r.cached_tokens for r in ok_rows)
    output_tokens = sum(r.output_tokens for r in ok_rows)
    if hit_rate is None:
        hit_rate = cached_tokens / prompt_tokens if prompt_tokens else 0.0
    pct = 100.0 * hit_rate / oracle if oracle else None
    ttfts = [r.ttft_s for r in ok_rows if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok_rows if r.e2e_s is not None]
    if wall_s is None:
        timed = [(r.start_s, r.e2e_s) for r in rows if r.start_s is not None and r.e2e_s is not None]
        if timed:
            wall_s = max(s + e for s, e in timed) - min(s for s, _ in timed)
        else:
            wall_s = sum(e2es)
    counts: Counter[str] = Counter()
    for name in instances or ():
        counts[name] += 0
    for r in rows:
        if r.instance is not None:
            counts[r.instance] += 1
    errors = [r for r in rows if not r.ok]
    return ModeSummary(
        mode=mode,
        requests=len(rows),
        ok=len(ok_rows),
        errors=len(errors),
        hit_rate=hit_rate,
        oracle=oracle,
        pct_of_oracle=pct,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        ttft_p99_s=percentile(ttfts, 99),
        ttft_mean_s=_mean(ttfts),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        e2e_mean_s=_mean(e2es),
        throughput_rps=len(ok_rows) / wall_s if wall_s else 0.0,
        output_tps=output_tokens / wall_s if wall_s else 0.0,
        wall_s=wall_s,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        output_tokens=output_tokens,
        instance_counts=dict(sorted(counts.items())),
        hotspot=hotspot_factor(counts, list(counts)),
        error_kinds=dict(sorted(Counter(_error_kind(r) for r in errors).items())),
    )


#: phases that mean "the workload has no phases" (``Request.phase`` defaults to "main")
NO_PHASE = frozenset({"", "main"})
_PHASE_ORDER = ("hot", "churn", "other", "pre_warmup", "warmup", "query")


@dataclass(slots=True)
class PhaseSummary:
    """One mode's requests of one workload phase (e.g. the hot-prefix requests of ``hot_prefix_churn``).

    ``hit_rate`` = cached / prompt tokens of the phase's successful requests (engine-reported per request);
    TTFT percentiles over the same requests; ``hotspot`` as in :class:`ModeSummary`, over the phase's traffic.
    With ``--repeat`` the rows of every run are pooled.
    """

    mode: str
    phase: str
    requests: int
    ok: int
    hit_rate: float
    prompt_tokens: int
    cached_tokens: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    instance_counts: dict[str, int] = field(default_factory=dict)
    hotspot: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return asdict(self)


def has_phases(results: Iterable[RequestResult]) -> bool:
    """True when some request carries a real phase (not ``""`` / ``"main"``)."""
    return any(r.phase not in NO_PHASE for r in results)


def _phase_key(phase: str) -> tuple[int, str]:
    return (_PHASE_ORDER.index(phase) if phase in _PHASE_ORDER else len(_PHASE_ORDER), phase)


def phase_summaries(results: Iterable[RequestResult], instances: Sequence[str] | None = None) -> list[PhaseSummary]:
    """Per (mode, phase) hit rate, TTFT p50/p95/p99 and traffic; ``[]`` when no request has a phase.

    Modes keep their first-seen order; phases go hot, churn, other, pre_warmup, warmup, query, then the rest
    by name. A request without a phase counts as phase ``"main"`` when others have one. ``instances`` lists every
    backend (idle ones count in the hotspot factor).
    """
    rows = list(results)
    if not has_phases(rows):
        return []
    groups: dict[str, dict[str, list[RequestResult]]] = {}
    for r in rows:
        groups.setdefault(r.mode, {}).setdefault(r.phase or "main", []).append(r)
    out: list[PhaseSummary] = []
    for mode, by_phase in groups.items():
        for phase in sorted(by_phase, key=_phase_key):
            part = by_phase[phase]
            ok_rows = [r for r in part if r.ok]
            prompt = sum(r.prompt_tokens for r in ok_rows)
            cached = sum(r.cached_tokens for r in ok_rows)
            ttfts = [r.ttft_s for r in ok_rows if r.ttft_s is not None]
            counts: Counter[str] = Counter()
            for name in instances or ():
                counts[name] += 0
            for r in part:
                if r.instance is not None:
                    counts[r.instance] += 1
            out.append(
                PhaseSummary(
                    mode=mode,
                    phase=phase,
                    requests=len(part),
                    ok=len(ok_rows),
                    hit_rate=cached / prompt if prompt else 0.0,
                    prompt_tokens=prompt,
                    cached_tokens=cached,
                    ttft_p50_s=percentile(ttfts, 50),
                    ttft_p95_s=percentile(ttfts, 95),
                    ttft_p99_s=percentile(ttfts, 99),
                    instance_counts=dict(sorted(counts.items())),
                    hotspot=hotspot_factor(counts, list(counts)),
                )
            )
    return out


@dataclass(slots=True)
class RunResults:
    """Everything one benchmark run produced: metadata, per-mode summaries, per-request results."""

    meta: dict[str, Any]
    summaries: list[ModeSummary]
    results: list[RequestResult]
    phases: list[PhaseSummary] = field(default_factory=list)  # per (mode, phase); empty without phases

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (``meta`` must itself be JSON-serialisable; non-JSON values become strings).

        ``phases`` is present only when the workload has phases."""
        out: dict[str, Any] = {"meta": self.meta, "summaries": [s.to_dict() for s in self.summaries]}
        if self.phases:
            out["phases"] = [p.to_dict() for p in self.phases]
        out["requests"] = [r.to_dict() for r in self.results]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResults:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(PhaseSummary)}
        return cls(
            meta=dict(data.get("meta", {})),
            summaries=[ModeSummary.from_dict(s) for s in data.get("summaries", [])],
            results=[RequestResult.from_dict(r) for r in data.get("requests", [])],
            phases=[PhaseSummary(**{k: v for k, v in p.items() if k in names}) for p in data.get("phases", [])],
        )

    def dumps(self) -> str:
        """JSON text (indented, ``NaN``/``inf`` written as null)."""
        return json.dumps(_json_safe(self.to_dict()), indent=2, sort_keys=False, default=str)

    @classmethod
    def loads(cls, text: str) -> RunResults:
        """Parse :meth:`dumps` output."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write JSON to ``path``; returns it."""
        p = Path(path)
        p.write_text(self.dumps() + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> RunResults:
        """Read a file written by :meth:`save`."""
        return cls.loads(Path(path).read_text(encoding="utf-8"))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass(slots=True)
class ModeRun:
    """What one mode produced (shared shape of both runners)."""

    mode: str
    results: list[RequestResult]
    hit_rate: float
    wall_s: float
    instances: list[str]
    info: dict[str, Any] = field(default_factory=dict)
