"""Model / prompt extraction (Pixiu §3 step 3), the request key and the ``/tokenize`` request builder.

Extraction is Pixiu's exactly:

* ``model`` only if it is a string (else ``default_model`` later);
* ``prompt`` string as is, array → its string items joined by ``"\\n"``, anything else → "";
* empty prompt → the string ``content`` of each object in ``messages`` joined by ``"\\n"``
  (roles ignored; kvgate also takes the text parts of a content list, which Pixiu skipped, so chats in the
  OpenAI content-part form — e.g. ``vllm bench serve``'s — are routed too; other parts are skipped);
* the result is stripped.

What differs from Pixiu (defect fixes): the ``/tokenize`` body is *built* (``{model, prompt}`` or
``{model, messages, add_generation_prompt: true}``), never the client's raw body; its ``model`` is the
client's (omitted when the client sent none: ``default_model`` only names the cache key); and for prompt
requests it carries the prompt **exactly as the engine will see it** (not stripped: a leading space
changes every token id, and so every LMCache chunk hash); the cache key covers that exact text; and
the cache key of a chat request covers every message's role and content (canonical JSON), not the
joined text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import msgspec


@cache
def _canon_encoder() -> msgspec.json.Encoder:
    import msgspec  # on first use: a gateway serving only prompt requests does not load it

    return msgspec.json.Encoder(order="sorted")


class ExtractError(ValueError):
    """The request body is not a JSON object."""


@dataclass(frozen=True, slots=True)
class Extracted:
    """What the filter needs from a request. ``prompt`` is the (stripped) text; never logged."""

    model: str
    prompt: str
    kind: Literal["prompt", "chat"]
    messages: tuple[Any, ...] = ()
    tools: Any = None
    engine_prompt: str | None = None  # prompt requests: the exact text the engine tokenizes
    # The ``model`` the engine will see: the client's own string, "" when it sent none. The proxy forwards
    # the body unchanged, so ``default_model`` (part of the key) must not reach ``/tokenize``: vLLM answers
    # 404 for a model name it does not serve, and without ``model`` it uses the one it serves.
    engine_model: str = ""

    @property
    def key(self) -> str:
        """Token-cache / hot-map / coalescing key (hex SHA-256)."""
        if self.kind == "prompt":
            return prompt_key(self.model, self.engine_text)
        return chat_key(self.model, self.messages, self.tools)

    def tokenize_request(self) -> dict[str, Any]:
        """The JSON body for vLLM ``POST /tokenize`` (``TokenizeCompletionRequest`` / ``TokenizeChatRequest``)."""
        body: dict[str, Any]
        if self.kind == "prompt":
            body = {"model": self.engine_model, "prompt": self.engine_text}
        else:
            body = {"model": self.engine_model, "messages": list(self.messages), "add_generation_prompt": True}
            if self.tools is not None:
                body["tools"] = self.tools
        if not self.engine_model:
            body.pop("model")
        return body

    @property
    def engine_text(self) -> str:
        return self.engine_prompt if self.engine_prompt is not None else self.prompt


def prompt_key(model: str, prompt: str) -> str:
    """Pixiu's key: hex(SHA-256(model + "\\x00" + prompt))."""
    return hashlib.sha256(f"{model}\x00{prompt}".encode()).hexdigest()


def chat_key(model: str, messages: tuple[Any, ...] | list[Any], tools: Any = None) -> str:
    """Key of a chat request: model + canonical JSON of every message's role and content (+ tools)."""
    canon: list[Any] = []
    for m in messages:
        if isinstance(m, dict):
            canon.append([m.get("role"), m.get("content"), m.get("name"), m.get("tool_calls")])
        else:
            canon.append(m)
    try:  # msgspec: canonical (sorted keys, UTF-8) and ~3x faster than json.dumps on a long chat
        payload = _canon_encoder().encode([canon, tools])
    except (
        TypeError,
        ValueError,
    ):  # msgspec.EncodeError is a ValueError  # e.g. keys that are not strings: the stdlib's rules
        payload = json.dumps([canon, tools], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(f"chat\x00{model}\x00".encode() + payload).hexdigest()


def extract_prompt_and_model(data: Any) -> tuple[str, str]:
    """Pixiu's ``extractPromptAndModel`` on already-parsed JSON: ``(model, prompt)``.

    ``None`` (empty body) gives ``("", "")``; a non-object raises :class:`ExtractError`.
    """
    if data is None:
        return "", ""
    if not isinstance(data, dict):
        raise ExtractError(f"request body is a JSON {type(data).__name__}, not an object")
    model = data.get("model")
    model = model if isinstance(model, str) else ""
    prompt = _prompt_text(data.get("prompt"))
    if not prompt:
        prompt = _messages_text(data.get("messages"))
    return model, prompt.strip()


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(v for v in value if isinstance(v, str))
    return ""


def _content_text(content: Any) -> str | None:
    """A message's text: a string as is, a list of OpenAI content parts → its text parts joined by ``"\\n"``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


def _messages_text(value: Any) -> str:
    if not isinstance(value, list):
        return ""
    texts = (_content_text(m.get("content")) for m in value if isinstance(m, dict))
    return "\n".join(t for t in texts if t is not None)


def extract(data: Any, default_model: str = "") -> Extracted | None:
    """Full extraction. ``None`` when there is no prompt (Pixiu returns early). Raises :class:`ExtractError`."""
    model, prompt = extract_prompt_and_model(data)
    if not prompt:
        return None
    engine_model = model
    if not model:
        model = default_model
    assert isinstance(data, dict)
    raw_prompt = data.get("prompt")
    if _prompt_text(raw_prompt).strip():
        # A one-element list is one prompt; a longer list is a batch, approximated by Pixiu's joined text.
        if isinstance(raw_prompt, list) and len(raw_prompt) == 1 and isinstance(raw_prompt[0], str):
            raw_prompt = raw_prompt[0]
        engine_prompt = raw_prompt if isinstance(raw_prompt, str) else _prompt_text(raw_prompt)
        return Extracted(
            model=model, prompt=prompt, kind="prompt", engine_prompt=engine_prompt, engine_model=engine_model
        )
    messages = data.get("messages")
    tools = data.get("tools") if isinstance(data.get("tools"), list) else None
    return Extracted(
        model=model, prompt=prompt, kind="chat", messages=tuple(messages or ()), tools=tools, engine_model=engine_model
    )


def parse_body(body: bytes) -> Any:
    """``json.loads`` with Pixiu's semantics: empty body → ``None``; malformed → :class:`ExtractError`."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExtractError(str(exc)) from None
