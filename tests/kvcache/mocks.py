"""Small real loopback HTTP mocks (built on kvgate.asgi): a vLLM ``/tokenize`` and an LMCache controller."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from kvgate.asgi import Request, Router, Send, send_json, send_response
from kvgate.serving import ServerHandle, start_server


def word_tokens(text: str) -> list[int]:
    """Pixiu's mock tokenizer: token of word i = (sum of its code points mod 997) + i + 1."""
    return [(sum(map(ord, w)) % 997) + i + 1 for i, w in enumerate(text.split())]


@dataclass
class _Served:
    """A mock served on a loopback ephemeral port."""

    handle: ServerHandle | None = None

    async def _serve(self, router: Router) -> None:
        self.handle = await start_server(router, timeout_graceful_shutdown=0.5)

    @property
    def url(self) -> str:
        assert self.handle is not None
        return self.handle.url

    async def stop(self) -> None:
        if self.handle is not None:
            await self.handle.stop(1.0)


@dataclass
class MockVLLM(_Served):
    delay: float = 0.0
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] | None = None  # answer these ids instead of word_tokens (a broken engine)

    async def _tokenize(self, request: Request, send: Send) -> None:
        body = await request.json()
        self.requests.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            await send_json(send, self.status, {"error": {"message": "boom", "code": self.status}})
            return
        if "messages" in body:
            msgs = [m for m in body["messages"] if isinstance(m.get("content"), str)]
            text = " ".join(f"<{m['role']}> {m['content']}" for m in msgs)
        else:
            text = body["prompt"]
        toks = word_tokens(text) if self.tokens is None else self.tokens
        await send_json(send, 200, {"count": len(toks), "max_model_len": 8192, "tokens": toks, "token_strs": None})

    async def start(self) -> MockVLLM:
        router = Router()
        router.add("POST", "/tokenize", self._tokenize)
        await self._serve(router)
        return self


@dataclass
class MockController(_Served):
    """``layout``: instance_id → (location, matched tokens). ``array_shape`` picks the real wire form."""

    layout: dict[str, tuple[str, int]] = field(default_factory=dict)
    array_shape: bool = True
    hang: bool = False
    lookup_status: int = 200
    action_status: int = 200
    evict_route: bool = True
    lookup_raw: bytes | None = None  # answer /lookup with these exact bytes (status 200)
    lookup_delay: float = 0.0  # seconds each /lookup takes
    answer_at_in_flight: int = 0  # > 0: hold every /lookup until this many are in flight at once (a barrier)
    in_flight: int = 0
    max_in_flight: int = 0  # most /lookup requests served at once
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]

    async def _lookup(self, request: Request, send: Send) -> None:
        body = await request.json()
        self.calls.append(("/lookup", body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.answer_at_in_flight and self.in_flight >= self.answer_at_in_flight:
            self.release.set()
        try:
            if self.answer_at_in_flight:
                await self.release.wait()
            await self._lookup_answer(body, send)
        finally:
            self.in_flight -= 1

    async def _lookup_answer(self, body: dict[str, Any], send: Send) -> None:
        if self.lookup_delay:
            await asyncio.sleep(self.lookup_delay)
        if self.hang:
            await self.release.wait()
        if self.lookup_status != 200:
            await send_json(send, self.lookup_status, {"detail": "boom"})
            return
        if self.lookup_raw is not None:
            await send_response(send, 200, self.lookup_raw)
            return
        if self.array_shape:
            layout: dict[str, Any] = {k: [loc, n] for k, (loc, n) in self.layout.items()}
        else:
            layout = {k: {"0": loc, "1": n} for k, (loc, n) in self.layout.items()}
        await send_json(send, 200, {"event_id": f"Lookup-{len(self.calls)}", "layout_info": layout})

    def _action(self, name: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request, send: Send) -> None:
            body = await request.json()
            self.calls.append((f"/{name}", body))
            if self.action_status != 200:
                await send_json(send, self.action_status, {"detail": "boom"})
                return
            await send_json(send, 200, {"event_id": f"{name}-{len(self.calls)}", "num_tokens": len(body["tokens"])})

        return handler

    async def start(self) -> MockController:
        router = Router()
        router.add("POST", "/lookup", self._lookup)
        router.add("POST", "/pin", self._action("pin"))
        router.add("POST", "/compress", self._action("compress"))
        if self.evict_route:
            router.add("POST", "/evict", self._action("evict"))

        async def not_found(request: Request, send: Send) -> None:
            self.calls.append((request.path, await request.json()))
            await send_json(send, 404, {"detail": "Not Found"})

        router.not_found = not_found
        await self._serve(router)
        return self

    async def stop(self) -> None:
        self.release.set()
        await super().stop()


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
