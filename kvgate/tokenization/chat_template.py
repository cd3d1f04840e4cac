"""Chat-template rendering as vLLM 0.32 + transformers ``apply_chat_template`` do it.

- Jinja: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols``
  extension, ``raise_exception``, ``strftime_now`` and transformers' ``tojson`` filter; variables
  ``messages``, ``tools``, ``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``...).
- Messages are normalised the way vLLM's ``parse_chat_messages`` does for text-only chats: the template's
  content format is detected from its AST (a loop over ``message['content']`` means "openai": content
  becomes a list of ``{"type": "text", "text": ...}``; otherwise "string": text parts joined with ``"\\n"``),
  assistant ``tool_calls`` arguments are parsed from JSON, empty ``tool_calls`` dropped.
- ``continue_final_message`` cuts the rendering after the final message's text like transformers does.

Anything else (images, audio, unknown part types, template errors) raises ``TokenizationError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NoReturn, TypedDict

import jinja2
import jinja2.nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvgate.tokenization.errors import TokenizationError

ContentFormat = Literal["string", "openai"]
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' chat-template tojson: keeps non-ASCII, no HTML escaping (unlike jinja's builtin)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# --- content-format detection (a faithful subset of vLLM's renderers/hf.py _detect_content_format) ---


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_var_or_elem(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test):
        return node.node is not None and _is_var_or_elem(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elem(node.node, name, key)
    if key is None:
        return _is_var(node, name)
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _aliases(root: jinja2.nodes.Template, name: str) -> list[str]:
    names, queue = [name], [name]
    while queue:
        cur = queue.pop(0)
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elem(assign.node, cur) and isinstance(assign.target, jinja2.nodes.Name):
                if assign.target.name not in names:
                    names.append(assign.target.name)
                    queue.append(assign.target.name)
    return names


def _content_loops(root: jinja2.nodes.Template) -> Iterator[jinja2.nodes.For]:
    msg_vars = _aliases(root, "messages")
    message_names = [
        loop.target.name
        for loop in root.find_all(jinja2.nodes.For)
        if isinstance(loop.target, jinja2.nodes.Name) and any(_is_var_or_elem(loop.iter, v) for v in msg_vars)
    ]
    in_macros = {id(loop) for macro in root.find_all(jinja2.nodes.Macro) for loop in macro.find_all(jinja2.nodes.For)}
    for loop in root.find_all(jinja2.nodes.For):
        if any(_is_var_or_elem(loop.iter, m, "content") for m in message_names):
            yield loop
        elif id(loop) not in in_macros and _is_var(loop.iter, "content"):
            yield loop


def detect_content_format(source: str) -> ContentFormat:
    """'openai' when the template iterates over a message's content, else 'string' (vLLM's rule)."""
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateError:
        return "string"
    return "openai" if next(_content_loops(ast), None) is not None else "string"


# --- message normalisation (vLLM parse_chat_messages, text-only) ---


def _text_parts(content: Any, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise TokenizationError(f"{where}.content must be a string, null or a list of parts")
    texts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise TokenizationError(f"{where}.content[{j}] must be an object")
        ptype = part.get("type")
        text = part.get(ptype) if ptype == "refusal" else part.get("text")
        if ptype not in _TEXT_PART_TYPES or not isinstance(text, str):
            raise TokenizationError(f"{where}.content[{j}]: part type {str(ptype)[:32]!r} is not supported locally")
        texts.append(text)
    return texts


def _tool_calls(calls: Any, where: str) -> list[Any] | None:
    if not isinstance(calls, list):
        raise TokenizationError(f"{where}.tool_calls must be a list")
    if not calls:
        return None
    out: list[Any] = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise TokenizationError(f"{where}.tool_calls entries must be function objects")
        fn = dict(call["function"])
        args = fn.get("arguments")
        if not args:
            fn["arguments"] = {}
        elif isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args)
            except json.JSONDecodeError:
                fn["arguments"] = {}
        out.append({**call, "function": fn})
    return out


def normalize_messages(messages: Any, content_format: ContentFormat) -> list[dict[str, Any]]:
    """The conversation vLLM hands to the template, or ``TokenizationError``."""
    if not isinstance(messages, list) or not messages:
        raise TokenizationError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise TokenizationError(f"{where} must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizationError(f"{where}.role must be a non-empty string")
        texts = _text_parts(msg.get("content"), where)
        conv: dict[str, Any] = {"role": role}
        if content_format == "openai" and role != "tool":  # vLLM flattens text-only tool content to a string
            conv["content"] = [{"type": "text", "text": t} for t in texts]
        elif content_format == "openai":
            conv["content"] = "\n".join(texts)
        else:  # vLLM drops empty text parts before joining ("if parse_res:" in its content-part parser)
            conv["content"] = "\n".join(t for t in texts if t)
        if role == "assistant":
            if msg.get("tool_calls") is not None:
                calls = _tool_calls(msg["tool_calls"], where)
                if calls is not None:
                    conv["tool_calls"] = calls
            reasoning = msg.get("reasoning")
            if isinstance(reasoning, str):
                conv["reasoning"] = conv["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in msg:
            conv["tool_call_id"] = msg["tool_call_id"]
        if isinstance(msg.get("name"), str):
            conv["name"] = msg["name"]
        out.append(conv)
    return out


def _final_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, Mapping) and "text" in part:
                return str(part["text"])
        raise TokenizationError("continue_final_message: the final message has no text")
    return "" if content is None else str(content)


class RenderOptions(TypedDict, total=False):
    """The keyword options of ``ChatTemplate.render``, forwarded unchanged by ``LocalTokenizer``'s chat methods."""

    add_generation_prompt: bool
    continue_final_message: bool
    tools: Sequence[Any] | None
    extra: Mapping[str, Any] | None


class ChatTemplate:
    """One compiled template plus the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizationError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.content_format: ContentFormat = detect_content_format(source)
        self._specials = dict(special_tokens or {})

    def render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        if add_generation_prompt and continue_final_message:
            raise TokenizationError("add_generation_prompt and continue_final_message cannot both be true")
        conversation = normalize_messages(messages, self.content_format)
        variables: dict[str, Any] = {**self._specials, **(extra or {})}
        variables.update(
            messages=conversation, tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt
        )
        try:
            rendered = self._template.render(**variables)
        except Exception as exc:  # template bugs and raise_exception() alike: never crash the caller
            raise TokenizationError(f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if continue_final_message:
            final = _final_text(conversation[-1])
            loc = rendered.rfind(final.strip())
            if loc < 0:
                raise TokenizationError("continue_final_message: final message not found in the rendering")
            keep = final.lstrip() if rendered[loc : loc + len(final.lstrip())] == final else final.strip()
            rendered = rendered[: loc + len(keep)]
        return rendered
