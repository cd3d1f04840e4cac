"""In-process tokenization giving the engine's exact ids, from a local model/tokenizer directory.

- ``tokenizer.json`` through Hugging Face ``tokenizers`` (never a hand-written tokenizer), or through
  ``tiktoken`` when ``fast_bpe`` proves it gives the same ids (about 10x faster on long prompts);
- chat template from ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string,
  or a list of ``{name, template}`` where ``default`` is used);
- special tokens (``bos_token``, ``eos_token``, ...) from ``tokenizer_config.json`` (string or
  ``{"content": ...}``) passed to the template as variables.

vLLM semantics: ``/v1/completions`` and ``/tokenize`` with ``prompt`` encode with ``add_special_tokens=True``
(the tokenizer's post-processor adds BOS); chat renders the template then encodes with
``add_special_tokens=False``.

The async methods run the encode in a worker thread when the text is longer than ``thread_threshold``
characters, through ``encode_batch`` because ``tokenizers`` releases the GIL there (measured: a Python thread
keeps ~96% of its progress during ``encode_batch`` but ~28% during ``encode``; benchmarks/routing_step.py).
"""

from __future__ import annotations

import asyncio
import json
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Unpack

from tokenizers import Tokenizer, normalizers

from kvgate.tokenization.chat_template import ChatTemplate, RenderOptions
from kvgate.tokenization.errors import TokenizationError
from kvgate.tokenization.fast_bpe import FastBPE
from kvgate.tokenization.fastokens_engine import FastTokens
from kvgate.tokenization.segments import SegmentEncoder, Split

# Below this many characters an encode costs well under 0.1 ms: a thread hop would cost more than it saves.
DEFAULT_THREAD_THRESHOLD = 4096
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizationError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizationError(f"{path.name} must hold a JSON object")
    return data


def _template_source(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tmpl = config.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    if isinstance(tmpl, list):
        for entry in tmpl:
            if isinstance(entry, Mapping) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return str(entry["template"])
    return None


class FastEngine(Protocol):
    name: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...


FAST_ENGINES = ("fastokens", "tiktoken")


def _fast_engine(tok_file: Path, hf: Tokenizer, engines: Sequence[str]) -> tuple[FastEngine | None, str]:
    """The first of ``engines`` that loads and agrees with HF, and ``"ok"``; else ``None`` and every reason."""
    reasons: list[str] = []
    for name in engines:
        engine: FastEngine | None
        if name == "fastokens":
            engine, why = FastTokens.build(tok_file, hf)
        elif name == "tiktoken":
            engine, why = FastBPE.build(_read_json(tok_file), hf)
        else:
            raise TokenizationError(f"unknown tokenizer engine {name!r}")
        if engine is not None:
            return engine, "ok"
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons) or "no fast engine requested"


