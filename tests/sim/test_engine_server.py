"""Tests for the simulated vLLM HTTP server (kvgate_sim.engine_server, a simulator), over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from kvgate.serving import ServerHandle, start_server
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.engine_server import EngineApp, SimEngine, create_engine_app
from kvgate_sim.protocol import KVOp, lmcache_chunk_hashes

MODEL = "qwen2.5-7b-instruct"
HEADER = "x-kvgate-sim-instance"


class Sim:
    def __init__(
        self,
        app: EngineApp,
        engine: SimEngine,
        handle: ServerHandle,
        session: aiohttp.ClientSession,
        ops: list[tuple[str, int, str, list[KVOp]]],
    ):
        self.app, self.engine, self.handle, self.session, self.ops = app, engine, handle, session, ops

    def url(self, path: str) -> str:
        return self.handle.url + path

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
        async with self.session.post(self.url(path), json=body) as r:
            return r.status, await r.json(content_type=None), r.headers

    async def get_text(self, path: str) -> str:
        async with self.session.get(self.url(path)) as r:
            assert r.status == 200 and r.headers[HEADER] == self.engine.instance_id
            return await r.text()


async def _start(time_scale: float) -> Sim:
    ops: list[tuple[str, int, str, list[KVOp]]] = []
    cfg = EngineConfig(instance_id="simA", time_scale=time_scale, num_gpu_blocks=4000, lmcache_capacity_chunks=64)
    app, engine = create_engine_app(cfg, sink=lambda i, w, loc, batch: ops.append((i, w, loc, batch)))
    handle = await start_server(app)
    return Sim(app, engine, handle, aiohttp.ClientSession(), ops)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Sim]:
    s = await _start(0.01)
    try:
        yield s
    finally:
        await s.session.close()
        await s.handle.stop()


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    parts = text.split("\n\n")
    assert parts[-1] == ""
    events = parts[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def metric(text: str, name: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{engine="0",model_name="{MODEL}"\}} (\S+)$', text, re.M)
    assert m, f"{name} missing"
    return float(m.group(1))


async def test_completion_non_stream_and_determinism(sim: Sim) -> None:
    status, body, headers = await sim.post(
        "/v1/completions", {"model": MODEL, "prompt": "Hello world", "max_tokens": 5, "ignore_eos": True}
    )
    assert status == 200 and headers[HEADER] == "simA"
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", body["id"]) and body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["text"].strip()
    assert body["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 7,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    _, again, _ = await sim.post("/v1/completions", {"prompt": "Hello world", "max_tokens": 5})
    assert again["choices"][0]["text"] == choice["text"] and again["id"] != body["id"]
    _, default, _ = await sim.post("/v1/completions", {"prompt": [9707, 1879]})
    assert default["usage"]["completion_tokens"] == 16  # vLLM's default max_tokens for completions


async def test_cached_tokens_on_repeat_and_lmcache_ops(sim: Sim) -> None:
    prompt = " ".join(["hi"] * 600)
    _, tok, _ = await sim.post("/tokenize", {"prompt": prompt})
    n = tok["count"]
    assert n >= 512
    _, first, _ = await sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, second, _ = await sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    admitted = [op.key for _i, _w, _l, batch in sim.ops for op in batch if op.op_type == "admit"]
    assert admitted == lmcache_chunk_hashes(tok["tokens"])
    assert {(i, w, loc) for i, w, loc, _ in sim.ops} == {("simA", 0, "LocalCPUBackend")}
    async with sim.session.get(sim.url("/sim/state")) as r:
        state = await r.json()
    assert state["instance_id"] == "simA" and state["simulator"] is True
    assert state["stats"]["prefix_cache_hits"] == (n - 1) // 16 * 16
    assert state["stats"]["lmcache_chunks"] == n // 256 and state["stats"]["num_running"] == 0


async def test_chat_stream_shape(sim: Sim) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with sim.session.post(sim.url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200 and r.headers[HEADER] == "simA"
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert len(events) == 1 + 4 + 1
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and re.fullmatch(r"chatcmpl-[0-9a-f]{16}", ids.pop())
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in events)
    assert events[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    content = events[1:5]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, None, "length"]
    assert content[-1]["choices"][0]["stop_reason"] is None
    assert all(c["choices"][0]["delta"]["content"] for c in content)
    usage = events[5]
    assert usage["choices"] == []
    _, tok, _ = await sim.post("/tokenize", {"messages": body["messages"]})
    assert usage["usage"]["completion_tokens"] == 4 and usage["usage"]["prompt_tokens"] == tok["count"] == 12
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the non-streamed answer to the same prompt is the same text
    body.update(stream=False, stream_options=None)
    status, full, _ = await sim.post("/v1/chat/completions", body)
    assert status == 200 and full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["content"] == "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert full["choices"][0]["message"]["role"] == "assistant"


async def test_completion_stream_without_usage(sim: Sim) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 3, "stream": True}
    async with sim.session.post(sim.url("/v1/completions"), json=body) as r:
        events = [json.loads(e) for e in sse_events(await r.read())[:-1]]
    assert len(events) == 3 and all("usage" not in e for e in events)
    assert all(e["object"] == "text_completion" and re.fullmatch(r"cmpl-[0-9a-f]{16}", e["id"]) for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    async with sim.session.post(sim.url("/v1/completions"), json=body) as r:
        events = [json.loads(e) for e in sse_events(await r.read())[:-1]]
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_tokenize_both_forms(sim: Sim) -> None:
    status, body, headers = await sim.post("/tokenize", {"model": MODEL, "prompt": "Hello world"})
    assert status == 200 and headers[HEADER] == "simA"
    assert body == {"count": 2, "max_model_len": 32768, "tokens": [9707, 1879], "token_strs": None}
    _, body, _ = await sim.post("/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert body["token_strs"] == ["Hello", "Ġworld"]
    msgs = [{"role": "user", "content": "Hello world"}]
    _, chat, _ = await sim.post("/tokenize", {"messages": msgs})
    assert chat["tokens"] == [151644, 872, 198, 9707, 1879, 151645, 198, 151644, 77091, 198]
    assert chat["count"] == 10 and chat["token_strs"] is None
    _, no_gen, _ = await sim.post("/tokenize", {"messages": msgs, "add_generation_prompt": False})
    assert no_gen["tokens"] == chat["tokens"][:7]
    _, de, _ = await sim.post("/detokenize", {"model": MODEL, "tokens": [9707, 1879]})
    assert de == {"prompt": "Hello world"}


async def test_metrics_names_present_and_moving(sim: Sim) -> None:
    before = await sim.get_text("/metrics")
    for name in (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:external_prefix_cache_queries_total",
        "vllm:external_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert metric(before, name) == 0.0
    prompt = [9707] * 40
    for _ in range(2):
        await sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    after = await sim.get_text("/metrics")
    assert metric(after, "vllm:prefix_cache_queries_total") == 80
    assert metric(after, "vllm:prefix_cache_hits_total") == 32
    assert metric(after, "vllm:gpu_prefix_cache_hits_total") == 32
    assert metric(after, "vllm:prompt_tokens_total") == 80
    assert metric(after, "vllm:generation_tokens_total") == 4
    assert metric(after, "vllm:time_to_first_token_seconds_count") == 2
    assert metric(after, "vllm:num_requests_running") == 0
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in after


async def test_error_bodies(sim: Sim) -> None:
    status, body, headers = await sim.post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and headers[HEADER] == "simA"
    assert body == {
        "error": {
            "message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    async with sim.session.post(sim.url("/v1/chat/completions"), data=b"{not json") as r:
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["type"] == "BadRequestError" and err["code"] == 400
    bad_bodies = [
        ("/v1/chat/completions", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 40_000}),
        ("/v1/completions", {"prompt": [1, -5]}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
        ("/tokenize", {}),
        ("/detokenize", {"tokens": "abc"}),
        ("/v1/completions", [1, 2]),
    ]
    for path, bad in bad_bodies:
        status, body, headers = await sim.post(path, bad)
        assert status == 400, (path, bad)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == 400
        assert headers[HEADER] == "simA"
    async with sim.session.get(sim.url("/nope")) as r:
        assert r.status == 404 and r.headers[HEADER] == "simA"
    async with sim.session.get(sim.url("/v1/completions")) as r:
        assert r.status == 405 and r.headers[HEADER] == "simA"
    async with sim.session.get(sim.url("/health")) as r:
        assert r.status == 200 and r.headers[HEADER] == "simA"
    async with sim.session.get(sim.url("/v1/models")) as r:
        assert (await r.json())["data"][0]["id"] == MODEL
    assert sim.engine.core.num_running == 0 and sim.engine.core.num_waiting == 0


async def test_client_disconnect_aborts_request() -> None:
    s = await _start(1.0)  # real H100 timing: 2,000 tokens take ~13 s, so the request is surely running
    try:
        body = {"prompt": "Count to a million", "max_tokens": 2000, "stream": True}
        resp = await s.session.post(s.url("/v1/completions"), json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        assert s.engine.core.num_running == 1
        resp.close()  # drop the connection mid-stream
        for _ in range(200):
            if s.engine.core.num_running == 0:
                break
            await asyncio.sleep(0.01)
        st = s.engine.core.stats()
        assert st.num_running == 0 and st.num_requests_aborted == 1 and st.kv_cache_usage_perc == 0.0
        assert st.generation_tokens < 2000
    finally:
        await s.session.close()
        await s.handle.stop()


async def test_lone_surrogates_get_a_client_error_not_a_500(sim: Sim) -> None:
    """A lone surrogate is valid JSON (``"\\ud800"``) but not encodable UTF-8: the engine must still answer 4xx."""
    raw = b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}'
    async with sim.session.post(sim.url("/v1/completions"), data=raw) as r:
        assert r.status == 404 and r.headers[HEADER] == "simA"
        err = (await r.json())["error"]
    assert err["type"] == "NotFoundError" and err["param"] == "model" and err["code"] == 404
    assert "\\ud800" in err["message"]  # the bad name shown escaped
    async with sim.session.post(
        sim.url("/v1/chat/completions"), data=b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}'
    ) as r:
        assert r.status == 404 and (await r.json())["error"]["param"] == "model"
    for path, body in [  # surrogates elsewhere: never a server error, always a JSON body
        ("/v1/completions", b'{"prompt": "a \\udc80 b", "max_tokens": 2}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "\\ud800"}'),
    ]:
        async with sim.session.post(sim.url(path), data=body) as r:
            assert r.status < 500, (path, body, r.status)
            assert isinstance(await r.json(), dict)
    status, _, _ = await sim.post("/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    assert status == 200
