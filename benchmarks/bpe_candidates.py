"""Faster exact BPE than tiktoken? Candidate libraries against kvgate's ``FastBPE`` (tiktoken) and HF ``tokenizers``.

Research for issue 9: a token-cache miss of an 8k-token chat never seen is bounded by tiktoken's encode of
~29k characters. For each candidate that is installed and loads the tokenizer directory (default: the
simulator's sim-qwen2.5), in one process:

- exactness: ids equal to ``tokenizers.Tokenizer.from_file(...).encode(text, add_special_tokens=False).ids`` on a
  varied corpus (ASCII prose, code, whitespace runs, digits, CJK, Cyrillic, Arabic, emoji, combining marks, NFC
  and non-NFC text, the tokenizer's added tokens such as ``<|im_start|>``); mismatches are counted;
- speed: median encode time of a ~29k-character chat (built like routing_decode.py, from its WORDS) and of a
  300-character message, engines alternating within every round, the ratio to tiktoken from the same run;
- GIL: a ticker thread's longest gap while the main thread encodes the long text (switch interval 0.1 ms): a
  gap near the encode time means the library holds the GIL while encoding.

Candidates not installed are skipped with a note, so the script runs in the project venv too (only tiktoken
and tokenizers there). Candidates are not project dependencies.

    python benchmarks/bpe_candidates.py [--tokenizer-dir DIR] [--texts 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kvgate.tokenization.local import LocalTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_decode import WORDS, default_tokenizer_dir

Encode = Callable[[str], list[int]]


class Skip(Exception):
    """The candidate cannot be used here (not installed, cannot load this tokenizer, needs the network)."""


@dataclass
class Engine:
    name: str
    dist: str
    encode: Encode
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def dist_info(dist: str) -> tuple[str, str]:
    """Installed version and licence (License-Expression, License, or the licence classifiers)."""
    try:
        md = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-", "-"
    values = [*(md.get_all("License-Expression") or []), *(md.get_all("License") or [])]
    lic = str(values[0]).strip() if values else ""
    lic = lic.splitlines()[0] if lic else ""  # some put the whole licence text here
    if not lic:
        lic = " / ".join(c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if "License ::" in c)
    if not lic:  # only a licence file: its first line
        for f in importlib.metadata.files(dist) or []:
            if Path(str(f)).name.upper().startswith("LICENSE"):
                first = next((x.strip() for x in f.read_text().splitlines() if x.strip()), "")
                lic = f"{first} (licence file)"
                break
    return str(md["Version"]), lic or "?"


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Skip(f"not importable ({exc})") from exc


def added_splitter(path: Path) -> Callable[[str], list[str | int]]:
    """Split text at the tokenizer's added tokens (what kvgate's segments.py does) for libraries that ignore them."""
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {a["content"]: int(a["id"]) for a in data.get("added_tokens", [])}
    pattern = re.compile("|".join(re.escape(c) for c in sorted(added, key=len, reverse=True)))

    def split(text: str) -> list[str | int]:
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(added[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    return split


def load_fastokens(path: Path) -> Encode:
    tok = _module("fastokens").Tokenizer.from_file(str(path))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def load_tokie(path: Path) -> Encode:
    tok = _module("tokie").Tokenizer.from_json(str(path))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def load_kitoken(path: Path) -> Encode:
    tok = _module("kitoken").Kitoken.from_tokenizers_file(str(path))
    return lambda text: tok.encode(text, True)  # True: encode special tokens


def load_bpe_qwen(path: Path) -> Encode:
    """bpe-qwen reads the slow tokenizer's vocab.json + merges.txt (written from tokenizer.json to a temporary
    directory) and ignores added tokens: the text is split at them first, as segments.py would."""
    mod = _module("bpe_qwen")  # its package imports transformers
    data = json.loads(path.read_text(encoding="utf-8"))
    tmp = Path(tempfile.mkdtemp(prefix="bpe-qwen-"))
    try:
        (tmp / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = mod.QwenTokenizer(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    split = added_splitter(path)

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for piece in split(text):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(tok.encode(piece))
        return ids

    return encode


def load_bpe_openai(path: Path) -> Encode:
    bindings = _module("bpe_openai._bindings")
    raise Skip(
        f"built-in encodings only ({', '.join(bindings.supported_encodings())}); no custom ranks or tokenizer.json"
    )


def load_rs_bpe(path: Path) -> Encode:
    openai = _module("rs_bpe.bpe").openai
    try:
        openai.Tokenizer()
    except TypeError as exc:
        raise Skip(f"built-in cl100k_base / o200k_base only; no constructor for other ranks ({exc})") from exc
    raise Skip("no loader for a tokenizer.json")


CANDIDATES: list[tuple[str, str, Callable[[Path], Encode]]] = [
    ("fastokens", "fastokens", load_fastokens),
    ("tokie", "tokie", load_tokie),
    ("kitoken", "kitoken", load_kitoken),
    ("bpe-qwen", "bpe-qwen", load_bpe_qwen),
    ("bpe-openai", "bpe-openai", load_bpe_openai),
    ("rs-bpe", "rs_bpe", load_rs_bpe),
]

# --- corpus ---

PROSE = "The quick brown fox jumps over the lazy dog while KV-cache aware routing picks an engine".split()
CODE = [
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.0f; }\n",
    '{"key": [1, 2, null], "v": true}',
    "SELECT * FROM t WHERE id IN (1,2,3) -- note\r\n",
    "<div class='x'>&amp;&lt;</div>\n\t\t<br/>",
    'fn main() { println!("{:?}", v.iter().map(|x| x * 2).collect::<Vec<_>>()); }',
]
NON_ASCII = [
    "你好世界，今天天气很好。",
    "東京都の数据とこんにちは",
    "Привет, как дела? Ёжик в тумане.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "🙂🚀👩‍👩‍👧 🇫🇷 👍🏽 ❤️",
    "Zoë naïve café über façade ångström",
    "한국어 텍스트",
    "Ελληνικά κείμενο",
]
COMBINING = [
    "e\u0301",
    "a\u0308",
    "o\u0302\u0323",
    "\u1100\u1161\u11a8",
    "n\u0303",
    "Å",
    "\u212b",
    "ﬁ",
    "①",
    "ｆｕｌｌ",
]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\n\n\n", "    ", "\x0b", "\x0c"]
PUNCT = [*list("!?.,;:-_=+*/\\|@#$%^&()[]{}<>'\"`~"), "...", "--", "==", "->", "=>", "'s", "'S", "'ll", "'D"]


def fresh_words(rng: random.Random, n: int) -> str:
    """``n`` random words: pre-tokens no cache has seen (a worst case for libraries with a pre-token cache)."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüñøçßжщлдфя東京数据"
    seps = [" ", " ", " ", ", ", ". ", "\n", " (", ") ", "-", "'s "]
    return "".join("".join(rng.choices(letters, k=rng.randint(1, 10))) + rng.choice(seps) for _ in range(n))


