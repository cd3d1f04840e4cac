"""Build the tiny deterministic offline Llama model served by the real-engine tier.

Runs inside the real venv (needs ``tokenizers``, ``transformers`` and ``torch``)::

    .cache/real-venv/bin/python scripts/real-engines/build_tiny_model.py OUT_DIR
    .cache/real-venv/bin/python scripts/real-engines/build_tiny_model.py --check OUT_DIR   # exit 0 = valid

Recipe (reference real-vllm-lmcache-cpu.md §3):

* tokenizer: byte-level BPE trained on 400 ``*.py`` files of this interpreter's standard library (all top-level
  files sorted by name, then package files by relative path; see :func:`corpus_files`); vocab 4096 with the
  specials ``<|begin_of_text|>`` 0 (BOS), ``<|end_of_text|>`` 1 (EOS), ``<|pad|>`` 2, ``<|im_start|>`` 3,
  ``<|im_end|>`` 4; a ``TemplateProcessing`` post-processor prepends BOS;
  a ChatML-like chat template (no BOS) in ``chat_template.jinja`` and in ``tokenizer_config.json``;
* model: 2-layer ``LlamaConfig`` (hidden 128, 4 heads of 32, vocab 4096, float32), ``torch.manual_seed(0)``,
  random init, saved as safetensors.

The output directory gets a marker file recording the package versions, the Python version and this script's
hash; ``--check`` compares it (stdlib only, no torch import) so re-running setup takes milliseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

MARKER = ".kvgate-model-ok"
N_CORPUS_FILES = 400
VOCAB_SIZE = 4096
BOS, EOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


def marker_text() -> str:
    """What the marker must contain: everything the output depends on."""
    script_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    versions = {name: _version(name) for name in ("torch", "transformers", "tokenizers", "safetensors")}
    return json.dumps(
        {
            "python": ".".join(map(str, sys.version_info[:3])),
            "versions": versions,
            "script": script_hash,
            "corpus_files": N_CORPUS_FILES,
        },
        sort_keys=True,
    )


def is_valid(out_dir: Path) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file() or marker.read_text().strip() != marker_text():
        return False
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("chat_template") == CHAT_TEMPLATE


def corpus_files() -> list[str]:
    """The first 400 ``*.py`` files of this interpreter's standard library, deterministic.

    CPython 3.11 has only ~170 *top-level* ``*.py`` files, so the reference recipe ("first 400 top-level files")
    cannot be followed literally: take every top-level file sorted by name, then files of the stdlib packages sorted
    by relative path (``site-packages`` and ``__pycache__`` excluded), keeping only UTF-8 files, up to 400.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    top = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)
    nested = sorted(
        (
            p
            for p in stdlib.rglob("*.py")
            if p.is_file() and p.parent != stdlib and not {"site-packages", "__pycache__"} & set(p.parts)
        ),
        key=lambda p: p.relative_to(stdlib).as_posix(),
    )
    files: list[str] = []
    for path in [*top, *nested]:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(str(path))
        if len(files) == N_CORPUS_FILES:
            return files
    raise SystemExit(f"only {len(files)} UTF-8 *.py files under {stdlib}; need {N_CORPUS_FILES}")


def build(out_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(corpus_files(), trainer)
        for i, name in enumerate(SPECIALS):
            got = tok.token_to_id(name)
            if got != i:
                raise SystemExit(f"special token {name} got id {got}, expected {i}")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B:1",
            special_tokens=[(BOS, 0)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            additional_special_tokens=[IM_START, IM_END],
            model_max_length=4096,
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(str(tmp))
        # transformers 5 writes chat_template.jinja; also keep the template in tokenizer_config.json.
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            tie_word_embeddings=False,
            dtype="float32",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(str(tmp))
        n_params = sum(p.numel() for p in model.parameters())

        # Sanity: BOS prepended, chat template without BOS.
        ids = fast("def main():\n    pass\n")["input_ids"]
        if ids[0] != 0:
            raise SystemExit(f"BOS not prepended: {ids[:5]}")
        chat = fast.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
        chat_ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
        if chat_ids[0] != 3:
            raise SystemExit(f"chat ids should start with <|im_start|> (3): {chat_ids[:5]}")

        (tmp / MARKER).write_text(marker_text() + "\n")
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        print(f"built {out_dir}: {n_params} parameters")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--check", action="store_true", help="exit 0 if OUT_DIR is complete and current, else 1")
    ap.add_argument("--force", action="store_true", help="rebuild even if valid")
    args = ap.parse_args(argv)
    out_dir: Path = args.out_dir.resolve()
    if args.check:
        return 0 if is_valid(out_dir) else 1
    if is_valid(out_dir) and not args.force:
        print(f"{out_dir} is already valid")
        return 0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
