"""The tiktoken engine is used only for tokenizer.json files it reproduces, and refuses the others."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models

from kvgate.tokenization import LocalTokenizer, TokenizationError
from kvgate.tokenization.fast_bpe import FastBPE
from kvgate.tokenization.fastokens_engine import FastTokens

ASSET = Path(__file__).resolve().parents[2] / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5"


@pytest.fixture(scope="module")
def sim_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ASSET / "tokenizer.json").read_text(encoding="utf-8"))
    return data


def build(data: dict[str, Any]) -> tuple[FastBPE | None, str]:
    return FastBPE.build(data, Tokenizer.from_str(json.dumps(data)))


def test_sim_asset_uses_the_fast_engine_with_identical_ids() -> None:
    fast, slow = LocalTokenizer.from_dir(ASSET, engines=("tiktoken",)), LocalTokenizer.from_dir(ASSET, fast=False)
    assert (fast.engine, fast.fast_reason) == ("tiktoken", "ok")
    texts = ["e\u0301 not NFC <|im_end|>\u0338", "<|im_start|>user\nhi<|im_end|>", "x" * 10_000, "  \n\n\t  "]
    for text in texts:
        for special in (True, False):
            assert fast.encode_prompt(text, add_special_tokens=special) == slow.encode_prompt(
                text, add_special_tokens=special
            )


def test_incomplete_merges_are_refused(sim_json: dict[str, Any]) -> None:
    data = copy.deepcopy(sim_json)
    vocab = data["model"]["vocab"]
    merges = data["model"]["merges"]
    # drop one of two listed splits of some token: HF could then stop where tiktoken would merge
    seen: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a + b in seen:
            del merges[k]
            break
        seen[a + b] = k
    assert vocab
    assert build(data) == (None, "merges are not complete")


def test_other_normalizers_and_pre_tokenizers_are_refused(sim_json: dict[str, Any]) -> None:
    data = copy.deepcopy(sim_json)
    data["normalizer"] = {"type": "Lowercase"}
    assert build(data)[1] == "normalizer other than NFC"
    data = copy.deepcopy(sim_json)
    data["pre_tokenizer"] = {"type": "Whitespace"}
    assert build(data)[1] == "pre-tokenizer is not a byte-level regex split"


def test_non_bpe_models_fall_back_to_tokenizers(tmp_path: Path) -> None:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    local = LocalTokenizer.from_dir(tmp_path)
    assert local.engine == "tokenizers"
    assert local.fast_reason.startswith("fastokens: ")  # every engine tried says why it was refused
    assert local.fast_reason.endswith("; tiktoken: not a plain BPE model")


def test_the_default_prefers_fastokens_and_an_unknown_engine_is_an_error() -> None:
    assert LocalTokenizer.from_dir(ASSET).engine == "fastokens"
    with pytest.raises(TokenizationError, match="unknown tokenizer engine"):
        LocalTokenizer.from_dir(ASSET, engines=("nope",))


def test_lone_surrogates_get_the_same_ids_from_both_fast_engines() -> None:
    """A lone surrogate (a valid JSON escape, not UTF-8) is replaced as tiktoken does, never an error."""
    text = "a \udc80 b \ud800"
    fastokens = LocalTokenizer.from_dir(ASSET, engines=("fastokens",))
    tiktoken = LocalTokenizer.from_dir(ASSET, engines=("tiktoken",))
    assert fastokens.engine == "fastokens" and tiktoken.engine == "tiktoken"
    for special in (True, False):
        got = fastokens.encode_prompt(text, add_special_tokens=special)
        assert got == tiktoken.encode_prompt(text, add_special_tokens=special) and got


def test_fastokens_batch_pieces_equal_single_encodes_even_with_lone_surrogates() -> None:
    """The batch API (one flat uint32 buffer, sliced per piece) gives each piece's own ids; a lone surrogate
    falls back to one-by-one encoding with the same fix-up, never an error."""
    fast = LocalTokenizer.from_dir(ASSET, engines=("fastokens",))._fast
    assert isinstance(fast, FastTokens)
    for pieces in (["hello world", "", "\n\n", "东京 🙂", "x" * 3000], ["a \udc80 b", "c"], []):
        got = fast.encode_pieces(pieces)
        assert [a.typecode for a in got] == ["I"] * len(pieces)
        assert [list(a) for a in got] == [fast.encode(p, False) for p in pieces]
