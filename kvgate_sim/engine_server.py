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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import secrets
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvgate.asgi import (
    ClientDisconnected,
    Receive,
    Request,
    Router,
    Scope,
    Send,
    json_bytes,
    openai_error,
    send_json,
    send_response,
    send_stream,
)
from kvgate_sim.engine_model import EngineConfig, EngineCore, RequestRecord
from kvgate_sim.kv_publisher import KVEventPublisher, KVEventsConfig
from kvgate_sim.protocol import OpSink
from kvgate_sim.tokenizer import ChatTemplateError, Tokenizer, get_tokenizer

INSTANCE_HEADER = b"x-kvgate-sim-instance"
SYSTEM_FINGERPRINT = "kvgate-sim"
MAX_BODY = 64 * 1024 * 1024
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

_FILLER = (
    "The quiet harbor town woke slowly as fishing boats drifted back with the morning tide. Children ran along "
    "the stone walls while bakers opened their doors and the smell of fresh bread filled every narrow street. "
    "An old keeper climbed the lighthouse stairs, counting each step, and watched gulls circle above the water. "
    "Later the market square grew busy with travelers, musicians and merchants selling apples, wool and maps. "
    "By evening lanterns glowed in windows, stories were shared by the fire, and everyone agreed the long "
    "summer had been kind to the village, its gardens, its gentle river and its happy people."
)


class SimError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        # Client text quoted in a message may hold lone surrogates (valid JSON, not encodable UTF-8): escape them
        # so the error body can always be sent.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return openai_error(self.message, self.type, self.status, self.param)


def _bad(message: str, param: str | None = None) -> SimError:
    return SimError(400, message, "BadRequestError", param)


# --------------------------------------------------------------------------------------------- text


