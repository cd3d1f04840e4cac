"""Workload data model: one request as sent and as tokenised, closed-loop chains, a whole workload."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvgate_sim.protocol import LMCACHE_CHUNK_SIZE, lmcache_chunk_hashes
from kvgate_sim.tokenizer import Tokenizer, get_tokenizer, render_chat

RequestKind = Literal["chat", "completion"]


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

    @classmethod
    def single_turn(
        cls,
        req_id: str,
        kind: RequestKind,
        text: str,
        max_tokens: int,
        arrival_s: float = 0.0,
        *,
        tokenizer: Tokenizer | None = None,
    ) -> Request:
        """A completion of ``text``, or a chat whose one user message is ``text``, tokenised as the engine does."""
        tok = tokenizer or get_tokenizer()
        if kind == "chat":
            messages = [{"role": "user", "content": text}]
            return cls(req_id, "chat", tok.encode_chat(messages), max_tokens, arrival_s, messages=messages)
        return cls(req_id, "completion", tok.encode(text), max_tokens, arrival_s, prompt=text)

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


def iter_token_ids(requests: Iterable[Request]) -> Iterable[list[int]]:
    """The ``prompt_token_ids`` of each request, in order."""
    for r in requests:
        yield r.prompt_token_ids
