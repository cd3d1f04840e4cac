"""Message-level reuse: piecewise encoding between added tokens equals whole-text encoding."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from kvgate.tokenization import LocalTokenizer

ASSET = Path(__file__).resolve().parents[2] / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5"
PIECES = ["hello", " world", "\n\n", "  ", "e\u0301", "é", "<|im_end|>", "<|im_start|>", "🙂", "x=1;", "\t", "ｶﾀｶﾅ"]


def random_chat(rng: random.Random) -> list[dict[str, Any]]:
    roles = ["system", "user", "assistant", "user"]
    return [
        {"role": rng.choice(roles), "content": "".join(rng.choices(PIECES, k=rng.randint(0, 30)))}
        for _ in range(rng.randint(1, 6))
    ]


@pytest.mark.parametrize("engine", ["fastokens", "tiktoken", "tokenizers"])
def test_segmented_chat_ids_equal_whole_text_ids(engine: str) -> None:
    tok = LocalTokenizer.from_dir(ASSET, fast=engine != "tokenizers", engines=(engine,))
    assert tok.engine == engine
    assert tok.segments is not None
    rng = random.Random(3)
    for _ in range(200):
        chat = random_chat(rng)
        # first sight (whole-text encode, cut into cached pieces), then the next turn (pieces reused)
        turn = [{"role": "user", "content": "".join(rng.choices(PIECES, k=rng.randint(0, 3)))}]
        for msgs in (chat, [*chat, *turn], [*chat, *random_chat(rng)]):
            text = tok.render_chat(msgs)
            assert tok.encode_chat(msgs) == tok.encode_prompt(text, add_special_tokens=False), msgs
    assert tok.segments.hits > 100


def test_next_turn_reuses_earlier_messages() -> None:
    tok = LocalTokenizer.from_dir(ASSET)
    assert tok.segments is not None
    chat = [{"role": "system", "content": "long system prompt " * 200}, {"role": "user", "content": "first"}]
    tok.encode_chat(chat)
    misses = tok.segments.misses
    chat += [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "second"}]
    ids = tok.encode_chat(chat)
    assert ids == tok.encode_prompt(tok.render_chat(chat), add_special_tokens=False)
    # only the two new message bodies (+ the generation prompt's "assistant\n" is already cached) are encoded
    assert tok.segments.misses - misses == 2


def test_stripping_added_tokens_disable_reuse(tmp_path: Path) -> None:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", lstrip=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert LocalTokenizer.from_dir(tmp_path).segments is None


def test_normalized_added_tokens_with_other_normalizers_disable_reuse(tmp_path: Path) -> None:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.add_tokens([AddedToken("<x>", normalized=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert LocalTokenizer.from_dir(tmp_path).segments is None


async def test_async_chat_uses_the_same_segments() -> None:
    tok = LocalTokenizer.from_dir(ASSET, thread_threshold=50)
    chat = [{"role": "user", "content": "words " * 100}]
    assert await tok.aencode_chat(chat) == tok.encode_prompt(tok.render_chat(chat), add_special_tokens=False)


@pytest.mark.parametrize("engine", ["fastokens", "tiktoken", "tokenizers"])
def test_chat_prefix_is_an_exact_prefix_of_the_full_ids(engine: str) -> None:
    """Lazy tokenization: the pieces encoded so far are exactly the first ids of the whole chat."""
    tok = LocalTokenizer.from_dir(ASSET, fast=engine != "tokenizers", engines=(engine,))
    rng = random.Random(11)
    partial = complete = 0
    for _ in range(300):
        if tok.segments is not None and rng.random() < 0.5:
            tok.segments.clear()
        msgs = random_chat(rng)
        if rng.random() < 0.9:  # mostly NFC texts (the others are encoded whole)
            msgs = [{**m, "content": m["content"].replace("e\u0301", "é")} for m in msgs]
        text = tok.render_chat(msgs)
        full = tok.encode_prompt(text, add_special_tokens=False)
        need = rng.choice((1, 5, 17, 65, 257))
        got = tok.chat_prefix(tok.split_chat(text), need)
        if got is None:  # a text that is not NFC is only ever encoded whole
            assert not unicodedata.is_normalized("NFC", text)
            continue
        ids, done = list(got[0]), got[1]
        if done:
            complete += 1
            assert ids == full
        else:
            partial += 1
            assert len(ids) >= need and ids == full[: len(ids)] and len(ids) < len(full)
    assert partial > 50 and complete > 50


def test_chat_prefix_gives_up_beyond_its_character_budget() -> None:
    tok = LocalTokenizer.from_dir(ASSET, thread_threshold=100)
    text = tok.render_chat([{"role": "system", "content": "word " * 200}, {"role": "user", "content": "hi"}])
    assert tok.chat_prefix(tok.split_chat(text), 10) is None  # the first piece alone is over 100 new characters
    tok.encode_chat([{"role": "system", "content": "word " * 200}])  # now that piece is cached
    got = tok.chat_prefix(tok.split_chat(text), 10)
    assert got is not None and list(got[0]) == tok.encode_prompt(text, add_special_tokens=False)[: len(got[0])]


async def test_a_new_turn_of_a_long_chat_is_encoded_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long chat whose earlier messages are cached re-encodes only its new message: done inline, without a
    worker thread (the hop cost ~0.4 ms of the routing step); a chat mostly new still goes to the thread."""
    import asyncio

    tok = LocalTokenizer.from_dir(ASSET, thread_threshold=100)
    threads: list[object] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(fn: Any, /, *args: Any) -> Any:
        threads.append(fn)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    chat = [{"role": "system", "content": "a long system prompt " * 50}, {"role": "user", "content": "first"}]
    first = tok.render_chat(chat)
    assert list(await tok.aencode_rendered_chat(first)) == tok.encode_prompt(first, add_special_tokens=False)
    assert len(threads) == 1  # never seen: encoded on a worker thread
    chat += [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "second question"}]
    text = tok.render_chat(chat)
    assert list(await tok.aencode_rendered_chat(text)) == tok.encode_prompt(text, add_special_tokens=False)
    assert len(threads) == 1  # the new turn: inline
    other = tok.render_chat([{"role": "user", "content": "something else entirely " * 20}])
    assert list(await tok.aencode_rendered_chat(other)) == tok.encode_prompt(other, add_special_tokens=False)
    assert len(threads) == 2


def test_encode_if_known_refuses_beyond_its_budget_and_encodes_nothing() -> None:
    tok = LocalTokenizer.from_dir(ASSET)
    assert tok.segments is not None
    text = tok.render_chat([{"role": "system", "content": "word " * 100}, {"role": "user", "content": "hi"}])
    misses = tok.segments.misses
    assert tok.segments.encode_if_known(text, 100) is None
    assert tok.segments.misses == misses  # nothing was encoded
    assert list(tok.segments.encode_if_known(text, 10_000) or ()) == tok.encode_prompt(text, add_special_tokens=False)
