"""LocalTokenizer and ChatTemplate: vLLM / transformers rendering rules, errors, async API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from kvgate.tokenization import ChatTemplate, LocalTokenizer, TokenizationError, detect_content_format

ASSET = Path(__file__).resolve().parents[2] / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5"

STRING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
OPENAI_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}[{{ part['type'] }}:{{ part['text'] }}]"
    "{% endfor %}{% endfor %}"
)


def write_dir(tmp_path: Path, config: dict[str, Any], template_file: str | None = None) -> Path:
    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (tmp_path / "chat_template.jinja").write_text(template_file)
    return tmp_path


def test_prompt_adds_special_tokens_chat_does_not(tmp_path: Path) -> None:
    d = write_dir(tmp_path, {"bos_token": {"content": "<s>"}, "chat_template": "{{ messages[0]['content'] }}"})
    tok = LocalTokenizer.from_dir(d)
    assert tok.encode_prompt("hello world") == [1, 2, 3]  # completions: BOS from the post-processor
    assert tok.encode_prompt("hello world", add_special_tokens=False) == [2, 3]
    assert tok.encode_chat([{"role": "user", "content": "hello world"}]) == [2, 3]  # chat: no extra BOS
    assert tok.encode_chat([{"role": "user", "content": "hello"}], add_special_tokens=True) == [1, 2]


def test_template_file_wins_over_config_and_specials_are_variables(tmp_path: Path) -> None:
    d = write_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "unused"}, STRING_TEMPLATE)
    tok = LocalTokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(msgs) == "<s><user>hi</s>\n<assistant>"
    assert tok.render_chat(msgs, add_generation_prompt=False) == "<s><user>hi</s>\n"


def test_named_template_list_in_config(tmp_path: Path) -> None:
    d = write_dir(
        tmp_path, {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    )
    assert LocalTokenizer.from_dir(d).render_chat([{"role": "user", "content": "x"}]) == "D"


def test_missing_files_and_template(tmp_path: Path) -> None:
    with pytest.raises(TokenizationError, match=r"tokenizer\.json"):
        LocalTokenizer.from_dir(tmp_path)
    d = write_dir(tmp_path, {})
    tok = LocalTokenizer.from_dir(d)
    with pytest.raises(TokenizationError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizationError):
        LocalTokenizer.from_dir(d)


def test_content_format_detection_like_vllm() -> None:
    assert detect_content_format(STRING_TEMPLATE) == "string"
    assert detect_content_format(OPENAI_TEMPLATE) == "openai"
    aliased = "{% set msgs = messages %}{% for m in msgs %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}"
    assert detect_content_format(aliased) == "openai"
    assert detect_content_format("{% for") == "string"


def test_string_format_joins_text_parts_with_newline() -> None:
    t = ChatTemplate(STRING_TEMPLATE, {"bos_token": ""})
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert t.render(msgs, add_generation_prompt=False) == "<user>a\nb</s>\n"
    assert t.render([{"role": "user", "content": None}], add_generation_prompt=False) == "<user></s>\n"


def test_string_format_drops_empty_text_parts_like_vllm() -> None:
    """vLLM keeps a content part only if its parsed text is truthy ("string" format), then joins with "\\n"."""
    t = ChatTemplate(STRING_TEMPLATE, {"bos_token": ""})
    empty_first = [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "after"}]}]
    empty_last = [{"role": "user", "content": [{"type": "text", "text": "before"}, {"type": "text", "text": ""}]}]
    assert t.render(empty_first, add_generation_prompt=False) == "<user>after</s>\n"
    assert t.render(empty_last, add_generation_prompt=False) == "<user>before</s>\n"
    # "openai" format keeps the empty part as its own dict (vLLM wraps it before the truthiness check)
    assert ChatTemplate(OPENAI_TEMPLATE).render(empty_first) == "[text:][text:after]"


def test_openai_format_wraps_string_content_in_parts() -> None:
    t = ChatTemplate(OPENAI_TEMPLATE)
    assert t.render([{"role": "user", "content": "x"}]) == "[text:x]"


def test_non_text_parts_are_not_tokenized_locally() -> None:
    t = ChatTemplate(STRING_TEMPLATE)
    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}]}]
    with pytest.raises(TokenizationError, match="not supported locally"):
        t.render(img)


def test_tools_tojson_and_tool_call_arguments() -> None:
    src = (
        "{% if tools %}{{ tools | tojson }}|{% endif %}"
        "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}"
        "{% else %}{{ m.content }}{% endif %};{% endfor %}"
    )
    t = ChatTemplate(src)
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
        {"role": "assistant", "content": "no calls", "tool_calls": []},
        {
            "role": "tool",
            "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}],
            "tool_call_id": "1",
        },
    ]
    out = t.render(msgs, add_generation_prompt=False, tools=tools)
    # transformers' tojson keeps non-ASCII; arguments parsed from JSON; empty tool_calls dropped
    assert out == '[{"type": "function", "function": {"name": "f", "description": "é"}}]|q;{"x": 1};no calls;r1\nr2;'


def test_raise_exception_and_template_errors_become_tokenization_errors() -> None:
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(TokenizationError, match="first must be user"):
        t.render([{"role": "system", "content": ""}])
    with pytest.raises(TokenizationError):
        ChatTemplate("{{ messages[5]['content'] }}").render([{"role": "user", "content": "x"}])  # UndefinedError
    with pytest.raises(TokenizationError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(TokenizationError, match="non-empty list"):
        ChatTemplate("x").render([])


def test_sandbox_blocks_unsafe_attribute_access() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizationError):
        t.render([{"role": "user", "content": "x"}])


def test_continue_final_message_cuts_after_the_final_text() -> None:
    t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}<end>{% endfor %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]
    assert (
        t.render(msgs, add_generation_prompt=False, continue_final_message=True)
        == "<user>q<end><assistant>The answer is"
    )
    with pytest.raises(TokenizationError, match="cannot both"):
        t.render(msgs, add_generation_prompt=True, continue_final_message=True)


async def test_async_api_matches_sync_above_and_below_threshold() -> None:
    tok = LocalTokenizer.from_dir(ASSET, thread_threshold=100)
    short, long = "short text", "long text with words " * 200
    assert await tok.aencode_prompt(short) == tok.encode_prompt(short)
    assert await tok.aencode_prompt(long) == tok.encode_prompt(long)  # via a worker thread
    chat = [{"role": "user", "content": long}]
    assert await tok.aencode_chat(chat) == tok.encode_chat(chat)
    with pytest.raises(TokenizationError):
        await tok.aencode_prompt(123)  # type: ignore[arg-type]
