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

Every :class:`Request` carries both what is sent over HTTP (``messages`` or ``prompt``) and
``prompt_token_ids``, exactly what the simulated engine sees after tokenisation with the real offline
Qwen2.5 tokenizer (:mod:`kvgate_sim.tokenizer`): ``encode_chat(messages)`` for chat requests,
``encode(prompt)`` for completions. The generators never log prompt text.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import gzip
import inspect
import json
import math
import operator
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE, lmcache_chunk_hashes
from kvgate_sim.tokenizer import Tokenizer, get_tokenizer, render_chat

RequestKind = Literal["chat", "completion"]

#: The Mooncake trace vendored as package data (gzip; licence note in ``kvgate_bench/data/README.md``).
BUNDLED_TRACE_PATH = Path(__file__).resolve().parent / "data" / "mooncake_conversation_trace.jsonl.gz"


def _default_trace_path() -> Path:
    """The Mooncake trace: ``$KVGATE_TRACE``, else the copy shipped inside this package."""
    env = os.environ.get("KVGATE_TRACE")
    return Path(env) if env else BUNDLED_TRACE_PATH


DEFAULT_TRACE_PATH = _default_trace_path()
MOONCAKE_BLOCK_TOKENS = 512

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One benchmark request.

    ``arrival_s`` is the nominal send time (seconds from the start of the run). Open-loop runners send at
    ``arrival_s``; closed-loop runners follow :attr:`Workload.closed_loop` (sessions / phases) and use
    ``arrival_s`` as the schedule when the previous dependent request finished in time.
    """

    req_id: str
    kind: RequestKind
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0
    user_id: str | None = None
    messages: list[dict[str, str]] | None = None  # chat: the OpenAI ``messages`` array
    prompt: str | None = None  # completion: the OpenAI ``prompt`` string
    session_id: str | None = None  # closed-loop session (multi-round QA: the user)
    round_idx: int = 0  # round within the session (0-based)
    phase: str = "main"  # long-doc QA: "pre_warmup" | "warmup" | "query"
    group: int | None = None  # shared-prefix group / long-doc document index
    headers: dict[str, str] = field(default_factory=dict)  # extra HTTP headers (x-user-id, routing key)

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens the engine sees."""
        return len(self.prompt_token_ids)

    def text(self) -> str:
        """The exact text the engine tokenises (the rendered chat template for chat requests)."""
        if self.kind == "chat":
            return render_chat(self.messages or [], add_generation_prompt=True)
        return self.prompt or ""

    def body(self, model: str, *, stream: bool = True) -> dict[str, Any]:
        """OpenAI-compatible JSON body (temperature 0, usage in the stream, as the reference benchmarks)."""
        out: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0.0, "stream": stream}
        if stream:
            out["stream_options"] = {"include_usage": True}
        if self.kind == "chat":
            out["messages"] = [dict(m) for m in self.messages or []]
        else:
            out["prompt"] = self.prompt or ""
        return out

    def path(self) -> str:
        """HTTP path of the OpenAI endpoint for this request."""
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    def chunk_hashes(self, chunk_size: int = LMCACHE_CHUNK_SIZE, *, save_unfull_chunk: bool = False) -> list[int]:
        """LMCache-style chained chunk keys of ``prompt_token_ids`` (see :func:`lmcache_chunk_hashes`)."""
        return lmcache_chunk_hashes(self.prompt_token_ids, chunk_size, save_unfull_chunk=save_unfull_chunk)

    def with_history(self, history: Sequence[Mapping[str, str]], tokenizer: Tokenizer | None = None) -> Request:
        """Copy of a chat request whose earlier turns are replaced by ``history`` (re-tokenised).

        Closed-loop runners that feed the engine's real answers back (as production-stack does) call this
        with the conversation so far; the last user message of this request is kept.
        """
        if self.kind != "chat" or not self.messages:
            raise ValueError("with_history applies to chat requests only")
        tok = tokenizer or get_tokenizer()
        messages = [dict(m) for m in history] + [dict(self.messages[-1])]
        return dataclasses.replace(self, messages=messages, prompt_token_ids=tok.encode_chat(messages))