def random_code_points(rng: random.Random, n: int) -> str:
    """Any assigned-or-not code point (no surrogates), mixed with spaces and letters: checks that the library's
    regex engine classifies letters, numbers and spaces with the same Unicode tables as the reference."""
    out = []
    for _ in range(n):
        hi = rng.choice([0x250, 0x3000, 0x10000, 0x20000, 0x30000, 0x110000])
        cp = rng.randrange(0x80, hi)
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0x20
        out.append(chr(cp) + rng.choice(["", "", " ", "a", "1", "\n"]))
    return "".join(out)


def make_corpus(n: int, added: list[str], seed: int = 1) -> list[tuple[str, str]]:
    """``n`` (category, text) pairs."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choices(PROSE + WORDS, k=k))

    def mix(k: int) -> str:
        pool: list[list[str]] = [PROSE, WORDS, NON_ASCII, COMBINING, SPACES, PUNCT, CODE]
        parts = []
        for _ in range(k):
            parts.append(rng.choice(rng.choice(pool)))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", "", "\n", ""]))
        return "".join(parts)

    def digits() -> str:
        return (
            rng.choice(["", " ", "x"])
            + "".join(rng.choices("0123456789", k=rng.randint(1, 40)))
            + rng.choice(["", ".5", ",000", " kg", "%"])
        )

    def spaces() -> str:
        return "".join(rng.choices(SPACES, k=rng.randint(1, 12))) + rng.choice(["", "x", "word", " y", "1"])

    def non_nfc() -> str:
        text = mix(rng.randint(3, 15))
        return unicodedata.normalize(rng.choice(["NFD", "NFKD"]), text) + rng.choice(COMBINING)

    def with_added() -> str:
        pieces = []
        for _ in range(rng.randint(1, 6)):
            pieces.append(rng.choice(added))
            pieces.append(rng.choice(["user\n", "assistant\n", "system\n", "", " ", "\n"]) + mix(rng.randint(0, 8)))
        return "".join(pieces)

    makers: list[tuple[str, Callable[[], str]]] = [
        ("prose", lambda: words(rng.randint(1, 60))),
        ("code", lambda: "".join(rng.choices(CODE, k=rng.randint(1, 4)))),
        ("digits", digits),
        ("whitespace", spaces),
        ("non-ascii", lambda: " ".join(rng.choices(NON_ASCII, k=rng.randint(1, 4)))),
        ("mixed", lambda: mix(rng.randint(1, 30))),
        ("non-nfc", non_nfc),
        ("added tokens", with_added),
        ("random words", lambda: fresh_words(rng, rng.randint(1, 80))),
        ("random code points", lambda: random_code_points(rng, rng.randint(1, 40))),
        ("long runs", lambda: rng.choice(["a", " ", "\n", "1", "=", "🙂", "é", " a", "ab"]) * rng.randint(100, 3000)),
    ]
    return [(name, make()) for name, make in (makers[i % len(makers)] for i in range(n))]


def long_chat(tok: LocalTokenizer, tokens: int) -> str:
    """A rendered chat of about ``tokens`` tokens, built like routing_decode.py's."""
    rng = random.Random(0)
    system = {"role": "system", "content": "You are a helpful assistant. " + " ".join(rng.choices(WORDS, k=200))}
    msgs: list[dict[str, Any]] = [system]
    while len(tok.encode_chat(msgs)) < tokens - 400:
        msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=300))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=100))})
    msgs.append({"role": "user", "content": "question 1: " + " ".join(rng.choices(WORDS, k=20))})
    return tok.render_chat(msgs, add_generation_prompt=True)


