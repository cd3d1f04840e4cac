"""Benchmark workload generators (TEST AND BENCHMARK TOOL, not product code).

Four public workload families, re-implemented offline and deterministically (same arguments and seed ⇒
identical requests, byte for byte):

* :func:`multi_round_qa` — vLLM production-stack ``benchmarks/multi-round-qa``: many users, each a
  multi-round chat carrying its whole history; a shared "hi hi …" system filler plus a per-user one.
* :func:`shared_prefix` — SGLang ``bench_serving --dataset-name generated-shared-prefix``: groups of
  prompts sharing a random-token system prompt, uniform or Zipf group popularity.
* :func:`long_doc_qa` — LMCache ``benchmarks/long_doc_qa``: a warm-up round over N long documents, then a
  query round repeating them (random / tile / interleave), optional forced misses.
* :func:`mooncake_trace` — replay of the Mooncake FAST'25 conversation trace: every 512-token hash id
  becomes a deterministic block of token ids, so equal hash ids give equal blocks (shared prefixes).

Plus two kvgate workloads for cache management (issue 13): :func:`hot_prefix_churn` (hot system prompts
churned out of the cache between visits) and :func:`hot_prefix_overload` (one prefix carries most traffic).

Every :class:`Request` carries both what is sent over HTTP (``messages`` or ``prompt``) and
``prompt_token_ids``, exactly what the simulated engine sees after tokenisation with the real offline
Qwen2.5 tokenizer (:mod:`kvgate_sim.tokenizer`): ``encode_chat(messages)`` for chat requests,
``encode(prompt)`` for completions. The generators never log prompt text.

One module per concept: :mod:`.model` (data model), :mod:`.text` (token helpers), one module per family
(:mod:`.multi_round`, :mod:`.shared_prefix`, :mod:`.long_doc`, :mod:`.mooncake`, :mod:`.hot_prefix`) and
:mod:`.registry` (the named workloads). This package re-exports their public names.
"""

from __future__ import annotations

from kvgate_bench.workloads.hot_prefix import hot_prefix_churn, hot_prefix_overload
from kvgate_bench.workloads.long_doc import long_doc_qa
from kvgate_bench.workloads.model import ClosedLoop, Request, RequestKind, Workload, iter_token_ids
from kvgate_bench.workloads.mooncake import (
    BUNDLED_TRACE_PATH,
    DEFAULT_TRACE_PATH,
    MOONCAKE_BLOCK_TOKENS,
    load_mooncake_trace,
    mooncake_from_records,
    mooncake_trace,
    scaled_block_tokens,
)
from kvgate_bench.workloads.multi_round import (
    multi_round_first_turn,
    multi_round_qa,
    multi_round_question,
    placeholder_answer,
)
from kvgate_bench.workloads.registry import (
    ALL_WORKLOADS,
    MANAGEMENT_WORKLOADS,
    WORKLOADS,
    WorkloadSpec,
    describe,
    get_workload,
)
from kvgate_bench.workloads.shared_prefix import shared_prefix, zipf_weights
from kvgate_bench.workloads.text import word_block

__all__ = [
    "ALL_WORKLOADS",
    "BUNDLED_TRACE_PATH",
    "DEFAULT_TRACE_PATH",
    "MANAGEMENT_WORKLOADS",
    "MOONCAKE_BLOCK_TOKENS",
    "WORKLOADS",
    "ClosedLoop",
    "Request",
    "RequestKind",
    "Workload",
    "WorkloadSpec",
    "describe",
    "get_workload",
    "hot_prefix_churn",
    "hot_prefix_overload",
    "iter_token_ids",
    "load_mooncake_trace",
    "long_doc_qa",
    "mooncake_from_records",
    "mooncake_trace",
    "multi_round_first_turn",
    "multi_round_qa",
    "multi_round_question",
    "placeholder_answer",
    "scaled_block_tokens",
    "shared_prefix",
    "word_block",
    "zipf_weights",
]
