"""Workload generators: determinism, promised shapes, prefix sharing and tokenizer round-trips."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import pytest

import kvgate_bench
from kvgate_bench import workloads as wl
from kvgate_bench.oracle import oracle_bound
from kvgate_sim.tokenizer import get_tokenizer

TRACE = wl.BUNDLED_TRACE_PATH  # vendored package data: always present, never read from outside the checkout


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _assert_round_trip(workload: wl.Workload) -> None:
    tok = get_tokenizer()
    for r in workload.requests:
        assert tok.encode(r.text()) == r.prompt_token_ids, r.req_id
        if r.kind == "chat":
            assert r.messages is not None and r.prompt is None
            assert tok.encode_chat(r.messages) == r.prompt_token_ids
        else:
            assert r.prompt is not None and r.messages is None
            assert tok.encode(r.prompt) == r.prompt_token_ids


# ---------------------------------------------------------------- multi-round QA


def test_multi_round_qa_shape_and_templates() -> None:
    w = wl.multi_round_qa(num_users=3, num_rounds=3, system_prompt_len=20, history_len=30, answer_len=8, qps=1.5)
    assert len(w) == 9
    assert w.closed_loop is not None and w.closed_loop.kind == "sessions"
    gap = 3 / 1.5
    assert w.closed_loop.per_user_gap_s == pytest.approx(gap)
    gbu = gap * 2 / 3
    assert w.closed_loop.gap_between_users_s == pytest.approx(gbu)
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    by_user: dict[str, list[wl.Request]] = {}
    for r in w.requests:
        by_user.setdefault(r.session_id or "", []).append(r)
    assert sorted(by_user) == ["1", "2", "3"]
    for k, uid in enumerate(["1", "2", "3"]):
        rounds = sorted(by_user[uid], key=lambda q: q.round_idx)
        assert [q.round_idx for q in rounds] == [0, 1, 2]
        for r_idx, q in enumerate(rounds):
            assert q.kind == "chat" and q.user_id == uid and q.headers == {"x-user-id": uid}
            assert q.max_tokens == 8
            assert q.arrival_s == pytest.approx(k * gbu + r_idx * gap)
            assert q.messages is not None and len(q.messages) == 2 * r_idx + 1
            assert [m["role"] for m in q.messages] == ["user", "assistant"] * r_idx + ["user"]
            assert q.messages[-1]["content"].endswith(
                f"Here's question #{r_idx + 1}: can you tell me a new long story with a happy ending?"
            )
        first = rounds[0].messages[0]["content"]  # type: ignore[index]
        hi20 = " ".join(["hi"] * 20)
        hi30 = " ".join(["hi"] * 30)
        assert first == (
            f"Hi, here's some system prompt: {hi20}.For user {uid}, here are some other context: {hi30}."
            "Here's question #1: can you tell me a new long story with a happy ending?"
        )
        # history grows and each round's tokens extend the previous round's
        lens = [q.num_prompt_tokens for q in rounds]
        assert lens == sorted(lens) and len(set(lens)) == 3
        for a, b in itertools.pairwise(rounds):
            assert b.messages[: len(a.messages)] == a.messages  # type: ignore[index]
            assert _common_prefix(a.prompt_token_ids, b.prompt_token_ids) >= a.num_prompt_tokens - 3
    _assert_round_trip(w)


def test_multi_round_qa_determinism_and_answers() -> None:
    kw = dict(num_users=2, num_rounds=3, system_prompt_len=10, history_len=10, answer_len=12, qps=1.0)
    a = wl.multi_round_qa(seed=1, **kw)
    b = wl.multi_round_qa(seed=1, **kw)
    c = wl.multi_round_qa(seed=2, **kw)
    assert a.requests == b.requests
    assert [r.prompt_token_ids for r in a.requests] != [r.prompt_token_ids for r in c.requests]
    tok = get_tokenizer()
    answer = wl.placeholder_answer(1, 0, 12, seed=1)
    assert abs(len(tok.encode(answer)) - 12) <= 1
    # users differ from round 0 on (user id in the first turn) but share the system filler
    r0 = [r for r in a.requests if r.round_idx == 0]
    assert _common_prefix(r0[0].prompt_token_ids, r0[1].prompt_token_ids) >= 10


def test_multi_round_with_history_substitutes_answers() -> None:
    w = wl.multi_round_qa(num_users=1, num_rounds=2, system_prompt_len=5, history_len=5, answer_len=4, qps=1.0)
    r1 = next(r for r in w.requests if r.round_idx == 1)
    real = [dict(r1.messages[0]), {"role": "assistant", "content": "Once upon a time."}]  # type: ignore[index]
    r1b = r1.with_history(real)
    assert r1b.messages[-1] == r1.messages[-1]  # type: ignore[index]
    assert r1b.messages[1]["content"] == "Once upon a time."  # type: ignore[index]
    assert get_tokenizer().encode_chat(r1b.messages) == r1b.prompt_token_ids  # type: ignore[arg-type]
    assert r1b.req_id == r1.req_id and r1b.prompt_token_ids != r1.prompt_token_ids


# ---------------------------------------------------------------- SGLang generated-shared-prefix


def test_shared_prefix_uniform_groups_share_prefix() -> None:
    w = wl.shared_prefix(num_groups=4, prompts_per_group=5, system_prompt_len=64, question_len=16, output_len=7)
    assert len(w) == 20
    counts = Counter(r.group for r in w.requests)
    assert counts == {0: 5, 1: 5, 2: 5, 3: 5}
    assert all(r.max_tokens == 7 and r.kind == "completion" for r in w.requests)
    # shuffled by default
    assert [r.group for r in w.requests] != sorted(r.group for r in w.requests)  # type: ignore[type-var]
    tok = get_tokenizer()
    by_group: dict[int, list[wl.Request]] = {}
    for r in w.requests:
        by_group.setdefault(r.group, []).append(r)  # type: ignore[arg-type]
    for reqs in by_group.values():
        # system + "\n\n" (+ a chance overlap into the questions)
        shared = os.path.commonprefix([r.prompt for r in reqs])  # noqa: RUF071
        assert "\n\n" in shared
        sys_len = len(tok.encode(shared))
        assert 62 <= sys_len <= 72
        for r in reqs:
            assert 64 + 16 - 4 <= r.num_prompt_tokens <= 64 + 16 + 6
            assert _common_prefix(reqs[0].prompt_token_ids, r.prompt_token_ids) >= sys_len - 3
    others = [_common_prefix(by_group[0][0].prompt_token_ids, by_group[g][0].prompt_token_ids) for g in (1, 2, 3)]
    assert max(others) <= 2
    _assert_round_trip(w)


def test_shared_prefix_determinism_arrivals_and_chat() -> None:
    kw = dict(num_groups=2, prompts_per_group=3, system_prompt_len=16, question_len=8, output_len=4)
    a = wl.shared_prefix(seed=3, **kw)
    assert a.requests == wl.shared_prefix(seed=3, **kw).requests
    assert [r.prompt for r in a.requests] != [r.prompt for r in wl.shared_prefix(seed=4, **kw).requests]
    arr = [r.arrival_s for r in a.requests]
    assert arr[0] == 0.0 and arr == sorted(arr) and arr[-1] > 0
    burst = wl.shared_prefix(request_rate=float("inf"), **kw)
    assert all(r.arrival_s == 0.0 for r in burst.requests)
    chat = wl.shared_prefix(kind="chat", send_routing_key=True, **kw)
    assert all(r.kind == "chat" and "X-SMG-Routing-Key" in r.headers for r in chat.requests)
    keys = {r.group: r.headers["X-SMG-Routing-Key"] for r in chat.requests}
    assert len(set(keys.values())) == 2
    _assert_round_trip(chat)
    ranged = wl.shared_prefix(range_ratio=0.5, seed=5, **{**kw, "output_len": 40})
    assert all(20 <= r.max_tokens <= 40 for r in ranged.requests)
    assert len({r.max_tokens for r in ranged.requests}) > 1


def test_shared_prefix_zipf_skew() -> None:
    w = wl.shared_prefix(
        num_groups=8, prompts_per_group=16, system_prompt_len=8, question_len=4, output_len=2, distribution="zipf",
        zipf_alpha=1.2, seed=0,
    )  # fmt: skip
    assert len(w) == 128
    counts = Counter(r.group for r in w.requests)
    assert counts[0] == max(counts.values())
    assert counts[0] >= 3 * counts.get(7, 0)
    assert counts[0] > 128 / 8 * 1.5
    weights = wl.zipf_weights(8, 1.2)
    assert weights[0] > weights[1] > weights[-1] and sum(weights) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wl.shared_prefix(num_groups=1, prompts_per_group=1, distribution="pareto")  # type: ignore[arg-type]


# ---------------------------------------------------------------- LMCache long-doc QA


def test_long_doc_qa_phases_and_orders() -> None:
    w = wl.long_doc_qa(document_length=50, num_documents=3, output_len=5, repeat_count=2, repeat_mode="tile",
                       pre_warmup_count=2, pre_warmup_len=10)  # fmt: skip
    assert w.closed_loop is not None and w.closed_loop.kind == "phased" and w.closed_loop.max_inflight == 2
    phases = [r.phase for r in w.requests]
    assert phases == ["pre_warmup"] * 2 + ["warmup"] * 3 + ["query"] * 6
    assert w.requests[0].messages == [{"role": "user", "content": "0xx" + " ".join(["hi"] * 10)}]
    warm = [r for r in w.requests if r.phase == "warmup"]
    assert [r.messages[0]["content"] for r in warm] == [f"{i} " + " ".join(["hi"] * 50) for i in range(3)]  # type: ignore[index]
    query = [r for r in w.requests if r.phase == "query"]
    assert [r.group for r in query] == [0, 1, 2, 0, 1, 2]
    assert all(q.prompt_token_ids == warm[q.group].prompt_token_ids for q in query)  # type: ignore[index]
    inter = wl.long_doc_qa(document_length=5, num_documents=3, repeat_mode="interleave", pre_warmup_count=0)
    assert [r.group for r in inter.requests if r.phase == "query"] == [0, 0, 1, 1, 2, 2]
    rnd = [wl.long_doc_qa(document_length=5, num_documents=6, repeat_mode="random", seed=s, pre_warmup_count=0)
           for s in (0, 0, 1)]  # fmt: skip
    orders = [[r.group for r in x.requests if r.phase == "query"] for x in rnd]
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted([0, 1, 2, 3, 4, 5] * 2)
    _assert_round_trip(w)


def test_long_doc_qa_miss_ratio_and_completions() -> None:
    w = wl.long_doc_qa(document_length=20, num_documents=4, repeat_mode="tile", hit_miss_ratio="3:1",
                       completions=True, pre_warmup_count=0)  # fmt: skip
    query = [r for r in w.requests if r.phase == "query"]
    assert all(r.kind == "completion" for r in w.requests)
    for i, r in enumerate(query):
        doc = f"{r.group} " + " ".join(["hi"] * 20)
        if i % 4 == 3:
            assert r.prompt != doc and r.prompt.endswith(" " + doc)  # type: ignore[union-attr]
        else:
            assert r.prompt == doc
    _assert_round_trip(w)
    with pytest.raises(ValueError):
        wl.long_doc_qa(repeat_mode="zigzag")  # type: ignore[arg-type]


# ---------------------------------------------------------------- Mooncake replay


RECORDS = [
    {"timestamp": 0, "input_length": 1100, "output_length": 160, "hash_ids": [0, 1, 2]},
    {"timestamp": 1000, "input_length": 1024, "output_length": 16, "hash_ids": [0, 1]},
    {"timestamp": 2500, "input_length": 600, "output_length": 1, "hash_ids": [0, 3]},
    {"timestamp": 4000, "input_length": 513, "output_length": 32, "hash_ids": [4, 5]},
]


def test_mooncake_blocks_follow_hash_ids() -> None:
    w = wl.mooncake_from_records(RECORDS, block_tokens_scale=1 / 16, time_scale=0.5, output_scale=1 / 16)
    bt = 32
    assert w.params["block_tokens"] == bt
    r0, r1, r2, r3 = w.requests
    # lengths: full blocks of 32, last block truncated proportionally (ceil, at least 1)
    assert r0.num_prompt_tokens == 2 * bt + 5  # 1100 - 1024 = 76 → ceil(76/16) = 5
    assert r1.num_prompt_tokens == 2 * bt
    assert r2.num_prompt_tokens == bt + 6  # 88 → ceil(5.5) = 6
    assert r3.num_prompt_tokens == bt + 1
    blocks = {h: wl.word_block(h, bt) for h in range(6)}
    # equal hash ids ⇒ equal blocks; different ⇒ different
    assert r0.prompt_token_ids[:bt] == r1.prompt_token_ids[:bt] == r2.prompt_token_ids[:bt] == blocks[0]
    assert r0.prompt_token_ids[bt : 2 * bt] == r1.prompt_token_ids[bt:] == blocks[1]
    assert r2.prompt_token_ids[bt:] == blocks[3][:6]
    assert r0.prompt_token_ids[2 * bt :] == blocks[2][:5]
    assert len({tuple(b) for b in blocks.values()}) == 6
    assert r3.prompt_token_ids[:bt] != r0.prompt_token_ids[:bt]
    assert [r.arrival_s for r in w.requests] == [0.0, 0.5, 1.25, 2.0]
    assert [r.max_tokens for r in w.requests] == [10, 1, 1, 2]
    assert all(r.kind == "completion" for r in w.requests)
    _assert_round_trip(w)
    # seeds change the content, never the sharing structure
    other = wl.mooncake_from_records(RECORDS, seed=7)
    assert other.requests[0].prompt_token_ids != r0.prompt_token_ids
    assert other.requests[0].prompt_token_ids[:bt] == other.requests[1].prompt_token_ids[:bt]
    again = wl.mooncake_from_records(RECORDS, block_tokens_scale=1 / 16, time_scale=0.5, output_scale=1 / 16)
    assert again.requests == w.requests
    chat = wl.mooncake_from_records(RECORDS, kind="chat")
    assert all(r.kind == "chat" for r in chat.requests)
    _assert_round_trip(chat)


def test_word_pool_round_trips() -> None:
    tok = get_tokenizer()
    ids = wl.word_block(12345, 2000)
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.encode_chat([{"role": "user", "content": tok.decode(ids)}])[-2000 - 5 : -5] == ids


def test_mooncake_trace_replay_matches_hash_reuse() -> None:
    """Token-level oracle at the replay block size equals the reuse computed from the hash ids."""
    n = 1500
    w = wl.mooncake_trace(TRACE, max_requests=n, block_tokens_scale=1 / 32, time_scale=0.01, seed=0)
    assert len(w) == n
    bt = w.params["block_tokens"]
    assert bt == 16
    records = wl.load_mooncake_trace(TRACE, n)
    seen: set[int] = set()
    expected = 0
    for rec in records:  # timestamps are sorted in the trace, so request order == record order
        hashes = rec["hash_ids"]
        last_full = rec["input_length"] - 512 * (len(hashes) - 1)
        full = hashes if -(-last_full * bt // 512) >= bt else hashes[:-1]
        run = 0
        for h in full:
            if h not in seen:
                break
            run += 1
        expected += run * bt
        seen.update(full)
    got = oracle_bound(w.requests, bt, cap_last_token=False)
    assert got.reusable_tokens == expected
    assert 0.1 < got.fraction < 0.5
    tok = get_tokenizer()
    for r in w.requests[:200]:
        assert tok.encode(r.prompt) == r.prompt_token_ids  # type: ignore[arg-type]
    assert w.requests[-1].arrival_s == pytest.approx(records[-1]["timestamp"] / 1000 * 0.01)


# ---------------------------------------------------------------- registry


def test_registry_defaults_and_overrides() -> None:
    small = {
        "multi_round_qa": {"num_users": 2, "num_rounds": 2},
        "shared_prefix": {"num_groups": 2, "prompts_per_group": 2},
        "shared_prefix_zipf": {"num_groups": 3, "prompts_per_group": 2},
        "long_doc_qa": {"num_documents": 2, "document_length": 20},
        "mooncake": {"max_requests": 5},
    }
    for name in wl.WORKLOADS:
        w = wl.get_workload(name, **small[name])
        assert w.name == name and len(w) > 0
        assert w.stats()["requests"] == len(w)
        for k, v in small[name].items():
            assert w.params[k] == v
    assert wl.get_workload("shared_prefix_zipf", num_groups=3, prompts_per_group=2).params["distribution"] == "zipf"
    with pytest.raises(KeyError):
        wl.get_workload("nope")
    with pytest.raises(TypeError):
        wl.get_workload("long_doc_qa", bogus=1)
    text = wl.describe()
    for name in wl.WORKLOADS:
        assert name in text


def test_request_body_and_chunk_hashes() -> None:
    w = wl.long_doc_qa(document_length=300, num_documents=1, repeat_count=1, pre_warmup_count=0)
    r = w.requests[0]
    body = r.body("m")
    assert body["messages"] == r.messages and body["max_tokens"] == r.max_tokens and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and r.path() == "/v1/chat/completions"
    assert len(r.chunk_hashes(256)) == r.num_prompt_tokens // 256
    c = wl.long_doc_qa(document_length=3, num_documents=1, repeat_count=1, pre_warmup_count=0, completions=True)
    assert c.requests[0].body("m", stream=False)["prompt"] == "0 hi hi hi" and c.requests[0].path() == "/v1/completions"


def test_bundled_trace_is_package_data_and_the_default() -> None:
    assert TRACE.is_file() and TRACE.suffix == ".gz"
    assert Path(kvgate_bench.__file__).parent in TRACE.parents  # inside the installed package, not beside the checkout
    if "KVGATE_TRACE" not in os.environ:
        assert wl.DEFAULT_TRACE_PATH == TRACE
    records = wl.load_mooncake_trace(TRACE)
    assert len(records) == 12031  # the whole FAST'25 conversation trace
    assert all(len(r["hash_ids"]) == -(-r["input_length"] // 512) for r in records[:200])


def test_load_plain_jsonl_trace(tmp_path: Path) -> None:
    plain = tmp_path / "t.jsonl"
    plain.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [7]}\n\n', encoding="utf-8")
    assert wl.load_mooncake_trace(plain) == [{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [7]}]