def short_message(chars: int) -> str:
    rng = random.Random(2)
    text = ""
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


# --- measurements ---


def gil_check(encode: Encode, texts: list[str]) -> tuple[float, float]:
    """A ticker thread's share of its solo progress, and its longest gap (s), while the main thread encodes
    ``texts`` (switch interval 0.1 ms). A library that holds the GIL keeps the share low and the gap near one
    encode's time (the table counts a share above 40% as released: a rough check on a busy box). Texts of
    unseen words, so that a pre-token cache does not turn the encode into the (GIL-holding) conversion of the
    ids to a Python list."""
    stop = threading.Event()
    gap = [0.0]
    count = [0]

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gap[0] = max(gap[0], now - last)
            last = now
            count[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        time.sleep(0.005)
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.02)  # the ticker alone (the main thread sleeps: GIL free)
        solo_rate = (count[0] - c0) / (time.perf_counter() - t0)
        gap[0] = 0.0
        c0, t0 = count[0], time.perf_counter()
        for text in texts:
            encode(text)
        rate = (count[0] - c0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    return rate / solo_rate, gap[0]


def docs_windows(chars: int, n: int) -> list[str]:
    """``n`` windows of ``chars`` characters, evenly spread over this repository's README and docs (English,
    Markdown tables, commands, code): natural text whose vocabulary a pre-token cache has partly seen."""
    root = Path(__file__).resolve().parents[1]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in [root / "README.md", *sorted(root.glob("docs/*.md"))])
    if len(text) < chars:
        text = text * (chars // max(1, len(text)) + 1)
    step = max(1, (len(text) - chars) // max(1, n - 1))
    return [text[i * step : i * step + chars] for i in range(n)]


def time_round(engines: list[Engine], label: str, texts: list[str], inner: int, rng: random.Random) -> None:
    """One sample per engine (mean seconds per encode of ``texts``, each ``inner`` times), engines shuffled."""
    order = list(engines)
    rng.shuffle(order)
    for eng in order:
        t0 = time.perf_counter()
        for text in texts:
            for _ in range(inner):
                eng.encode(text)
        eng.samples.setdefault(label, []).append((time.perf_counter() - t0) / (inner * len(texts)))


def cold_text(rng: random.Random, chars: int) -> str:
    text = ""
    while len(text) < chars:
        text += fresh_words(rng, 200)
    return text[:chars]


def median(eng: Engine, label: str) -> float:
    return statistics.median(eng.samples[label])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tokenizer-dir", type=Path, default=default_tokenizer_dir())
    ap.add_argument("--texts", type=int, default=2000, help="exactness corpus size")
    ap.add_argument("--rounds", type=int, default=9, help="timing rounds (engines alternate within each)")
    ap.add_argument("--tokens", type=int, default=8192, help="size of the long chat")
    ap.add_argument("--short-chars", type=int, default=300)
    args = ap.parse_args()
    path = args.tokenizer_dir / "tokenizer.json"

    hf = Tokenizer.from_file(str(path))
    local = LocalTokenizer.from_dir(args.tokenizer_dir)
    fast = local._fast  # kvgate's tiktoken engine (proven equivalent at load)
    if fast is None:
        sys.exit(f"kvgate's tiktoken path is off for this tokenizer: {local.fast_reason}")
    engines = [
        Engine("tiktoken (kvgate FastBPE)", "tiktoken", lambda t: fast.encode(t, False)),
        Engine("HF tokenizers", "tokenizers", lambda t: list(hf.encode(t, add_special_tokens=False).ids)),
    ]
    for name, dist, loader in CANDIDATES:
        t0 = time.perf_counter()
        try:
            enc = loader(path)
        except Skip as exc:
            print(f"skip {name}: {exc}")
            continue
        except Exception as exc:  # a library's own loader error: this tokenizer is not for it
            print(f"skip {name}: cannot load {path.name} ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        engines.append(Engine(name, dist, enc, note=f"loaded in {time.perf_counter() - t0:.2f} s"))

    long_text = long_chat(local, args.tokens)
    short_text = short_message(args.short_chars)
    docs = docs_windows(len(long_text), args.rounds)
    print(
        f"[{args.tokenizer_dir.name}] long chat {len(long_text)} chars = {len(hf.encode(long_text).ids)} tokens; "
        f"short message {len(short_text)} chars = {len(hf.encode(short_text).ids)} tokens"
    )

    # speed first, so that no library's cache has seen the docs windows or the unseen words
    rng = random.Random(3)
    for eng in engines:  # warm-up
        eng.encode(long_text)
        eng.encode(short_text)
    for r in range(args.rounds):
        time_round(engines, "long", [long_text], 3, rng)
        time_round(engines, "docs", [docs[r]], 1, rng)
        time_round(engines, "short", [short_text], 200, rng)
        time_round(engines, "cold", [cold_text(rng, len(long_text)) for _ in range(2)], 1, rng)
    gil_texts = [cold_text(rng, len(long_text)) for _ in range(12)]  # >= 20 ms of encoding for each engine
    gil = {eng.name: gil_check(eng.encode, gil_texts) for eng in engines}

    added = [str(a.content) for a in hf.get_added_tokens_decoder().values()]
    corpus = [
        *make_corpus(args.texts, added),
        ("random words", cold_text(random.Random(4), len(long_text))),
        *(("docs", t) for t in docs),
        ("long chat", long_text),
        ("short message", short_text),
    ]
    expected = [list(hf.encode(text, add_special_tokens=False).ids) for _, text in corpus]
    print(f"exactness corpus: {len(corpus)} texts")
    exact: dict[str, tuple[int, str]] = {}
    for eng in engines:
        bad: dict[str, int] = {}
        first = ""
        for (cat, text), want in zip(corpus, expected, strict=True):
            try:
                got = list(eng.encode(text))
            except Exception as exc:
                got = [-1]
                first = first or f"{type(exc).__name__}"
            if got != want:
                bad[cat] = bad.get(cat, 0) + 1
                if not first:
                    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want))
                    first = f"{text[:60]!r}: ids differ from index {at} ({got[at : at + 4]} vs {want[at : at + 4]})"
        exact[eng.name] = (sum(bad.values()), ", ".join(f"{c} {k}" for c, k in sorted(bad.items())))
        if first:
            print(f"  {eng.name}: first mismatch {first}")
        else:  # kvgate encodes on worker threads: the same corpus from 4 threads at once (shared caches)
            with ThreadPoolExecutor(4) as pool:
                got_all = list(pool.map(eng.encode, [text for _, text in corpus]))
            n_bad = sum(list(g) != w for g, w in zip(got_all, expected, strict=True))
            print(f"  {eng.name}: exact; from 4 threads at once: {n_bad} mismatches")

    base = engines[0]
    print(
        "\n| library | version | licence | exact? (mismatches) | 29k-char chat | ratio to tiktoken "
        "| 29k chars of docs (new window each round) | ratio | 29k chars, unseen words | ratio "
        "| 300-char message | ratio | GIL released? (ticker share, max gap) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for eng in engines:
        version, lic = dist_info(eng.dist)
        n_bad, where = exact[eng.name]
        share, gap = gil[eng.name]
        verdict = "yes (0)" if n_bad == 0 else f"**no** ({n_bad}: {where})"
        print(
            f"| {eng.name} | {version} | {lic} | {verdict} "
            f"| {median(eng, 'long') * 1e3:.2f} ms | {median(eng, 'long') / median(base, 'long'):.2f}x "
            f"| {median(eng, 'docs') * 1e3:.2f} ms | {median(eng, 'docs') / median(base, 'docs'):.2f}x "
            f"| {median(eng, 'cold') * 1e3:.2f} ms | {median(eng, 'cold') / median(base, 'cold'):.2f}x "
            f"| {median(eng, 'short') * 1e6:.1f} µs | {median(eng, 'short') / median(base, 'short'):.2f}x "
            f"| {'yes' if share > 0.4 else 'no'} ({share:.0%}, {gap * 1e3:.2f} ms) |"
        )
    for eng in engines:
        if eng.note:
            print(f"  {eng.name}: {eng.note}")


if __name__ == "__main__":
    main()
