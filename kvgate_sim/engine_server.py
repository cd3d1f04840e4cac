"""SIMULATOR: a vLLM-shaped OpenAI server around :class:`~kvgate_sim.engine_model.EngineCore` (test/bench tool).

Routes (shapes of vLLM 0.32, see shared reference ``vllm-and-workloads.md`` §1): ``POST /v1/completions``,
``POST /v1/chat/completions`` (SSE streaming or not), ``POST /tokenize``, ``POST /detokenize``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (current and deprecated vLLM names; LMCache 0.5.6
CPU-tier gauges when the tier is on),
``GET /kv_event_sources`` (the KV-events config in force per DP rank; ``{}`` when off), plus
simulator-only ``GET /sim/state`` and ``POST /reset_prefix_cache``. Every response carries
``x-kvgate-sim-instance``. A real-time driver task steps the model and sleeps each step's modelled
duration (``time_scale`` applied). Generated text is real Qwen2.5 tokens chosen deterministically from
the seed and the prompt. Prompt text is never logged.

Divergences beyond the model's: ``prompt_tokens_details.cached_tokens`` is always reported (vLLM needs
``--enable-prompt-tokens-details``); chat ``max_tokens`` defaults to ``default_chat_max_tokens`` (vLLM: the
rest of the context); batch prompts and ``n > 1`` are rejected with 400; sampling parameters are ignored.

This module is the router and the routes; the driver is ``engine_driver``, request parsing ``engine_requests``,
generated text, bodies and SSE ``engine_responses``, ``/metrics`` ``engine_metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from kvgate.asgi import (
    ClientDisconnected,
    Receive,
    Request,
    Router,
    Scope,
    Send,
    openai_error,
    send_json,
    send_response,
    send_stream,
)
from kvgate_sim.engine_driver import SimEngine
from kvgate_sim.engine_metrics import EngineMetrics
from kvgate_sim.engine_model import EngineConfig
from kvgate_sim.engine_requests import (
    SimError,
    bad,
    check_len,
    check_model,
    int_param,
    parse_prompt,
    parse_token_ids,
    read_body,
    stream_options,
)
from kvgate_sim.engine_responses import Completion, TextGenerator, token_strs
from kvgate_sim.kv_publisher import KVEventsConfig
from kvgate_sim.protocol import OpSink
from kvgate_sim.tokenizer import ChatTemplateError, get_tokenizer

# SimEngine lives in engine_driver; re-exported for ``from kvgate_sim.engine_server import SimEngine``.
__all__ = ["INSTANCE_HEADER", "EngineApp", "SimEngine", "create_engine_app"]

INSTANCE_HEADER = b"x-kvgate-sim-instance"


async def _watch_disconnect(request: Request, on_disconnect: Any) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            on_disconnect()
            return


class EngineApp:
    """The ASGI app: adds the instance header to every response, turns crashes into JSON 500s."""

    def __init__(self, engine: SimEngine, *, default_chat_max_tokens: int = 256):
        self.engine = engine
        self.model_name = engine.config.model_name
        self.max_model_len = engine.config.max_model_len
        self.default_chat_max_tokens = default_chat_max_tokens
        self.tokenizer = get_tokenizer()
        self.textgen = TextGenerator(self.tokenizer, engine.config.seed)
        self._max_token_id = self.tokenizer.vocab_size + 1024  # ordinary ranks + Qwen's special-token range
        self._instance = engine.instance_id.encode("latin-1", "replace")
        self.exporter = EngineMetrics(engine, self.model_name)
        self.registry = self.exporter.registry
        self.ttft, self.e2e = self.exporter.ttft, self.exporter.e2e
        r = self.router = Router()
        r.add("POST", "/v1/completions", self.completions)
        r.add("POST", "/v1/chat/completions", self.chat_completions)
        r.add("POST", "/tokenize", self.tokenize)
        r.add("POST", "/detokenize", self.detokenize)
        r.add("GET", "/v1/models", self.models)
        r.add("GET", "/health", self.health)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/kv_event_sources", self.kv_event_sources)
        r.add("GET", "/sim/state", self.sim_state)
        r.add("POST", "/reset_prefix_cache", self.reset_prefix_cache)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = False

        async def send_h(msg: dict[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                msg = {**msg, "headers": [*msg.get("headers", []), (INSTANCE_HEADER, self._instance)]}
            await send(msg)

        try:
            await self.router(scope, receive, send_h)
        except SimError as e:
            if not started:
                await send_json(send_h, e.status, e.body())
        except ClientDisconnected:
            return
        except Exception:
            if not started:
                await send_json(send_h, 500, openai_error("internal simulator error", "InternalServerError", 500))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.engine.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- generation
    async def _generate(
        self, request: Request, send: Send, body: dict[str, Any], prompt_ids: list[int], max_tokens: int, chat: bool
    ) -> None:
        if body.get("n") not in (None, 1):
            raise bad("n > 1 is not supported by the simulator", "n")
        stream = bool(body.get("stream", False))
        include_usage, continuous = stream_options(body)
        check_len(len(prompt_ids), max_tokens, self.max_model_len)
        req_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        out_ids = self.textgen.generate(prompt_ids, max_tokens)
        pieces = [self.textgen.text[t] for t in out_ids]
        created = int(time.time())
        t_start = time.monotonic()
        try:
            rec, q = self.engine.submit(req_id, prompt_ids, max_tokens)
        except ValueError as e:
            raise bad(str(e)) from None
        except RuntimeError as e:
            raise SimError(503, str(e), "ServiceUnavailableError") from None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, lambda: self.engine.abort(req_id)))
        completion = Completion(req_id, self.model_name, created, chat, len(prompt_ids), pieces, rec)

        async def tokens() -> AsyncIterator[int]:
            """Yields the number of tokens produced so far; ends on finish; raises on abort."""
            n = 0
            while True:
                kind, _ = await q.get()
                if kind == "token":
                    if n == 0:
                        self.ttft.observe(time.monotonic() - t_start)
                    n += 1
                    yield n
                elif kind == "finished":
                    self.e2e.observe(time.monotonic() - t_start)
                    return
                else:
                    raise ClientDisconnected()

        if not stream:
            try:
                n_out = 0
                async for n_out in tokens():  # noqa: B007
                    pass
            finally:
                watcher.cancel()
            await send_json(send, 200, completion.body(n_out))
            return

        def close() -> None:
            watcher.cancel()
            self.engine.abort(req_id)  # no-op once finished

        await send_stream(send, 200, completion.events(tokens(), max_tokens, include_usage, continuous, close))

    async def completions(self, request: Request, send: Send) -> None:
        body = await read_body(request)
        check_model(body, self.model_name)
        prompt_ids = parse_prompt(body.get("prompt"), self.tokenizer, self._max_token_id)
        max_tokens = int_param(body, "max_tokens", 16)
        assert max_tokens is not None
        await self._generate(request, send, body, prompt_ids, max_tokens, chat=False)

    async def chat_completions(self, request: Request, send: Send) -> None:
        body = await read_body(request)
        check_model(body, self.model_name)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list", "messages")
        try:
            prompt_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        max_tokens = int_param(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = int_param(body, "max_tokens", self.default_chat_max_tokens)
        assert max_tokens is not None
        await self._generate(request, send, body, prompt_ids, max_tokens, chat=True)

    # -- utility routes
    async def tokenize(self, request: Request, send: Send) -> None:
        body = await read_body(request)
        check_model(body, self.model_name)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise bad("messages must be a list", "messages")
            agp = body.get("add_generation_prompt", True)
            if body.get("continue_final_message") and agp:
                raise bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            try:
                ids = self.tokenizer.encode_chat(messages, add_generation_prompt=bool(agp))
            except ChatTemplateError as e:
                raise bad(str(e), "messages") from None
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"])
        else:
            raise bad("either prompt (string) or messages (list) is required", "prompt")
        strs = token_strs(self.tokenizer, ids) if body.get("return_token_strs") else None
        await send_json(
            send, 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request, send: Send) -> None:
        body = await read_body(request)
        check_model(body, self.model_name)
        ids = parse_token_ids(body.get("tokens"), "tokens", self._max_token_id)
        try:
            text = self.tokenizer.decode(ids)
        except Exception:
            raise bad("tokens contains ids the tokenizer cannot decode", "tokens") from None
        await send_json(send, 200, {"prompt": text})

    async def models(self, request: Request, send: Send) -> None:
        await send_json(
            send,
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": self.model_name,
                        "parent": None,
                        "max_model_len": self.max_model_len,
                        "permission": [],
                    }
                ],
            },
        )

    async def health(self, request: Request, send: Send) -> None:
        await send_response(send, 200, b"", b"application/json")

    async def metrics(self, request: Request, send: Send) -> None:
        await send_response(send, 200, self.exporter.exposition(), EngineMetrics.content_type)

    async def sim_state(self, request: Request, send: Send) -> None:
        core = self.engine.core
        st = core.stats()
        state = {
            "simulator": True,
            "instance_id": self.engine.instance_id,
            "model": self.model_name,
            "profile": core.profile.name,
            "time_scale": core.config.time_scale,
            "now": core.now,
            "num_gpu_blocks": core.gpu.num_blocks,
            "block_size": core.block_size,
            "max_num_seqs": core.max_num_seqs,
            "max_num_batched_tokens": core.max_num_batched_tokens,
            "stats": dataclasses.asdict(st),
        }
        await send_response(send, 200, json.dumps(state).encode(), b"application/json")

    async def kv_event_sources(self, request: Request, send: Send) -> None:
        pub = self.engine.publisher
        await send_json(send, 200, {"0": pub.bound.to_dict()} if pub is not None else {})

    async def reset_prefix_cache(self, request: Request, send: Send) -> None:
        if not self.engine.core.reset_prefix_cache():
            raise bad("Failed to reset prefix cache: requests are running")
        await send_response(send, 200, b"", b"application/json")


def create_engine_app(
    config: EngineConfig | None = None,
    *,
    sink: OpSink | None = None,
    default_chat_max_tokens: int = 256,
    kv_events: KVEventsConfig | None = None,
) -> tuple[EngineApp, SimEngine]:
    """Build one simulated engine and its vLLM-shaped ASGI app (serve it with ``kvgate.serving.start_server``).

    ``kv_events`` publishes vLLM KV-cache events (call from a running event loop)."""
    engine = SimEngine(config or EngineConfig(), sink=sink, kv_events=kv_events)
    return EngineApp(engine, default_chat_max_tokens=default_chat_max_tokens), engine
