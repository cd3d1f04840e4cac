"""A small, real OpenAI-shaped upstream server for gateway tests (not the simulator)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from kvgate.asgi import Receive, Request, Router, Scope, Send, send_json


@dataclass
class UpstreamState:
    name: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    release_last: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    fail_status: int | None = None
    fail_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    resp_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    delay_s: float = 0.0


def make_upstream(name: str) -> tuple[Router, UpstreamState]:
    state = UpstreamState(name)
    router = Router()

    async def health(req: Request, send: Send) -> None:
        await send_json(send, 200 if state.fail_status is None else 503, {"ok": state.fail_status is None})

    async def models(req: Request, send: Send) -> None:
        await send_json(send, 200, {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": name}]})

    async def completions(req: Request, send: Send) -> None:
        body = await req.json()
        state.calls.append(
            {
                "path": req.path,
                "query": req.query_string.decode(),
                "body": body,
                "headers": {k.decode(): v.decode() for k, v in req.headers},
            }
        )
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.fail_status is not None:
            await send_json(
                send,
                state.fail_status,
                {"error": {"message": "boom", "type": "server_error"}},
                headers=state.fail_headers,
            )
            return
        chat = req.path.endswith("chat/completions")
        if body.get("stream"):
            await stream(req, send, body, chat)
            return
        content = f"hello from {name}"
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": content, "finish_reason": "stop"}
        await send_json(
            send,
            200,
            {
                "id": "cmpl-test",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": body.get("model", "demo"),
                "choices": [choice],
                "served_by": name,
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            },
            headers=[(b"x-served-by", name.encode()), *state.resp_headers],
        )

    async def stream(req: Request, send: Send, body: dict[str, Any], chat: bool) -> None:
        async def watch() -> None:
            while True:
                msg = await req.receive()
                if msg["type"] == "http.disconnect":
                    state.disconnected.set()
                    return

        watcher = asyncio.create_task(watch())
        n = int(body.get("x_chunks", 3))
        wait_release = bool(body.get("x_wait_release", False))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"x-served-by", name.encode())],
            }
        )
        try:
            for i in range(n):
                if chat:
                    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"t{i} "}
                    chunk = {
                        "id": "chatcmpl-x",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": "demo",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                else:
                    chunk = {
                        "id": "cmpl-x",
                        "object": "text_completion",
                        "created": 1,
                        "model": "demo",
                        "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
                    }
                if i == n - 1 and wait_release:
                    # The last chunk is held back until the test says so.
                    await asyncio.wait_for(state.release_last.wait(), 30)
                if state.disconnected.is_set():
                    return
                await send(
                    {"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True}
                )
                await asyncio.sleep(float(body.get("x_gap", 0)))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()

    async def echo_path(req: Request, send: Send) -> None:
        raw = req.scope.get("raw_path") or b""
        state.calls.append({"path": req.path, "raw_path": raw.decode("latin-1"), "query": req.query_string.decode()})
        await send_json(send, 404, {"raw_path": raw.decode("latin-1"), "query": req.query_string.decode()})

    async def die_mid_stream(req: Request, send: Send) -> None:
        await req.body()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"content-length", b"100000")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        hooks = (req.scope.get("extensions") or {}).get("kvgate.hooks")
        if hooks is None:
            raise RuntimeError("upstream dies mid-stream")  # uvicorn drops the connection
        hooks.abort()  # the same, without uvicorn's ERROR record

    router.not_found = echo_path
    router.add("POST", "/v1/die", die_mid_stream)
    router.add("GET", "/health", health)
    router.add("GET", "/v1/models", models)
    router.add("POST", "/v1/completions", completions)
    router.add("POST", "/v1/chat/completions", completions)
    return router, state


def scope_app(app: Router) -> Any:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return wrapped
