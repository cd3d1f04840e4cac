"""SIMULATOR: what the engine sends back: generated text, and vLLM 0.32's completion bodies and SSE chunks.

Generated text is real Qwen2.5 word tokens chosen deterministically from the seed and the prompt.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvgate.asgi import ClientDisconnected, json_bytes
from kvgate_sim.engine_model import RequestRecord
from kvgate_sim.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = "kvgate-sim"

_FILLER = (
    "The quiet harbor town woke slowly as fishing boats drifted back with the morning tide. Children ran along "
    "the stone walls while bakers opened their doors and the smell of fresh bread filled every narrow street. "
    "An old keeper climbed the lighthouse stairs, counting each step, and watched gulls circle above the water. "
    "Later the market square grew busy with travelers, musicians and merchants selling apples, wool and maps. "
    "By evening lanterns glowed in windows, stories were shared by the fire, and everyone agreed the long "
    "summer had been kind to the village, its gardens, its gentle river and its happy people."
)


class TextGenerator:
    """Deterministic output tokens: real Qwen2.5 word tokens picked by ``Random(seed, prompt digest)``."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        self.tok = tokenizer
        self.seed = seed
        pool = sorted({t for t in tokenizer.encode(_FILLER) if tokenizer.decode([t]).strip().isalpha()})
        self.pool = pool
        self.text = {t: tokenizer.decode([t]) for t in pool}

    def generate(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        digest = hashlib.blake2b(array("q", prompt_ids).tobytes(), digest_size=16).hexdigest()
        rng = random.Random(f"{self.seed}:{digest}")
        return [rng.choice(self.pool) for _ in range(n)]


def token_strs(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """vLLM's ``token_strs``: each id's vocabulary spelling (byte-level BPE, e.g. ``Ġworld``)."""
    out: list[str] = []
    for i in ids:
        s = tok.token_spelling(i)
        out.append(s if s is not None else tok.decode([i]))
    return out


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json_bytes(obj) + b"\n\n"


@dataclass
class Completion:
    """One request's response shapes (``/v1/completions`` or, with ``chat``, ``/v1/chat/completions``).

    ``pieces[k]`` is the text of output token ``k``; usage reads ``record.cached_tokens`` when called (the engine
    fills it in once the prompt is scheduled)."""

    req_id: str
    model_name: str
    created: int
    chat: bool
    n_prompt: int
    pieces: list[str]
    record: RequestRecord

    def usage(self, n_out: int) -> dict[str, Any]:
        details: dict[str, Any] = {"cached_tokens": self.record.cached_tokens}
        if self.chat:
            details["created_cache_tokens"] = 0
        n_p = self.n_prompt
        return {
            "prompt_tokens": n_p,
            "total_tokens": n_p + n_out,
            "completion_tokens": n_out,
            "prompt_tokens_details": details,
        }

    def body(self, n_out: int) -> dict[str, Any]:
        """The non-streaming response after ``n_out`` tokens."""
        text = "".join(self.pieces[:n_out])
        if self.chat:
            return {
                "id": self.req_id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "tool_calls": [],
                            "reasoning": None,
                        },
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                        "token_ids": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": self.usage(n_out),
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "kv_transfer_params": None,
            }
        return {
            "id": self.req_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "token_ids": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(n_out),
            "kv_transfer_params": None,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.req_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
            **extra,
        }

    async def events(
        self,
        tokens: AsyncIterator[int],
        max_tokens: int,
        include_usage: bool,
        continuous: bool,
        on_close: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        """The SSE stream: a chunk per token (``tokens`` yields the count so far and raises
        :class:`ClientDisconnected` on abort), the usage chunk when asked, ``[DONE]``; ``on_close`` always runs."""
        chat, chunk = self.chat, self.chunk
        n_out = 0
        try:
            async for n_out in tokens:
                finish = "length" if n_out == max_tokens else None
                extra: dict[str, Any] = {"usage": self.usage(n_out)} if continuous else {}
                if chat:
                    if n_out == 1:
                        yield sse(
                            chunk(
                                [
                                    {
                                        "index": 0,
                                        "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                                prompt_token_ids=None,
                                prompt_text=None,
                            )
                        )
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": self.pieces[n_out - 1]},
                        "logprobs": None,
                        "finish_reason": finish,
                        "token_ids": None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": self.pieces[n_out - 1],
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                        "prompt_token_ids": None,
                        "token_ids": None,
                    }
                if finish is not None:
                    choice["stop_reason"] = None
                yield sse(chunk([choice], **extra))
            if include_usage:
                extra = {"usage": self.usage(n_out)}
                if chat:
                    extra["system_fingerprint"] = SYSTEM_FINGERPRINT
                yield sse(chunk([], **extra))
            yield b"data: [DONE]\n\n"
        except ClientDisconnected:
            return
        finally:
            on_close()
