"""Optional (marker ``real``): the local tokenizer gives transformers' ids for the real tier's tiny model.

Needs the real tier's venv and model (``scripts/real-engines/setup.sh``): ``.cache/real-venv`` and
``.cache/real-model/tiny`` (or ``$KVGATE_REAL_MODEL``). Starts no engine: the reference ids come from
``transformers`` ``AutoTokenizer`` in that venv, which is what vLLM's ``/tokenize`` uses
(completions: ``add_special_tokens=True``; chat: ``apply_chat_template`` then no special tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvgate.tokenization import LocalTokenizer

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".cache" / "real-venv" / "bin" / "python"
MODEL = Path(os.environ.get("KVGATE_REAL_MODEL", str(ROOT / ".cache" / "real-model" / "tiny")))

REFERENCE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for case in json.load(sys.stdin):
    if case["kind"] == "prompt":
        out.append(tok(case["prompt"]).input_ids)
    else:
        out.append(list(tok.apply_chat_template(case["messages"], add_generation_prompt=case["gen"],
                                                tokenize=True, return_dict=False)))
json.dump(out, sys.stdout)
"""

TEXTS = [
    "Hello world",
    "",
    " leading space",
    "trailing space ",
    "The capital of France is",
    "naïve café — 你好, мир! 🙂",
    "def f(x):\n    return x * 2\n",
    "line1\n\nline2\r\n\tTabbed",
    "<|im_start|>user literal<|im_end|>",
    "1234567890 + 9876543210 = ?",
    "a" * 500,
    "Ünïcödé ŧëxŧ wïŧħ ∂ıåçrıŧıçš",
    'JSON: {"a": [1, 2, 3]}',
    "   ",
    "emoji 👩‍👩‍👧‍👦 family",
    "mixed 日本語とEnglish",
    "quotes 'single' \"double\" `back`",
    "URL https://example.invalid/a?b=c",
    "markdown **bold** _it_ `code`",
    "a very long sentence " * 40,
    "ends with newline\n",
    "Hindi: नमस्ते",
    "Arabic: مرحبا بالعالم",
    "math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6",
    "tab\tseparated\tvalues",
]


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = [{"kind": "prompt", "prompt": t} for t in TEXTS]
    for i, t in enumerate(TEXTS):
        msgs = [{"role": "user", "content": t}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        if i % 4 == 1:
            msgs += [{"role": "assistant", "content": "Sure: " + t[:20]}, {"role": "user", "content": "more ✓"}]
        cases.append({"kind": "chat", "messages": msgs, "gen": i % 5 != 0})
    return cases


@pytest.mark.skipif(not (VENV_PY.exists() and (MODEL / "tokenizer.json").exists()), reason="real tier not installed")
def test_local_ids_equal_transformers_ids_for_the_tiny_model() -> None:
    cases = _cases()
    assert len(cases) >= 50
    proc = subprocess.run(
        [str(VENV_PY), "-c", REFERENCE, str(MODEL)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    expected = json.loads(proc.stdout)
    tok = LocalTokenizer.from_dir(MODEL)
    for case, want in zip(cases, expected, strict=True):
        if case["kind"] == "prompt":
            got = tok.encode_prompt(case["prompt"])
        else:
            got = tok.encode_chat(case["messages"], add_generation_prompt=case["gen"])
        assert got == want, case
