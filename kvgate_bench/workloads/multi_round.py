"""vLLM production-stack ``benchmarks/multi-round-qa``: users in multi-round chats carrying their history."""

from __future__ import annotations

from kvgate_bench.workloads.model import ClosedLoop, Request, Workload
from kvgate_bench.workloads.text import filler, seeded_rng, words_text
from kvgate_sim.tokenizer import get_tokenizer, render_chat


def multi_round_first_turn(user_id: int, system_prompt_len: int, history_len: int) -> str:
    """production-stack's first-turn prefix (note: no space after the first period)."""
    return (
        f"Hi, here's some system prompt: {filler(system_prompt_len)}."
        f"For user {user_id}, here are some other context: {filler(history_len)}."
    )


def multi_round_question(n: int) -> str:
    """production-stack's question #n (1-based)."""
    return f"Here's question #{n}: can you tell me a new long story with a happy ending?"


def placeholder_answer(user_id: int, round_idx: int, answer_len: int, seed: int = 0) -> str:
    """Deterministic stand-in for the model's answer: about ``answer_len`` tokens of pool words."""
    if answer_len <= 0:
        return ""
    return words_text(seeded_rng(seed, f"answer:{user_id}:{round_idx}"), answer_len)


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
