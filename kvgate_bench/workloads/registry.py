"""The named workloads (``kvgate bench --workload``): defaults, overrides, one-line descriptions."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvgate_bench.workloads.hot_prefix import hot_prefix_churn, hot_prefix_overload
from kvgate_bench.workloads.long_doc import long_doc_qa
from kvgate_bench.workloads.model import Workload
from kvgate_bench.workloads.mooncake import DEFAULT_TRACE_PATH, mooncake_trace
from kvgate_bench.workloads.multi_round import multi_round_qa
from kvgate_bench.workloads.shared_prefix import shared_prefix


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A named workload with small defaults fit for a 2-core CPU box."""

    name: str
    factory: Callable[..., Workload]
    defaults: dict[str, Any]
    help: str


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            "multi_round_qa",
            multi_round_qa,
            {
                "num_users": 8,
                "num_rounds": 4,
                "system_prompt_len": 200,
                "history_len": 400,
                "answer_len": 20,
                "qps": 2.0,
                "seed": 0,
            },
            "production-stack multi-round QA: users' chats carry their whole history (closed loop)",
        ),
        WorkloadSpec(
            "shared_prefix",
            shared_prefix,
            {
                "num_groups": 8,
                "prompts_per_group": 8,
                "system_prompt_len": 512,
                "question_len": 64,
                "output_len": 16,
                "distribution": "uniform",
                "zipf_alpha": 1.1,
                "request_rate": 8.0,
                "seed": 0,
            },
            "SGLang generated-shared-prefix: groups share a random system prompt, uniform popularity",
        ),
        WorkloadSpec(
            "shared_prefix_zipf",
            shared_prefix,
            {
                "num_groups": 16,
                "prompts_per_group": 4,
                "system_prompt_len": 512,
                "question_len": 64,
                "output_len": 16,
                "distribution": "zipf",
                "zipf_alpha": 1.1,
                "request_rate": 8.0,
                "seed": 0,
            },
            "SGLang generated-shared-prefix with Zipf group popularity (hot groups → hotspots)",
        ),
        WorkloadSpec(
            "long_doc_qa",
            long_doc_qa,
            {
                "document_length": 1000,
                "num_documents": 6,
                "output_len": 16,
                "repeat_count": 2,
                "repeat_mode": "random",
                "seed": 0,
                "pre_warmup_count": 2,
                "pre_warmup_len": 100,
                "max_inflight_requests": 2,
            },
            "LMCache long-document QA: warm-up round over documents, then a repeated query round",
        ),
        WorkloadSpec(
            "mooncake",
            mooncake_trace,
            {
                "path": str(DEFAULT_TRACE_PATH),
                "max_requests": 400,
                "block_tokens_scale": 1 / 16,
                "time_scale": 0.1,
                "seed": 0,
                "output_scale": 1 / 16,
                "max_output_tokens": 64,
            },
            "Mooncake conversation trace replay: first 400 requests, 512-token blocks → 32 tokens, 10× faster",
        ),
    )
}


# Cache-management workloads (issue 13). Kept apart from ``WORKLOADS`` (the routing set that ``--workload all``
# runs, where management has nothing to do); ``get_workload`` builds both.
MANAGEMENT_WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            "hot_prefix_churn",
            hot_prefix_churn,
            {
                "num_hot_prefixes": 3,
                "hot_prefix_len": 1536,
                "question_len": 32,
                "hot_requests_per_visit": 5,
                "num_rounds": 5,
                "period_s": 10.0,
                "one_off_len": 2048,
                "one_offs_per_gap": 60,
                "output_len": 16,
                "seed": 0,
                "visit_spacing_s": 0.1,
            },
            "hot system prompts revisited every period; one-off long prompts churn them out of the cache "
            "in between (size for --gpu-blocks 800 --lmcache-chunks 64, 4 engines)",
        ),
        WorkloadSpec(
            "hot_prefix_overload",
            hot_prefix_overload,
            {
                "num_prefixes": 4,
                "hot_share": 0.8,
                "prefix_len": 1024,
                "question_len": 32,
                "num_requests": 320,
                "request_rate": 16.0,
                "output_len": 64,
                "seed": 0,
            },
            "one prefix carries 80% of the traffic (its holder overloads unless a second one is warmed; "
            "size for --max-num-seqs 4, 4 engines)",
        ),
    )
}
ALL_WORKLOADS: dict[str, WorkloadSpec] = {**WORKLOADS, **MANAGEMENT_WORKLOADS}


def get_workload(name: str, **overrides: Any) -> Workload:
    """Build a registered workload with its defaults, overridden by ``overrides`` (unknown keys fail)."""
    try:
        spec = ALL_WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; choose from {', '.join(sorted(ALL_WORKLOADS))}") from None

    accepted = set(inspect.signature(spec.factory).parameters)
    bad = sorted(set(overrides) - accepted)
    if bad:
        raise TypeError(
            f"workload {name!r} does not accept {', '.join(bad)}; parameters: {', '.join(sorted(accepted))}"
        )
    kwargs = {**spec.defaults, **overrides}
    wl = spec.factory(**kwargs)
    wl.name = name
    return wl


def describe(*, management: bool = False) -> str:
    """Human-readable list of registered workloads and their default parameters (for CLI help).

    ``management`` adds the cache-management workloads."""
    lines: list[str] = []
    for spec in (ALL_WORKLOADS if management else WORKLOADS).values():
        lines.append(f"{spec.name}: {spec.help}")
        lines.append("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in spec.defaults.items()))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
