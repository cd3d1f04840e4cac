"""SGLang ``bench_serving`` generated-shared-prefix: prompt groups sharing a system prompt (uniform or Zipf)."""

from __future__ import annotations

import random
from typing import Literal

from kvgate_bench.workloads.model import Request, RequestKind, Workload
from kvgate_bench.workloads.text import poisson_arrivals, random_token_text, seeded_rng
from kvgate_sim.tokenizer import get_tokenizer


def _random_lens(rng: random.Random, full: int, range_ratio: float, num: int) -> list[int]:
    lo = max(int(full * range_ratio), 1)
    hi = max(full, lo)
    return [rng.randint(lo, hi) for _ in range(num)]


def zipf_weights(n: int, alpha: float) -> list[float]:
    """Normalised Zipf weights ``p(rank) ∝ 1 / rank^alpha`` for ranks 1..n (index 0 hottest)."""
    raw = [1.0 / (i + 1) ** alpha for i in range(n)]
    s = sum(raw)
    return [w / s for w in raw]


def shared_prefix(
    num_groups: int = 8,
    prompts_per_group: int = 8,
    system_prompt_len: int = 512,
    question_len: int = 64,
    output_len: int = 16,
    distribution: Literal["uniform", "zipf"] = "uniform",
    zipf_alpha: float = 1.1,
    request_rate: float = 8.0,
    seed: int = 0,
    *,
    range_ratio: float = 1.0,
    ordered: bool = False,
    kind: RequestKind = "completion",
    send_routing_key: bool = False,
) -> Workload:
    """SGLang generated-shared-prefix (open loop, Poisson arrivals at ``request_rate``; ``inf`` = all at 0).

    Each group has a random-token system prompt (``system_prompt_len`` tokens, lengths drawn from
    ``[max(int(len × range_ratio), 1), len]``); each prompt is ``system + "\\n\\n" + question`` with its own
    random question. ``distribution="uniform"``: every group gets exactly ``prompts_per_group`` prompts;
    ``"zipf"``: the same total ``num_groups × prompts_per_group`` prompts are assigned to groups with
    ``p(g) ∝ 1/(g+1)^zipf_alpha`` (group 0 hottest). Prompts are shuffled unless ``ordered``.
    ``kind="chat"`` sends the prompt as a single user message. ``send_routing_key`` adds SGLang's
    ``X-SMG-Routing-Key`` header (shared within a group). ``prompt_token_ids`` are the re-encoded ids.
    """
    if num_groups <= 0 or prompts_per_group <= 0:
        raise ValueError("num_groups and prompts_per_group must be positive")
    if distribution not in ("uniform", "zipf"):
        raise ValueError(f"unknown distribution {distribution!r}")
    tok = get_tokenizer()
    rng = seeded_rng(seed, "shared_prefix")
    total = num_groups * prompts_per_group
    sys_lens = _random_lens(rng, system_prompt_len, range_ratio, num_groups)
    q_lens = _random_lens(rng, question_len, range_ratio, total)
    out_lens = _random_lens(rng, output_len, range_ratio, total)
    systems = [random_token_text(rng, tok, n) for n in sys_lens]
    if distribution == "uniform":
        groups = [g for g in range(num_groups) for _ in range(prompts_per_group)]
    else:
        groups = sorted(rng.choices(range(num_groups), weights=zipf_weights(num_groups, zipf_alpha), k=total))
    items: list[tuple[int, str, int]] = []
    for i, g in enumerate(groups):
        question = random_token_text(rng, tok, q_lens[i])
        items.append((g, f"{systems[g]}\n\n{question}", out_lens[i]))
    if not ordered:
        rng.shuffle(items)
    arrivals = poisson_arrivals(rng, len(items), request_rate)
    requests: list[Request] = []
    for i, ((g, prompt, out_len), t) in enumerate(zip(items, arrivals, strict=True)):
        headers = {"X-SMG-Routing-Key": f"gsp-{seed}-{g}"} if send_routing_key else {}
        req = Request.single_turn(f"gsp-{i:05d}", kind, prompt, out_len, t, tokenizer=tok)
        req.group = g
        req.headers = headers
        requests.append(req)
    params = {
        "num_groups": num_groups,
        "prompts_per_group": prompts_per_group,
        "system_prompt_len": system_prompt_len,
        "question_len": question_len,
        "output_len": output_len,
        "distribution": distribution,
        "zipf_alpha": zipf_alpha,
        "request_rate": request_rate,
        "seed": seed,
        "range_ratio": range_ratio,
        "ordered": ordered,
        "kind": kind,
        "send_routing_key": send_routing_key,
    }
    return Workload(
        name="shared_prefix",
        params=params,
        requests=requests,
        description=f"SGLang generated-shared-prefix ({distribution} groups)",
    )
