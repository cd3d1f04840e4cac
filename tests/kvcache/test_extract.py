from __future__ import annotations

import json
from typing import Any

import pytest

from kvgate.filters.kvcache.extract import (
    ExtractError,
    chat_key,
    extract,
    extract_prompt_and_model,
    parse_body,
    prompt_key,
)


@pytest.mark.parametrize(
    ("body", "model", "prompt"),
    [
        ({"model": "m", "prompt": "  hello world \n"}, "m", "hello world"),
        ({"model": "m", "prompt": ["a", "b"]}, "m", "a\nb"),
        ({"prompt": ["a", 1, None, "b"]}, "", "a\nb"),
        ({"model": 7, "prompt": "x"}, "", "x"),
        ({"prompt": 42}, "", ""),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}, "", "hi\nthere"),
        (
            {"prompt": "", "messages": [{"role": "system", "content": "hi"}, "junk", {"role": "user", "content": "x"}]},
            "",
            "hi\nx",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                    {"role": "user", "content": "text"},
                ]
            },
            "",
            "text",
        ),
        # kvgate fix (Pixiu skipped list content, so such chats were never routed): text parts count
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "only parts"}]}]}, "", "only parts"),
        (
            {
                "messages": [
                    {"role": "system", "content": "sys"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "u"}},
                            {"type": "text", "text": "a"},
                            {"type": "text", "text": "b"},
                        ],
                    },
                ]
            },
            "",
            "sys\na\nb",
        ),
        ({"prompt": "   ", "messages": [{"role": "user", "content": "ignored"}]}, "", ""),
        ({}, "", ""),
        (None, "", ""),
    ],
)
def test_extraction_table(body: Any, model: str, prompt: str) -> None:
    assert extract_prompt_and_model(body) == (model, prompt)


def test_invalid_json_and_non_object() -> None:
    with pytest.raises(ExtractError):
        parse_body(b"{not json")
    with pytest.raises(ExtractError):
        extract_prompt_and_model([1, 2])
    assert parse_body(b"") is None


def test_default_model_and_empty_prompt() -> None:
    r = extract({"prompt": "p"}, default_model="demo")
    assert r is not None and r.model == "demo" and r.kind == "prompt"
    assert extract({"model": "own", "prompt": "p"}, "demo").model == "own"  # type: ignore[union-attr]
    assert extract({"messages": []}, "demo") is None


def test_tokenize_request_builder_never_raw_body() -> None:
    r = extract({"model": "m", "prompt": ["a", "b"], "stream": True, "max_tokens": 5}, "d")
    assert r is not None
    assert r.tokenize_request() == {"model": "m", "prompt": "a\nb"}
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    r = extract({"model": "m", "messages": msgs, "stream": True, "temperature": 0}, "d")
    assert r is not None and r.kind == "chat"
    assert r.tokenize_request() == {"model": "m", "messages": msgs, "add_generation_prompt": True}
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = extract({"messages": msgs, "tools": tools}, "")
    assert r is not None and r.tokenize_request() == {"messages": msgs, "add_generation_prompt": True, "tools": tools}


def test_prompt_key_is_pixius() -> None:
    import hashlib

    assert prompt_key("m", "p") == hashlib.sha256(b"m\x00p").hexdigest()
    r = extract({"model": "m", "prompt": "p"}, "")
    assert r is not None and r.key == prompt_key("m", "p")


def test_prompt_is_tokenized_exactly_as_the_engine_sees_it() -> None:
    # Regression: a leading space changes every token id (and LMCache chunk hash); Pixiu's stripped
    # prompt made every lookup miss for such prompts. The stripped text stays the extracted prompt.
    r = extract({"model": "m", "prompt": " p "}, "")
    assert r is not None and r.prompt == "p"
    assert r.tokenize_request() == {"model": "m", "prompt": " p "}
    assert r.key == prompt_key("m", " p ") != prompt_key("m", "p")
    r = extract({"model": "m", "prompt": [" only one"]}, "")
    assert r is not None and r.tokenize_request()["prompt"] == " only one"


def test_chat_key_covers_roles_and_contents() -> None:
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
    b = [{"role": "system", "content": "hi"}, {"role": "user", "content": "there"}]
    c = [{"role": "user", "content": "hi\nthere"}]
    keys = {chat_key("m", a), chat_key("m", b), chat_key("m", c), chat_key("m2", a)}
    assert len(keys) == 4  # Pixiu's joined-text key would make a, b, c collide
    # canonical: key order inside a message does not matter
    a2 = [json.loads('{"content": "hi", "role": "user"}'), {"content": "there", "role": "assistant"}]
    assert chat_key("m", a) == chat_key("m", a2)
    # a chat request and a prompt request with the same text do not share a key
    ra = extract({"model": "m", "messages": c}, "")
    assert ra is not None and ra.key != prompt_key("m", "hi\nthere")
