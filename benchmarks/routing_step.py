"""Local routing step cost: tokenize an 8k-token chat in-process (token-cache miss) + match the block index.

Measures, in one process, p50/p99 of:
- ``render``: the chat template (jinja, vLLM's rules);
- ``encode``: Hugging Face ``tokenizers`` on the rendered text (add_special_tokens=False);
- ``match``: ``BlockIndex.match`` on the ids (4 instances holding prefixes of varied length, GPU block 16,
  plus LMCache-like 256-token CPU chunks);
- ``step miss``: render + encode + match of a chat seen for the first time (the message-segment cache is
  cleared before every iteration: a token-cache miss with nothing reusable);
- ``step turn``: the same for the next turn of a known conversation (only the last user turn is new; the
  earlier messages hit the segment cache);
and whether the encoder releases the GIL (progress of a pure-Python counter thread). Both engines are
measured: ``tokenizers`` alone (``fast=False``) and the default (tiktoken where ``fast_bpe`` proves it equal).

    python benchmarks/routing_step.py [--tokenizer-dir kvgate_sim/assets/tokenizers/sim-qwen2.5] \\
        [--tokens 8192] [--iters 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvgate.routing.block_index import BlockIndex
from kvgate.tokenization import LocalTokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her all she there would their we him been has when who will more no if out so said what up its "
    "cache routing prefix engine token block gateway latency über naïve 東京 数据 Привет 🙂 x=1; f(y) {k: v}"
).split()


def chat_of(n_tokens: int, tok: LocalTokenizer, rng: random.Random, tail: str) -> list[dict[str, Any]]:
    """A multi-turn chat of about ``n_tokens`` tokens whose last user turn is ``tail``."""
    system = {"role": "system", "content": "You are a helpful assistant. " + " ".join(rng.choices(WORDS, k=200))}
    msgs: list[dict[str, Any]] = [system]
    while len(tok.encode_chat([*msgs, {"role": "user", "content": tail}])) < n_tokens - 400:
        msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=300))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=100))})
    return [*msgs, {"role": "user", "content": tail}]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1e3


def timeit(fn: Callable[[int], object], iters: int) -> list[float]:
    out = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def gil_share(work: Callable[[], object], seconds: float = 0.5) -> float:
    """Counter progress in a Python thread while ``work`` loops in the main thread, relative to idle."""
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.05)
    c0, t0 = count[0], time.perf_counter()
    time.sleep(seconds)
    idle = (count[0] - c0) / (time.perf_counter() - t0)
    c0, t0 = count[0], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        work()
    busy = (count[0] - c0) / (time.perf_counter() - t0)
    stop.set()
    th.join()
    return busy / idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-dir", type=Path, default=ROOT / "kvgate_sim" / "assets" / "tokenizers" / "sim-qwen2.5")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()

    for fast in (False, True):
        run(LocalTokenizer.from_dir(args.tokenizer_dir, fast=fast), args)


def run(tok: LocalTokenizer, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    base = chat_of(args.tokens, tok, rng, "tail")
    chats = [
        [*base[:-1], {"role": "user", "content": f"question {i}: " + " ".join(rng.choices(WORDS, k=20))}]
        for i in range(args.iters)
    ]
    texts = [tok.render_chat(c) for c in chats]
    ids0 = tok.encode_prompt(texts[0], add_special_tokens=False)

    index = BlockIndex()
    shared = ids0[: len(ids0) - 64]
    for inst, frac in (("e0", 1.0), ("e1", 0.5), ("e2", 0.25), ("e3", 0.0)):
        n = int(len(shared) * frac) // 16 * 16
        if n:
            index.apply_stored(inst, list(range(n // 16)), None, shared[:n], 16, "GPU")
        m = int(len(shared) * frac) // 256 * 256
        if m:
            index.apply_stored(inst, [10**6 + k for k in range(m // 256)], None, shared[:m], 256, "cpu")

    render = timeit(lambda i: tok.render_chat(chats[i]), args.iters)
    encode = timeit(lambda i: tok.encode_prompt(texts[i], add_special_tokens=False), args.iters)
    ids = [tok.encode_prompt(t, add_special_tokens=False) for t in texts]
    match = timeit(lambda i: index.match(ids[i]), args.iters)

    def miss(i: int) -> float:
        if tok.segments is not None:
            tok.segments.clear()
        t0 = time.perf_counter()
        index.match(tok.encode_chat(chats[i]))
        return time.perf_counter() - t0

    step_miss = [miss(i) for i in range(args.iters)]
    step_turn = timeit(lambda i: index.match(tok.encode_chat(chats[i])), args.iters)

    print(f"[engine {tok.engine}; tiktoken path: {tok.fast_reason}; segment reuse: {tok.segments is not None}]")
    print(
        f"tokenizer {args.tokenizer_dir.name}: chat of {len(ids0)} tokens, {len(texts[0])} chars, "
        f"{len(base)} messages; index {len(index)} blocks, sizes {index.block_sizes}; result {index.match(ids0)}"
    )
    for name, xs in (
        ("render", render),
        ("encode", encode),
        ("match", match),
        ("step miss", step_miss),
        ("step turn", step_turn),
    ):
        print(
            f"  {name:9s} p50 {pct(xs, 0.5):7.3f} ms   p99 {pct(xs, 0.99):7.3f} ms"
            f"   mean {statistics.mean(xs) * 1e3:7.3f} ms"
        )
    text = texts[0]
    if tok.engine == "tokenizers":
        raw = tok._tok
        enc = gil_share(lambda: raw.encode(text, add_special_tokens=False))
        batch = gil_share(lambda: raw.encode_batch([text], add_special_tokens=False))
        print(
            f"  GIL: a Python thread keeps {enc:.0%} of its idle progress during encode(), {batch:.0%} during "
            "encode_batch()"
        )
    else:
        share = gil_share(lambda: tok.encode_prompt(text, add_special_tokens=False))
        print(f"  GIL: a Python thread keeps {share:.0%} of its idle progress during the tiktoken encode")


if __name__ == "__main__":
    main()
