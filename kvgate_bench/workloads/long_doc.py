"""LMCache ``benchmarks/long_doc_qa``: a warm-up round over long documents, then a query round repeating them."""

from __future__ import annotations

import random
from typing import Literal

from kvgate_bench.workloads.model import ClosedLoop, Request, Workload
from kvgate_bench.workloads.text import filler
from kvgate_sim.tokenizer import get_tokenizer


def _repeat(prompts: list[int], repeat_count: int, mode: str, rng: random.Random) -> list[int]:
    if mode == "random":
        out = prompts * repeat_count
        rng.shuffle(out)
        return out
    if mode == "tile":
        return prompts * repeat_count
    if mode == "interleave":
        return [p for p in prompts for _ in range(repeat_count)]
    raise ValueError(f"invalid repeat_mode {mode!r}: use 'random', 'tile' or 'interleave'")


def long_doc_qa(
    document_length: int = 1000,
    num_documents: int = 6,
    output_len: int = 16,
    repeat_count: int = 2,
    repeat_mode: Literal["random", "tile", "interleave"] = "random",
    seed: int = 0,
    *,
    hit_miss_ratio: str | None = None,
    completions: bool = False,
    max_inflight_requests: int = 2,
    pre_warmup_count: int = 5,
    pre_warmup_len: int = 1000,
    sleep_time_after_warmup: float = 0.0,
) -> Workload:
    """LMCache long-document QA (closed loop, ``closed_loop.kind == "phased"``).

    Phases: "pre_warmup" (``pre_warmup_count`` prompts ``f"{i}xx" + "hi" × pre_warmup_len``, exactly the
    reference's text), "warmup" (document i = ``f"{i} " + "hi" × document_length``, each once, in order),
    "query" (documents repeated ``repeat_count`` times by ``repeat_mode``; with ``hit_miss_ratio="h:m"``
    every prompt at index ``i % (h+m) >= h`` gets a random-integer prefix, forcing a miss). ``seed`` plays
    the reference's ``--shuffle-seed`` (one ``random.Random(seed)`` for the shuffle then the miss prefixes).
    Chat by default (a single user message), ``completions=True`` for ``/v1/completions``.
    """
    tok = get_tokenizer()
    rng = random.Random(seed)
    docs = [f"{i} {filler(document_length)}" for i in range(num_documents)]
    order = _repeat(list(range(num_documents)), repeat_count, repeat_mode, rng)
    query = [docs[i] for i in order]
    if hit_miss_ratio is not None:
        hit, miss = (int(x) for x in hit_miss_ratio.split(":", 1))
        for i in range(len(query)):
            if i % (hit + miss) >= hit:
                query[i] = f"{rng.randint(-10000000, 10000000)} {query[i]}"
    pre = [f"{i}xx{filler(pre_warmup_len)}" for i in range(pre_warmup_count)]
    plan: list[tuple[str, str, int | None]] = [("pre_warmup", p, None) for p in pre]
    plan += [("warmup", d, i) for i, d in enumerate(docs)]
    plan += [("query", q, order[i]) for i, q in enumerate(query)]
    requests: list[Request] = []
    counters: dict[str, int] = {}
    for phase, text, doc in plan:
        n = counters.get(phase, 0)
        counters[phase] = n + 1
        rid = f"ldqa-{phase}-{n:04d}"
        req = Request.single_turn(rid, "completion" if completions else "chat", text, output_len, tokenizer=tok)
        req.phase = phase
        req.group = doc
        requests.append(req)
    params = {
        "document_length": document_length,
        "num_documents": num_documents,
        "output_len": output_len,
        "repeat_count": repeat_count,
        "repeat_mode": repeat_mode,
        "seed": seed,
        "hit_miss_ratio": hit_miss_ratio,
        "completions": completions,
        "max_inflight_requests": max_inflight_requests,
        "pre_warmup_count": pre_warmup_count,
        "pre_warmup_len": pre_warmup_len,
        "sleep_time_after_warmup": sleep_time_after_warmup,
    }
    return Workload(
        name="long_doc_qa",
        params=params,
        requests=requests,
        closed_loop=ClosedLoop(
            kind="phased",
            max_inflight=max_inflight_requests,
            phases=("pre_warmup", "warmup", "query"),
            sleep_after_warmup_s=sleep_time_after_warmup,
        ),
        description="LMCache long-document QA: warm-up round then repeated query round",
    )
