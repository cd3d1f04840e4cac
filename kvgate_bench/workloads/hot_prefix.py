"""Cache-management workloads (issue 13): hot prefixes churned out of the cache, and one prefix that overloads.

* :func:`hot_prefix_churn` — a few long hot system prompts come back every ``period_s``; between two visits,
  ``one_offs_per_gap`` one-off long prompts (never repeated) arrive. Size ``one_offs_per_gap × one_off_len``
  above the fleet's cache (GPU prefix cache + LMCache CPU tier of every engine) and LRU evicts the hot prompts
  before they return: only pinning keeps them. Defaults fit 4 engines of ``--gpu-blocks 800 --lmcache-chunks
  64`` (12.8k + 16.4k tokens each): 60 × 2,048 = 123k one-off tokens per 10 s gap, about 31k per engine: 1.9× its
  LMCache tier, 2.4× its GPU cache. 5 requests per visit, so that with the hot prompts kept only
  the 3 first visits miss (4% of the hot requests: below the TTFT p95 rank); about 50 s per mode.
* :func:`hot_prefix_overload` — ``hot_share`` of the requests carry prefix 0, the rest spread over the other
  prefixes: routing every hot request to the one holder overloads it, unless a second holder is warmed.

Hot requests are chats ``[system: prefix, user: question]`` with ``phase = "hot"`` and ``group`` = the prefix
index; churn / other requests have ``phase = "churn"`` / ``"other"``, so a report can give the hot requests'
hit rate on their own. Open loop; same arguments and seed ⇒ identical requests.
"""

from __future__ import annotations

import random

from kvgate_bench.workloads.model import Request, Workload
from kvgate_bench.workloads.text import poisson_arrivals, seeded_rng, words_text
from kvgate_sim.tokenizer import Tokenizer, get_tokenizer


def _chat(tok: Tokenizer, req_id: str, system: str | None, user: str, max_tokens: int, t: float, phase: str) -> Request:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    return Request(req_id, "chat", tok.encode_chat(messages), max_tokens, t, messages=messages, phase=phase)


def _positive(**kw: float) -> None:
    bad = [k for k, v in kw.items() if not v > 0]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be positive")


def hot_prefix_churn(
    num_hot_prefixes: int = 3,
    hot_prefix_len: int = 1536,
    question_len: int = 32,
    hot_requests_per_visit: int = 5,
    num_rounds: int = 5,
    period_s: float = 10.0,
    one_off_len: int = 2048,
    one_offs_per_gap: int = 60,
    output_len: int = 16,
    seed: int = 0,
    *,
    visit_spacing_s: float = 0.1,
) -> Workload:
    """Hot system prompts revisited every ``period_s``; one-off long prompts churn the cache in between.

    Visit ``r`` starts at ``r × period_s``: every hot prefix gets ``hot_requests_per_visit`` requests (each its
    own question), ``visit_spacing_s`` apart (0.1 s: a request's prefill is done and its KV events are in the
    gateway's index before the next one of the visit arrives). Between visit ``r`` and ``r + 1`` (for every
    ``r`` but the last), ``one_offs_per_gap`` one-off prompts of ``one_off_len`` tokens arrive at uniform random
    times after the visit's last hot request.
    """
    _positive(
        num_hot_prefixes=num_hot_prefixes,
        hot_prefix_len=hot_prefix_len,
        question_len=question_len,
        hot_requests_per_visit=hot_requests_per_visit,
        num_rounds=num_rounds,
        period_s=period_s,
        one_off_len=one_off_len,
        output_len=output_len,
        visit_spacing_s=visit_spacing_s,
    )
    if one_offs_per_gap < 0:
        raise ValueError("one_offs_per_gap must be >= 0")
    visit_span = num_hot_prefixes * hot_requests_per_visit * visit_spacing_s
    if visit_span >= period_s:
        raise ValueError("period_s must exceed a visit (num_hot_prefixes × hot_requests_per_visit × spacing)")
    tok = get_tokenizer()
    rng = seeded_rng(seed, "hot_prefix_churn")
    systems = [words_text(rng, hot_prefix_len) for _ in range(num_hot_prefixes)]
    requests: list[Request] = []
    for r in range(num_rounds):
        start = r * period_s
        k = 0
        for h in range(num_hot_prefixes):
            for j in range(hot_requests_per_visit):
                req = _chat(
                    tok,
                    f"hpc-hot-{r:03d}-{h:02d}-{j:02d}",
                    systems[h],
                    words_text(rng, question_len),
                    output_len,
                    start + k * visit_spacing_s,
                    "hot",
                )
                req.group = h
                req.round_idx = r
                requests.append(req)
                k += 1
        if r == num_rounds - 1:
            break
        lo, hi = start + visit_span, start + period_s
        times = sorted(rng.uniform(lo, hi) for _ in range(one_offs_per_gap))
        for i, t in enumerate(times):
            req = _chat(tok, f"hpc-churn-{r:03d}-{i:04d}", None, words_text(rng, one_off_len), output_len, t, "churn")
            req.round_idx = r
            requests.append(req)
    requests.sort(key=lambda q: q.arrival_s)
    params = {
        "num_hot_prefixes": num_hot_prefixes,
        "hot_prefix_len": hot_prefix_len,
        "question_len": question_len,
        "hot_requests_per_visit": hot_requests_per_visit,
        "num_rounds": num_rounds,
        "period_s": period_s,
        "one_off_len": one_off_len,
        "one_offs_per_gap": one_offs_per_gap,
        "output_len": output_len,
        "seed": seed,
        "visit_spacing_s": visit_spacing_s,
    }
    return Workload(
        name="hot_prefix_churn",
        params=params,
        requests=requests,
        description="hot system prompts revisited after one-off long prompts churned the cache",
    )