class TextGenerator:
    """Deterministic output tokens: real Qwen2.5 word tokens picked by ``Random(seed, prompt digest)``."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        self.tok = tokenizer
        self.seed = seed
        pool = sorted({t for t in tokenizer.encode(_FILLER) if tokenizer.decode([t]).strip().isalpha()})
        self.pool = pool
        self.text = {t: tokenizer.decode([t]) for t in pool}

    def generate(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        digest = hashlib.blake2b(array("q", prompt_ids).tobytes(), digest_size=16).hexdigest()
        rng = random.Random(f"{self.seed}:{digest}")
        return [rng.choice(self.pool) for _ in range(n)]


def token_strs(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """vLLM's ``token_strs``: each id's vocabulary spelling (byte-level BPE, e.g. ``Ġworld``)."""
    out: list[str] = []
    for i in ids:
        s = tok.token_spelling(i)
        out.append(s if s is not None else tok.decode([i]))
    return out


# --------------------------------------------------------------------------------------------- driver


class SimEngine:
    """Real-time driver: one asyncio task steps the model and delivers tokens to per-request queues."""

    def __init__(
        self, config: EngineConfig, *, sink: OpSink | None = None, kv_events: KVEventsConfig | None = None
    ) -> None:
        """``kv_events`` (vLLM's ``--kv-events-config``): publish KV-cache events on ZMQ; needs a running loop."""
        self.publisher: KVEventPublisher | None = None
        if kv_events is not None and kv_events.active:
            self.publisher = KVEventPublisher(kv_events)
            self.publisher.start()
            config = dataclasses.replace(config, kv_events=True)
        self.config = config
        self._t0 = time.monotonic()
        event_sink = self.publisher.publish if self.publisher is not None else None
        # also the LMCache WorkerControl
        self.core = EngineCore(config, sink=sink, clock=self.clock, kv_event_sink=event_sink)
        self._queues: dict[str, asyncio.Queue[tuple[str, RequestRecord | None]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def submit(
        self, req_id: str, prompt_ids: Sequence[int], max_tokens: int
    ) -> tuple[RequestRecord, asyncio.Queue[tuple[str, RequestRecord | None]]]:
        """Queue a request; raises ValueError when it cannot fit. Items: ("token"|"finished"|"aborted", rec)."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        rec = self.core.submit(req_id, prompt_ids, max_tokens)
        q: asyncio.Queue[tuple[str, RequestRecord | None]] = asyncio.Queue()
        self._queues[req_id] = q
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-engine:{self.instance_id}")
        assert self._wake is not None
        self._wake.set()
        return rec, q

    def abort(self, req_id: str) -> bool:
        q = self._queues.pop(req_id, None)
        if q is not None:
            q.put_nowait(("aborted", None))
        return self.core.abort(req_id)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        core = self.core
        try:
            await self._loop(wake, core)
        except Exception:
            for rid in list(self._queues):  # never leave clients hanging if the model breaks
                self.abort(rid)
            raise

    async def _loop(self, wake: asyncio.Event, core: EngineCore) -> None:
        while True:
            wake.clear()
            res = core.step(collect_tokens=True)
            if res is None:
                await wake.wait()
                continue
            delay = res.end - self.clock()
            await asyncio.sleep(delay if delay > 0 else 0)
            queues = self._queues
            for rid in res.emitted:
                q = queues.get(rid)
                if q is not None:
                    q.put_nowait(("token", None))
            for ev in res.events:
                if ev.kind == "finished":
                    q = queues.pop(ev.req_id, None)
                    if q is not None:
                        q.put_nowait(("finished", ev.record))

    async def aclose(self) -> None:
        self._closed = True
        for rid in list(self._queues):
            self.abort(rid)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.publisher is not None:
            await self.publisher.aclose()


# --------------------------------------------------------------------------------------------- metrics


class _EngineCollector:
    """Reads the model's counters at scrape time (new vLLM names and the deprecated pre-0.10 ones)."""

    def __init__(self, engine: SimEngine, model_name: str):
        self.engine = engine
        self.labels = [model_name, "0"]
        self.created = time.time()

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        m = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
        m.add_metric(self.labels, value, created=self.created)
        return m

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        m = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
        m.add_metric(self.labels, value)
        return m

    def collect(self) -> list[Metric]:
        st = self.engine.core.stats()
        rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        c, g = self._counter, self._gauge
        return [
            g("vllm:num_requests_running", "Number of requests in model execution batches.", st.num_running),
            g("vllm:num_requests_waiting", "Number of requests waiting to be processed.", st.num_waiting),
            g("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st.kv_cache_usage_perc),
            c(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                st.prefix_cache_queries,
            ),
            c(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                st.prefix_cache_hits,
            ),
            c(
                "vllm:external_prefix_cache_queries",
                "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
                "number of queried tokens.",
                st.external_prefix_cache_queries,
            ),
            c(
                "vllm:external_prefix_cache_hits",
                "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
                "number of cached tokens.",
                st.external_prefix_cache_hits,
            ),
            c("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens),
            c(
                "vllm:prompt_tokens_cached",
                "Number of cached prompt tokens (local + external).",
                st.prompt_tokens_cached,
            ),
            c("vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens),
            c("vllm:num_preemptions", "Cumulative number of preemption from the engine.", st.num_preemptions),
            # deprecated names (vLLM < 0.10), still scraped by production-stack's router
            g(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage (deprecated name).",
                st.kv_cache_usage_perc,
            ),
            c(
                "vllm:gpu_prefix_cache_queries",
                "GPU prefix cache queries, in terms of number of queried tokens (deprecated name).",
                st.prefix_cache_queries,
            ),
            c(
                "vllm:gpu_prefix_cache_hits",
                "GPU prefix cache hits, in terms of number of cached tokens (deprecated name).",
                st.prefix_cache_hits,
            ),
            g("vllm:gpu_prefix_cache_hit_rate", "GPU prefix cache block hit rate (V0 name).", rate),
            *self._lmcache(),
        ]

    def _lmcache(self) -> list[Metric]:
        """LMCache 0.5.6's CPU-tier gauges (names and labels of ``lmcache/observability.py``), when enabled.

        Real vLLM shows them on its ``/metrics`` only in Prometheus multiprocess mode; the simulator always
        does. ``lmcache:local_cache_usage`` is bytes (LMCache exports no capacity)."""
        tier = self.engine.core.tier
        if tier is None:
            return []
        names = ["model_name", "worker_id", "role", "served_model_name"]
        values = [self.labels[0], str(tier.worker_id), "worker", self.labels[0]]
        pinned = sum(1 for k in tier.keys() if tier.is_pinned(k))
        out: list[Metric] = []
        for name, doc, value in (
            ("lmcache:local_cache_usage", "Local cache usage (bytes) of lmcache", tier.used_bytes),
            ("lmcache:pinned_memory_objs_count", "The number of pinned memory objects", pinned),
            ("lmcache:active_memory_objs_count", "The number of active memory objects", len(tier)),
        ):
            m = GaugeMetricFamily(name, doc, labels=names)
            m.add_metric(values, value)
            out.append(m)
        ev = CounterMetricFamily(
            "lmcache:local_cpu_evict_count", "Total number of evict in local cpu backend", labels=names
        )
        ev.add_metric(values, tier.evictions, created=self.created)
        out.append(ev)
        return out


# --------------------------------------------------------------------------------------------- helpers


def _sse(obj: Any) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


def _int_param(body: dict[str, Any], name: str, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer", name)
    if v < 1:
        raise _bad(f"{name} must be at least 1, got {v}.", name)
    return int(v)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options")
    if not body.get("stream"):
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    return bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


async def _watch_disconnect(request: Request, on_disconnect: Any) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            on_disconnect()
            return


# --------------------------------------------------------------------------------------------- app


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
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, self.model_name))
        labels = ["model_name", "engine"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        ).labels(self.model_name, "0")
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            registry=self.registry,
            buckets=E2E_BUCKETS,
        ).labels(self.model_name, "0")
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

    # -- request parsing
    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json(limit=MAX_BODY)
        except ValueError as e:
            raise _bad(f"Invalid JSON body: {e}") from None
        except ClientDisconnected:
            raise
        except Exception as e:  # BodyTooLarge
            raise _bad(str(e)) from None
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise SimError(
                404, f"The model `{model}` does not exist. Valid aliases: {self.model_name}.", "NotFoundError", "model"
            )

    def _token_ids(self, v: Any, param: str) -> list[int]:
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise _bad(f"{param} must be a list of token ids", param)
        if any(t < 0 or t >= self._max_token_id for t in v):
            raise _bad(f"{param} contains out-of-vocabulary token ids", param)
        return v

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = self._token_ids(prompt, "prompt")
        else:
            raise _bad(
                "prompt must be a string or a list of token ids (batches are not supported by the simulator)", "prompt"
            )
        if not ids:
            raise _bad("The prompt cannot be empty.", "prompt")
        return ids

    def _check_len(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt >= self.max_model_len:
            raise _bad(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {n_prompt} input tokens. Please reduce the length of the input messages.",
                "messages",
            )
        if n_prompt + max_tokens > self.max_model_len:
            raise _bad(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {self.max_model_len} tokens and your request has {n_prompt} input "
                f"tokens ({max_tokens} > {self.max_model_len} - {n_prompt}).",
                "max_tokens",
            )

    # -- generation
    async def _generate(
        self, request: Request, send: Send, body: dict[str, Any], prompt_ids: list[int], max_tokens: int, chat: bool
    ) -> None:
        if body.get("n") not in (None, 1):
            raise _bad("n > 1 is not supported by the simulator", "n")
        stream = bool(body.get("stream", False))
        include_usage, continuous = _stream_options(body)
        self._check_len(len(prompt_ids), max_tokens)
        req_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        out_ids = self.textgen.generate(prompt_ids, max_tokens)
        pieces = [self.textgen.text[t] for t in out_ids]
        created = int(time.time())
        t_start = time.monotonic()
        try:
            rec, q = self.engine.submit(req_id, prompt_ids, max_tokens)
        except ValueError as e:
            raise _bad(str(e)) from None
        except RuntimeError as e:
            raise SimError(503, str(e), "ServiceUnavailableError") from None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, lambda: self.engine.abort(req_id)))

        def usage(n_out: int) -> dict[str, Any]:
            details: dict[str, Any] = {"cached_tokens": rec.cached_tokens}
            if chat:
                details["created_cache_tokens"] = 0
            n_p = len(prompt_ids)
            return {
                "prompt_tokens": n_p,
                "total_tokens": n_p + n_out,
                "completion_tokens": n_out,
                "prompt_tokens_details": details,
            }

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
            text = "".join(pieces[:n_out])
            if chat:
                resp: dict[str, Any] = {
                    "id": req_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": text,
                                "refusal": None,
                                "annotations": None,
                                "audio": None,
                                "function_call": None,
                                "tool_calls": [],
                                "reasoning": None,
                            },
                            "logprobs": None,
                            "finish_reason": "length",
                            "stop_reason": None,
                            "token_ids": None,
                        }
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": usage(n_out),
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "kv_transfer_params": None,
                }
            else:
                resp = {
                    "id": req_id,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [
                        {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": "length",
                            "stop_reason": None,
                            "prompt_logprobs": None,
                            "prompt_token_ids": None,
                            "token_ids": None,
                        }
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": usage(n_out),
                    "kv_transfer_params": None,
                }
            await send_json(send, 200, resp)
            return

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": req_id,
                "object": obj,
                "created": created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }

        async def events() -> AsyncIterator[bytes]:
            n_out = 0
            try:
                async for n_out in tokens():
                    finish = "length" if n_out == max_tokens else None
                    extra: dict[str, Any] = {"usage": usage(n_out)} if continuous else {}
                    if chat:
                        if n_out == 1:
                            yield _sse(
                                chunk(
                                    [
                                        {
                                            "index": 0,
                                            "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None,
                                            "finish_reason": None,
                                        }
                                    ],
                                    prompt_token_ids=None,
                                    prompt_text=None,
                                )
                            )
                        choice: dict[str, Any] = {
                            "index": 0,
                            "delta": {"content": pieces[n_out - 1]},
                            "logprobs": None,
                            "finish_reason": finish,
                            "token_ids": None,
                        }
                    else:
                        choice = {
                            "index": 0,
                            "text": pieces[n_out - 1],
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                            "prompt_token_ids": None,
                            "token_ids": None,
                        }
                    if finish is not None:
                        choice["stop_reason"] = None
                    yield _sse(chunk([choice], **extra))
                if include_usage:
                    extra = {"usage": usage(n_out)}
                    if chat:
                        extra["system_fingerprint"] = SYSTEM_FINGERPRINT
                    yield _sse(chunk([], **extra))
                yield b"data: [DONE]\n\n"
            except ClientDisconnected:
                return
            finally:
                watcher.cancel()
                self.engine.abort(req_id)  # no-op once finished

        await send_stream(send, 200, events())

    async def completions(self, request: Request, send: Send) -> None:
        body = await self._body(request)
        self._check_model(body)
        prompt_ids = self._prompt_ids(body.get("prompt"))
        max_tokens = _int_param(body, "max_tokens", 16)
        assert max_tokens is not None
        await self._generate(request, send, body, prompt_ids, max_tokens, chat=False)

    async def chat_completions(self, request: Request, send: Send) -> None:
        body = await self._body(request)
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list", "messages")
        try:
            prompt_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise _bad(str(e), "messages") from None
        max_tokens = _int_param(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", self.default_chat_max_tokens)
        assert max_tokens is not None
        await self._generate(request, send, body, prompt_ids, max_tokens, chat=True)

    # -- utility routes
    async def tokenize(self, request: Request, send: Send) -> None:
        body = await self._body(request)
        self._check_model(body)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise _bad("messages must be a list", "messages")
            agp = body.get("add_generation_prompt", True)
            if body.get("continue_final_message") and agp:
                raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            try:
                ids = self.tokenizer.encode_chat(messages, add_generation_prompt=bool(agp))
            except ChatTemplateError as e:
                raise _bad(str(e), "messages") from None
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"])
        else:
            raise _bad("either prompt (string) or messages (list) is required", "prompt")
        strs = token_strs(self.tokenizer, ids) if body.get("return_token_strs") else None
        await send_json(
            send, 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request, send: Send) -> None:
        body = await self._body(request)
        self._check_model(body)
        ids = self._token_ids(body.get("tokens"), "tokens")
        try:
            text = self.tokenizer.decode(ids)
        except Exception:
            raise _bad("tokens contains ids the tokenizer cannot decode", "tokens") from None
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
        await send_response(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

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
            raise _bad("Failed to reset prefix cache: requests are running")
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