class LocalTokenizer:
    """Thread-safe: ``tokenizers.Tokenizer.encode`` and jinja rendering hold no shared mutable state."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        *,
        name: str = "local",
        thread_threshold: int = DEFAULT_THREAD_THRESHOLD,
        fast: FastEngine | None = None,
        fast_reason: str = "not requested",
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.name = name
        self.thread_threshold = thread_threshold
        self._fast = fast
        self.fast_reason = fast_reason  # "ok" when a fast engine is in use, else why not (per engine tried)
        self.segments = self._segment_encoder(tokenizer)

    def _segment_encoder(self, tok: Tokenizer) -> SegmentEncoder | None:
        """Message-level reuse when piecewise encoding is provably identical (see segments.py)."""
        added = tok.get_added_tokens_decoder()
        if any(a.lstrip or a.rstrip or a.single_word for a in added.values()):
            return None
        nfc = isinstance(tok.normalizer, normalizers.NFC)
        if any(a.normalized for a in added.values()) and tok.normalizer is not None and not nfc:
            return None
        return SegmentEncoder(
            {a.content: i for i, a in added.items()},
            lambda piece: self.encode_prompt(piece, add_special_tokens=False),
            nfc=nfc,
            encode_many=self._fast.encode_pieces if isinstance(self._fast, FastTokens) else None,
        )

    @property
    def engine(self) -> str:
        return self._fast.name if self._fast is not None else "tokenizers"

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        *,
        thread_threshold: int = DEFAULT_THREAD_THRESHOLD,
        fast: bool = True,
        engines: Sequence[str] = FAST_ENGINES,
    ) -> LocalTokenizer:
        """Load a directory; ``fast`` tries the fast ``engines`` in order (``fastokens``: kept where its self-check
        agrees with HF; ``tiktoken``: where proven equivalent), else HF ``tokenizers`` encodes."""
        d = Path(directory)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizationError(f"no tokenizer.json in the tokenizer directory {d.name!r}")
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust loader raises plain Exception
            raise TokenizationError(f"cannot load tokenizer.json: {exc}") from exc
        engine, reason = _fast_engine(tok_file, tok, engines) if fast else (None, "not requested")
        cfg_file = d / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        specials = {k: v for k in _SPECIAL_KEYS if (v := _token_text(config.get(k))) is not None}
        source = _template_source(d, config)
        template = ChatTemplate(source, specials) if source is not None else None
        return cls(tok, template, name=d.name, thread_threshold=thread_threshold, fast=engine, fast_reason=reason)

    # --- synchronous API ---

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError("prompt must be a string")
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(self, messages: Any, **options: Unpack[RenderOptions]) -> str:
        """``ChatTemplate.render`` with this directory's template (its keyword options and defaults)."""
        if self.chat_template is None:
            raise TokenizationError("the tokenizer directory has no chat template")
        return self.chat_template.render(messages, **options)

    def encode_chat(
        self, messages: Any, *, add_special_tokens: bool = False, **options: Unpack[RenderOptions]
    ) -> list[int]:
        text = self.render_chat(messages, **options)
        if self.segments is not None and not add_special_tokens:
            return self.segments.encode(text)
        return self.encode_prompt(text, add_special_tokens=add_special_tokens)

    # --- asyncio API: long texts are encoded on a worker thread so the event loop keeps serving ---

    async def _encode_async(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= self.thread_threshold:
            return self.encode_prompt(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self._encode_nogil, text, add_special_tokens)

    def _encode_nogil(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._fast is not None:  # both fast engines release the GIL while encoding
            return self._fast.encode(text, add_special_tokens)
        return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    async def aencode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError("prompt must be a string")
        return await self._encode_async(text, add_special_tokens)

    async def aencode_chat(
        self, messages: Any, *, add_special_tokens: bool = False, **options: Unpack[RenderOptions]
    ) -> list[int]:
        # rendering is pure-Python jinja (tens of microseconds for ordinary chats): done inline
        ids = await self.aencode_rendered_chat(self.render_chat(messages, **options), add_special_tokens)
        return ids if isinstance(ids, list) else ids.tolist()

    def split_chat(self, text: str) -> Split:
        """A rendered chat cut at its added tokens once, for :meth:`chat_prefix` and then
        :meth:`aencode_rendered_chat` (``parts`` is ``None`` without provable message-level reuse)."""
        if self.segments is None:
            return Split(text)
        return self.segments.split(text)

    def chat_prefix(self, split: Split, min_tokens: int) -> tuple[array[int], bool] | None:
        """Lazy tokenization of a rendered chat (:meth:`split_chat`): an exact prefix of its ids holding at least
        ``min_tokens`` ids (``(ids, complete)``), encoded piece by piece between added tokens (segments.py proves
        the pieces encode independently). ``None`` when that is not provable, or would encode more than
        ``thread_threshold`` characters inline (then encode the whole chat with :meth:`aencode_rendered_chat`)."""
        if self.segments is None:
            return None
        return self.segments.encode_prefix(split, min_tokens, self.thread_threshold)

    async def aencode_rendered_chat(
        self, text: str | Split, add_special_tokens: bool = False
    ) -> list[int] | array[int]:
        """:meth:`aencode_chat` for a chat already rendered with :meth:`render_chat` (or split with
        :meth:`split_chat`). With message-level reuse the ids come as an ``array('I')`` (assembled from cached
        pieces without per-id work)."""
        if self.segments is not None and not add_special_tokens:
            split = text if isinstance(text, Split) else self.segments.split(text)
            if len(split.text) <= self.thread_threshold:
                return self.segments.encode_split(split)
            if split.parts is not None and self.segments.missing(split) <= self.thread_threshold:
                return self.segments.join(split.parts)  # a new turn of a known chat: no thread hop
            return await asyncio.to_thread(self.segments.encode_split, split)
        return await self._encode_async(text.text if isinstance(text, Split) else text, add_special_tokens)