def _assign_groups(rng: random.Random, n: int, num_prefixes: int, hot_share: float) -> list[int]:
    if num_prefixes == 1:
        return [0] * n
    n_hot = round(hot_share * n)
    groups = [0] * n_hot + [1 + i % (num_prefixes - 1) for i in range(n - n_hot)]
    rng.shuffle(groups)
    return groups


def hot_prefix_overload(
    num_prefixes: int = 4,
    hot_share: float = 0.8,
    prefix_len: int = 1024,
    question_len: int = 32,
    num_requests: int = 320,
    request_rate: float = 16.0,
    output_len: int = 64,
    seed: int = 0,
) -> Workload:
    """``hot_share`` of ``num_requests`` share prefix 0; the rest go round-robin to prefixes 1..n-1.

    Open loop, Poisson arrivals at ``request_rate`` (``inf`` = all at 0). Each request is its own question
    after the shared system prompt."""
    _positive(
        num_prefixes=num_prefixes,
        prefix_len=prefix_len,
        question_len=question_len,
        num_requests=num_requests,
        output_len=output_len,
    )
    if not (0.0 <= hot_share <= 1.0):
        raise ValueError("hot_share must be between 0 and 1")
    tok = get_tokenizer()
    rng = seeded_rng(seed, "hot_prefix_overload")
    systems = [words_text(rng, prefix_len) for _ in range(num_prefixes)]
    groups = _assign_groups(rng, num_requests, num_prefixes, hot_share)
    arrivals = poisson_arrivals(rng, num_requests, request_rate)
    requests: list[Request] = []
    for i, (g, t) in enumerate(zip(groups, arrivals, strict=True)):
        phase = "hot" if g == 0 else "other"
        req = _chat(tok, f"hpo-{i:05d}", systems[g], words_text(rng, question_len), output_len, t, phase)
        req.group = g
        requests.append(req)
    params = {
        "num_prefixes": num_prefixes,
        "hot_share": hot_share,
        "prefix_len": prefix_len,
        "question_len": question_len,
        "num_requests": num_requests,
        "request_rate": request_rate,
        "output_len": output_len,
        "seed": seed,
    }
    return Workload(
        name="hot_prefix_overload",
        params=params,
        requests=requests,
        description="one prefix carries most of the traffic",
    )