@dataclass(frozen=True, slots=True)
class ClosedLoop:
    """How a runner paces dependent requests (``Workload.closed_loop``; ``None`` there means open loop).

    ``kind == "sessions"`` (multi-round QA): requests sharing ``session_id`` are sent in ``round_idx`` order;
    round r+1 goes out at ``max(send time of round r + per_user_gap_s, finish of round r)`` — as in
    production-stack, a user whose previous request is unfinished waits instead of sending.
    ``kind == "phased"`` (long-doc QA): ``phases`` run one after another (a phase starts when the previous
    one fully finished, plus ``sleep_after_warmup_s`` after "warmup"); within a phase requests go out in
    list order with at most ``max_inflight`` in flight.
    """

    kind: Literal["sessions", "phased"]
    per_user_gap_s: float | None = None
    gap_between_users_s: float | None = None
    max_inflight: int | None = None
    phases: tuple[str, ...] = ()
    sleep_after_warmup_s: float = 0.0


@dataclass(slots=True)
class Workload:
    """A generated workload: requests sorted by nominal arrival (ties keep send order)."""

    name: str
    params: dict[str, Any]
    requests: list[Request]
    closed_loop: ClosedLoop | None = None
    description: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        """Sum of prompt tokens over all requests."""
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def total_max_tokens(self) -> int:
        """Sum of ``max_tokens`` over all requests."""
        return sum(r.max_tokens for r in self.requests)

    @property
    def duration_s(self) -> float:
        """Nominal span of arrivals (0 for fully closed-loop phased workloads)."""
        return max((r.arrival_s for r in self.requests), default=0.0)

    def stats(self) -> dict[str, Any]:
        """Shape summary (no prompt text): counts, token totals, length range, duration."""
        lens = [len(r.prompt_token_ids) for r in self.requests]
        return {
            "name": self.name,
            "requests": len(self.requests),
            "prompt_tokens": sum(lens),
            "prompt_len_min": min(lens, default=0),
            "prompt_len_max": max(lens, default=0),
            "prompt_len_mean": (sum(lens) / len(lens)) if lens else 0.0,
            "max_tokens_total": self.total_max_tokens,
            "duration_s": self.duration_s,
            "closed_loop": self.closed_loop.kind if self.closed_loop else None,
        }


# --------------------------------------------------------------------------------------------------
# token helpers
# --------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(rb" [a-z]{2,}")


