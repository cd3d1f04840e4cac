"""Lazy tokenization on a token-cache miss (index_source: events): a chat whose first block nobody holds is
decided after its first pieces. The decision must be IDENTICAL to full tokenization + match, which is what the
token-cache-hit path does; partial ids are never cached as if complete."""

from __future__ import annotations

import json
import random
from typing import Any

from kvgate.chain import PREFERRED_ENDPOINT_PARAM, RequestContext
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.extract import extract
from kvgate.filters.kvcache.filter import KVCacheFilter
from kvgate.filters.kvcache.signals import StaticSignals
from kvgate.runtime import Runtime
from tests.kvcache.kvevents_support import sim_tokenizer_dir
from tests.kvcache.mocks import dead_url
from tests.kvcache.test_filter_integration import ENDPOINTS, gateway_config, make_ctx

WORDS = "cache route prefix engine token block gateway latency alpha beta gamma delta über 東京 数据 🙂".split()


def make_filter(min_match_ratio: float, fast: bool) -> KVCacheFilter:
    cfg = KVCacheConfig.model_validate(
        {
            "enabled": True,
            "vllm_endpoint": dead_url(),
            "lmcache_endpoint": dead_url(),
            "token_cache": {"enabled": True, "max_size": 1024},
            "lookup_routing_timeout": "5s",
            "local_tokenizer": {"path": str(sim_tokenizer_dir()), "fast": fast},
            "min_match_ratio": min_match_ratio,
            "index_source": "events",
            "kv_events": {"sources": [{"instance": e, "endpoint": "tcp://127.0.0.1:1"} for e in ENDPOINTS]},
        }
    )
    return KVCacheFilter(cfg, Runtime(gateway_config()), signals=StaticSignals())  # not started: index filled below


def decision(ctx: RequestContext) -> tuple[Any, str]:
    label = dict(ctx.response_headers).get(b"x-kvgate-kvcache", b"").decode()
    parts = [p for p in label.split(";") if not p.startswith("match_ms=")]
    return ctx.params.get(PREFERRED_ENDPOINT_PARAM), ";".join(parts)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


async def test_lazy_decisions_equal_full_tokenization_decisions() -> None:
    rng = random.Random(21)
    counts: dict[str, int] = {}
    for round_ in range(6):
        flt = make_filter(rng.choice((0.0, 0.3, 0.8)), fast=round_ % 2 == 0)
        tok = flt.local_tokenizer
        assert tok is not None and flt.event_index is not None
        index = flt.event_index.index
        systems = [words(rng, rng.randrange(5, 120)) for _ in range(3)]
        histories = [
            [{"role": "system", "content": s}, {"role": "user", "content": words(rng, rng.randrange(5, 80))}]
            for s in systems
        ]
        h = iter(range(1, 10**7))
        for inst in ENDPOINTS:  # random holders of random prefixes of the known chats, at random block sizes
            for hist in rng.sample(histories, k=rng.randrange(0, 3)):
                ids = tok.encode_chat(hist)
                size = rng.choice((16, 64))
                n = rng.randrange(0, len(ids) + 1) // size * size
                if n:
                    index.apply_stored(inst, [next(h) for _ in range(n // size)], None, ids[:n], size, "GPU")
        for _ in range(40):
            kind = rng.randrange(3)
            if kind == 0:  # a new turn of a known chat
                msgs = [*rng.choice(histories), {"role": "user", "content": words(rng, rng.randrange(1, 40))}]
            elif kind == 1:  # a known system prompt, a new conversation
                msgs = [{"role": "system", "content": rng.choice(systems)}, {"role": "user", "content": words(rng, 30)}]
            else:  # never seen
                msgs = [{"role": "system", "content": words(rng, rng.randrange(5, 200))}]
                msgs.append({"role": "user", "content": words(rng, rng.randrange(1, 60))})
            body = {"model": "m", "messages": msgs}
            key = extract(json.loads(json.dumps(body)), "").key  # type: ignore[union-attr]
            if tok.segments is not None and rng.random() < 0.5:
                tok.segments.clear()
            flt.token_cache.clear()
            unheld = flt.metrics.local_tokenize.labels("unheld")._value.get()
            lazy = make_ctx(body)
            await flt.decode(lazy)  # token-cache miss: lazy tokenization
            was_unheld = flt.metrics.local_tokenize.labels("unheld")._value.get() > unheld
            if was_unheld:
                assert not flt.token_cache.contains(key)  # no partial ids cached as if complete
            full_ids = tok.encode_chat(msgs)
            if flt.token_cache.contains(key):
                assert flt.token_cache.get(key, count=False) == full_ids
            flt.route_tokens.store(key, full_ids)  # the hit path: full ids, full match
            full = make_ctx(body)
            await flt.decode(full)
            assert decision(lazy) == decision(full), (round_, msgs)
            outcome = "unheld" if was_unheld else decision(full)[1].split(";")[0]
            counts[outcome] = counts.get(outcome, 0) + 1
        await flt.close()
    assert counts.get("unheld", 0) >= 20 and counts.get("routed", 0) >= 20, counts


async def test_empty_index_decides_without_tokenizing() -> None:
    flt = make_filter(0.0, fast=True)
    ctx = make_ctx({"model": "m", "messages": [{"role": "user", "content": "word " * 400}]})
    await flt.decode(ctx)
    assert decision(ctx) == (None, "empty;source=events")
    assert flt.metrics.local_tokenize.labels("unheld")._value.get() == 1
    assert len(flt.token_cache) == 0
    await flt.close()