@functools.lru_cache(maxsize=1)
def _word_pool() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids whose text is a space followed by 2+ ASCII lowercase letters, e.g. ``" house"``.

    Qwen's pre-tokenizer splits text before every ``" word"``, and each such piece is one vocabulary entry,
    so any concatenation of these tokens decodes to text that re-encodes to exactly the same ids, in a
    completion prompt or inside a chat message alike.
    """
    tok = get_tokenizer()
    ranks: Mapping[bytes, int] | None = getattr(tok._tok, "_mergeable_ranks", None)
    if ranks is not None:
        items = sorted((rank, piece) for piece, rank in ranks.items() if _WORD_RE.fullmatch(piece))
        ids = tuple(rank for rank, _ in items)
        strs = tuple(piece.decode("ascii") for _, piece in items)
    else:  # pragma: no cover - tokenizer without rank table
        pairs = [(i, tok.decode([i])) for i in range(tok.vocab_size)]
        keep = [(i, s) for i, s in pairs if _WORD_RE.fullmatch(s.encode("utf-8", "replace"))]
        ids = tuple(i for i, _ in keep)
        strs = tuple(s for _, s in keep)
    return ids, strs


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_indices(keys: Sequence[int], n: int, seed: int) -> np.ndarray:
    """``len(keys) × n`` indices into the word pool; row i is a PRNG stream seeded by ``(seed, keys[i])``."""
    pool_n = len(_word_pool()[0])
    k = np.asarray([int(v) & _MASK64 for v in keys], dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _mix64(k ^ _mix64(np.asarray([seed & _MASK64], dtype=np.uint64)))
        ctr = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        vals = _mix64(base[:, None] + ctr[None, :])
    return (vals % np.uint64(pool_n)).astype(np.int64)


def word_block(key: int, n: int, seed: int = 0) -> list[int]:
    """A deterministic block of ``n`` round-trip-safe token ids for ``key`` (same key ⇒ same block)."""
    ids, _ = _word_pool()
    return [ids[i] for i in _word_indices([key], n, seed)[0].tolist()]


def _words_text(rng: random.Random, n: int) -> str:
    """``n`` random pool words joined (leading space stripped): roughly ``n`` tokens of plain text."""
    _, strs = _word_pool()
    return "".join(rng.choice(strs) for _ in range(n)).lstrip()


def _filler(n: int) -> str:
    """production-stack / LMCache filler: the word ``hi`` repeated ``n`` times, single-space separated."""
    return " ".join(["hi"] * n)


def _random_token_text(rng: random.Random, tok: Tokenizer, n: int) -> str:
    """SGLang ``gen_prompt``: ``n`` uniform vocabulary ids decoded to text.

    Unlike SGLang, the ids are then adjusted (as vLLM's random datasets do) so that the text re-encodes to
    ``n`` tokens where possible; the re-encoded ids, not the sampled ones, are the ground truth.
    """
    if n <= 0:
        return ""
    vocab = tok.vocab_size
    ids = [rng.randrange(vocab) for _ in range(n)]
    text = tok.decode(ids)
    for _ in range(10):
        if "<|" in text:  # never let random text spell a special token
            text = text.replace("<|", "< |")
        cur = tok.encode(text)
        if len(cur) == n:
            break
        ids = cur[:n] if len(cur) > n else cur + [rng.randrange(vocab) for _ in range(n - len(cur))]
        text = tok.decode(ids)
    return text.replace("<|", "< |")


def _poisson_arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    """Arrival offsets: all 0 for an infinite rate, else a Poisson process starting at 0."""
    if n <= 0:
        return []
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    out = [0.0]
    t = 0.0
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"kvgate-bench:{name}:{seed}")


# --------------------------------------------------------------------------------------------------
# production-stack multi-round QA
# --------------------------------------------------------------------------------------------------


def multi_round_first_turn(user_id: int, system_prompt_len: int, history_len: int) -> str:
    """production-stack's first-turn prefix (note: no space after the first period)."""
    return (
        f"Hi, here's some system prompt: {_filler(system_prompt_len)}."
        f"For user {user_id}, here are some other context: {_filler(history_len)}."
    )


def multi_round_question(n: int) -> str:
    """production-stack's question #n (1-based)."""
    return f"Here's question #{n}: can you tell me a new long story with a happy ending?"


def placeholder_answer(user_id: int, round_idx: int, answer_len: int, seed: int = 0) -> str:
    """Deterministic stand-in for the model's answer: about ``answer_len`` tokens of pool words."""
    if answer_len <= 0:
        return ""
    return _words_text(_rng(seed, f"answer:{user_id}:{round_idx}"), answer_len)


def multi_round_qa(
    num_users: int = 8,
    num_rounds: int = 4,
    system_prompt_len: int = 200,
    history_len: int = 400,
    answer_len: int = 20,
    qps: float = 2.0,
    seed: int = 0,
    *,
    init_user_id: int = 0,
    request_with_user_id: bool = True,
) -> Workload:
    """production-stack multi-round QA (closed loop, ``Workload.closed_loop.kind == "sessions"``).

    User ids are ``init_user_id + 1 … init_user_id + num_users`` (the reference increments before use).
    Round 0 of user u is ``first_turn + question #1``; every round carries the whole history. Nominal
    schedule: per-user gap ``g = num_users / qps``; user k (0-based) starts at ``k × gap_between_users`` with
    ``gap_between_users = g × (num_rounds − 1) / num_users`` and sends round r at ``start + r × g``.
    The reference's mid-session ramp-up and endless user replacement (``--time``) are not reproduced: each
    of the ``num_users`` users runs its ``num_rounds`` rounds once.

    Assistant turns: the real benchmark feeds back the model's actual answer. The generator cannot know
    it, so history holds :func:`placeholder_answer` (deterministic, ``answer_len`` tokens, seeded by
    ``seed``/user/round); a runner may substitute the real answer with :meth:`Request.with_history`.
    The only randomness is in those placeholder answers.
    """
    if num_users <= 0 or num_rounds <= 0 or qps <= 0:
        raise ValueError("num_users, num_rounds and qps must be positive")
    tok = get_tokenizer()
    gap = num_users / qps
    gap_between_users = gap * (num_rounds - 1) / num_users
    requests: list[Request] = []
    for k in range(num_users):
        uid = init_user_id + 1 + k
        start = k * gap_between_users
        history: list[dict[str, str]] = []
        hist_ids: list[int] = []  # encode(render_chat(history, False)); specials split segments
        for r in range(num_rounds):
            question = multi_round_question(r + 1)
            if r == 0:
                question = multi_round_first_turn(uid, system_prompt_len, history_len) + question
            user_msg = {"role": "user", "content": question}
            messages = [*history, user_msg]
            ids = hist_ids + tok.encode(render_chat([user_msg], add_generation_prompt=True))
            requests.append(
                Request(
                    req_id=f"mrqa-u{uid}-r{r}",
                    kind="chat",
                    prompt_token_ids=ids,
                    max_tokens=answer_len,
                    arrival_s=start + r * gap,
                    user_id=str(uid),
                    messages=[dict(m) for m in messages],
                    session_id=str(uid),
                    round_idx=r,
                    headers={"x-user-id": str(uid)} if request_with_user_id else {},
                )
            )
            answer = {"role": "assistant", "content": placeholder_answer(uid, r, answer_len, seed)}
            history = [*messages, answer]
            hist_ids = hist_ids + tok.encode(render_chat([user_msg, answer], add_generation_prompt=False))
    requests.sort(key=lambda q: q.arrival_s)
    params = {
        "num_users": num_users,
        "num_rounds": num_rounds,
        "system_prompt_len": system_prompt_len,
        "history_len": history_len,
        "answer_len": answer_len,
        "qps": qps,
        "seed": seed,
        "init_user_id": init_user_id,
        "request_with_user_id": request_with_user_id,
    }
    return Workload(
        name="multi_round_qa",
        params=params,
        requests=requests,
        closed_loop=ClosedLoop(kind="sessions", per_user_gap_s=gap, gap_between_users_s=gap_between_users),
        description="production-stack multi-round QA: per-user chat sessions carrying their whole history",
    )


# --------------------------------------------------------------------------------------------------
# SGLang generated-shared-prefix
# --------------------------------------------------------------------------------------------------


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
    rng = _rng(seed, "shared_prefix")
    total = num_groups * prompts_per_group
    sys_lens = _random_lens(rng, system_prompt_len, range_ratio, num_groups)
    q_lens = _random_lens(rng, question_len, range_ratio, total)
    out_lens = _random_lens(rng, output_len, range_ratio, total)
    systems = [_random_token_text(rng, tok, n) for n in sys_lens]
    if distribution == "uniform":
        groups = [g for g in range(num_groups) for _ in range(prompts_per_group)]
    else:
        groups = sorted(rng.choices(range(num_groups), weights=zipf_weights(num_groups, zipf_alpha), k=total))
    items: list[tuple[int, str, int]] = []
    for i, g in enumerate(groups):
        question = _random_token_text(rng, tok, q_lens[i])
        items.append((g, f"{systems[g]}\n\n{question}", out_lens[i]))
    if not ordered:
        rng.shuffle(items)
    arrivals = _poisson_arrivals(rng, len(items), request_rate)
    requests: list[Request] = []
    for i, ((g, prompt, out_len), t) in enumerate(zip(items, arrivals, strict=True)):
        headers = {"X-SMG-Routing-Key": f"gsp-{seed}-{g}"} if send_routing_key else {}
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            req = Request(f"gsp-{i:05d}", "chat", tok.encode_chat(messages), out_len, t, messages=messages)
        else:
            req = Request(f"gsp-{i:05d}", "completion", tok.encode(prompt), out_len, t, prompt=prompt)
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


# --------------------------------------------------------------------------------------------------
# LMCache long-document QA
# --------------------------------------------------------------------------------------------------


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
    docs = [f"{i} {_filler(document_length)}" for i in range(num_documents)]
    order = _repeat(list(range(num_documents)), repeat_count, repeat_mode, rng)
    query = [docs[i] for i in order]
    if hit_miss_ratio is not None:
        hit, miss = (int(x) for x in hit_miss_ratio.split(":", 1))
        for i in range(len(query)):
            if i % (hit + miss) >= hit:
                query[i] = f"{rng.randint(-10000000, 10000000)} {query[i]}"
    pre = [f"{i}xx{_filler(pre_warmup_len)}" for i in range(pre_warmup_count)]
    plan: list[tuple[str, str, int | None]] = [("pre_warmup", p, None) for p in pre]
    plan += [("warmup", d, i) for i, d in enumerate(docs)]
    plan += [("query", q, order[i]) for i, q in enumerate(query)]
    requests: list[Request] = []
    counters: dict[str, int] = {}
    for phase, text, doc in plan:
        n = counters.get(phase, 0)
        counters[phase] = n + 1
        rid = f"ldqa-{phase}-{n:04d}"
        if completions:
            req = Request(rid, "completion", tok.encode(text), output_len, prompt=text)
        else:
            messages = [{"role": "user", "content": text}]
            req = Request(rid, "chat", tok.encode_chat(messages), output_len, messages=messages)
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


# --------------------------------------------------------------------------------------------------
# Mooncake trace replay
# --------------------------------------------------------------------------------------------------


def load_mooncake_trace(path: str | Path = DEFAULT_TRACE_PATH, max_requests: int | None = None) -> list[dict[str, Any]]:
    """Read a Mooncake JSONL trace, plain or ``.gz`` (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``)."""
    records: list[dict[str, Any]] = []
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if max_requests is not None and len(records) >= max_requests:
                break
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def scaled_block_tokens(block_tokens_scale: float) -> int:
    """Tokens per replayed block: ``max(1, round(512 × block_tokens_scale))``."""
    return max(1, round(MOONCAKE_BLOCK_TOKENS * block_tokens_scale))


def mooncake_trace(
    path: str | Path = DEFAULT_TRACE_PATH,
    max_requests: int | None = 400,
    block_tokens_scale: float = 1 / 16,
    time_scale: float = 0.1,
    seed: int = 0,
    *,
    output_scale: float = 1 / 16,
    max_output_tokens: int | None = 64,
    kind: RequestKind = "completion",
) -> Workload:
    """Replay a Mooncake trace (open loop): hash id h → a deterministic block of pool-word token ids.

    Block size ``B = scaled_block_tokens(block_tokens_scale)`` (512 at scale 1; 32 at the default 1/16).
    Token j of block h comes from a counter-based PRNG seeded by ``(seed, h)``, so equal hash ids give equal
    blocks and different ones (almost surely) different blocks; every id is a ``" word"`` token, so the
    prompt text re-encodes to exactly these ids. The last block keeps the trace's truncation:
    ``ceil((input_length − 512·(n−1)) × B / 512)`` tokens (at least 1). ``arrival_s = (timestamp −
    first timestamp) / 1000 × time_scale``; ``max_tokens = max(1, round(output_length × output_scale))``,
    capped by ``max_output_tokens``. Completions by default so blocks align with token positions;
    ``kind="chat"`` wraps the text in one user message (the template shifts alignment but keeps sharing).

    The defaults (first 400 requests, lengths × 1/16, 10× faster, outputs ≤ 64 tokens) suit a 2-core CPU
    box; ``max_requests=None, block_tokens_scale=1, time_scale=1, output_scale=1, max_output_tokens=None``
    replays the trace faithfully. Reuse builds up over the hour: the first 400 requests repeat ~13% of
    their blocks, the whole trace 36.6%.
    """
    records = load_mooncake_trace(path, max_requests)
    return mooncake_from_records(
        records,
        block_tokens_scale=block_tokens_scale,
        time_scale=time_scale,
        seed=seed,
        output_scale=output_scale,
        max_output_tokens=max_output_tokens,
        kind=kind,
        params={"path": str(path), "max_requests": max_requests},
    )


def mooncake_from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    block_tokens_scale: float = 1 / 16,
    time_scale: float = 0.1,
    seed: int = 0,
    output_scale: float = 1 / 16,
    max_output_tokens: int | None = None,
    kind: RequestKind = "completion",
    params: Mapping[str, Any] | None = None,
) -> Workload:
    """:func:`mooncake_trace` on already-loaded (or hand-built) trace records."""
    pool_ids, pool_strs = _word_pool()
    bt = scaled_block_tokens(block_tokens_scale)
    unique = sorted({int(h) for rec in records for h in rec["hash_ids"]})
    block_ids: dict[int, list[int]] = {}
    block_text: dict[int, str] = {}
    step = 4096
    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of small lists: skip needless generational collections
    try:
        for s in range(0, len(unique), step):
            keys = unique[s : s + step]
            for h, row in zip(keys, _word_indices(keys, bt, seed).tolist(), strict=True):
                pick = operator.itemgetter(*row) if bt > 1 else (lambda seq, _i=row[0]: (seq[_i],))
                block_ids[h] = list(pick(pool_ids))
                block_text[h] = "".join(pick(pool_strs))
        requests = _mooncake_requests(
            records, block_ids, block_text, bt, time_scale, output_scale, max_output_tokens, kind
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    requests.sort(key=lambda q: q.arrival_s)
    all_params: dict[str, Any] = dict(params or {})
    all_params.update(
        {
            "block_tokens_scale": block_tokens_scale,
            "block_tokens": bt,
            "time_scale": time_scale,
            "seed": seed,
            "output_scale": output_scale,
            "max_output_tokens": max_output_tokens,
            "kind": kind,
        }
    )
    return Workload(
        name="mooncake",
        params=all_params,
        requests=requests,
        description="Mooncake FAST'25 conversation trace replay (hash-id blocks → token blocks)",
    )


def _mooncake_requests(
    records: Sequence[Mapping[str, Any]],
    block_ids: Mapping[int, list[int]],
    block_text: Mapping[int, str],
    bt: int,
    time_scale: float,
    output_scale: float,
    max_output_tokens: int | None,
    kind: RequestKind,
) -> list[Request]:
    """Assemble one request per trace record from the per-hash-id blocks."""
    pool_ids, pool_strs = _word_pool()
    text_of = dict(zip(pool_ids, pool_strs, strict=True))
    tok = get_tokenizer() if kind == "chat" else None
    t0 = float(records[0]["timestamp"]) if records else 0.0
    requests: list[Request] = []
    for i, rec in enumerate(records):
        hashes = [int(h) for h in rec["hash_ids"]]
        if not hashes:
            continue
        last_full = int(rec["input_length"]) - MOONCAKE_BLOCK_TOKENS * (len(hashes) - 1)
        last_len = max(1, min(bt, math.ceil(last_full * bt / MOONCAKE_BLOCK_TOKENS)))
        ids: list[int] = []
        for h in hashes[:-1]:
            ids.extend(block_ids[h])
        tail = block_ids[hashes[-1]][:last_len]
        ids.extend(tail)
        tail_text = block_text[hashes[-1]] if last_len == bt else "".join(map(text_of.__getitem__, tail))
        text = "".join([block_text[h] for h in hashes[:-1]]) + tail_text
        out = max(1, round(int(rec["output_length"]) * output_scale))
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        arrival = (float(rec["timestamp"]) - t0) / 1000.0 * time_scale
        if kind == "chat":
            assert tok is not None
            messages = [{"role": "user", "content": text}]
            requests.append(Request(f"mc-{i:05d}", "chat", tok.encode_chat(messages), out, arrival, messages=messages))
        else:
            requests.append(Request(f"mc-{i:05d}", "completion", ids, out, arrival, prompt=text))
    return requests


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


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


def get_workload(name: str, **overrides: Any) -> Workload:
    """Build a registered workload with its defaults, overridden by ``overrides`` (unknown keys fail)."""
    try:
        spec = WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; choose from {', '.join(sorted(WORKLOADS))}") from None

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


def describe() -> str:
    """Human-readable list of registered workloads and their default parameters (for CLI help)."""
    lines: list[str] = []
    for spec in WORKLOADS.values():
        lines.append(f"{spec.name}: {spec.help}")
        lines.append("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in spec.defaults.items()))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def iter_token_ids(requests: Iterable[Request]) -> Iterable[list[int]]:
    """The ``prompt_token_ids`` of each request, in order."""
    for r in requests:
        yield r.prompt_token_ids
