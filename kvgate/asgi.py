"""A minimal ASGI toolkit: request reading, JSON / streaming responses and a method+path router.

Small on purpose: the gateway's hot path and the simulator's servers need nothing more, and every
byte of overhead here is added latency for clients.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from kvgate.jsonload import loads

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class ClientDisconnected(Exception):
    """The client went away while the request body was being read."""


class Request:
    __slots__ = ("_body", "_json", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive):
        self.scope = scope
        self.receive = receive
        self._body: bytes | None = None
        self._json: Any = None

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @property
    def query_string(self) -> bytes:
        return bytes(self.scope.get("query_string", b""))

    @property
    def headers(self) -> Headers:
        return list(self.scope.get("headers", []))

    def header(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.scope.get("headers", []):
            if k == key:
                return str(v.decode("latin-1"))
        return default

    async def body(self, limit: int | None = None) -> bytes:
        if self._body is None:
            self._body = await read_body(self.scope, self.receive, limit)
        return self._body

    async def json(self, limit: int | None = None) -> Any:
        """Parse the body as JSON; raises ``ValueError`` on malformed input."""
        if self._json is None:
            raw = await self.body(limit)
            self._json = loads(raw) if raw else None
        return self._json


async def read_body(scope: Scope, receive: Receive, limit: int | None = None) -> bytes:
    """The request body; :class:`BodyTooLarge` over ``limit`` bytes (a declared larger length is refused before
    any byte is read), :class:`ClientDisconnected` if the client goes away first."""
    if limit is not None:
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                if v.isdigit() and int(v) > limit:
                    raise BodyTooLarge(limit)
                break
    msg = await receive()
    if msg["type"] == "http.disconnect":
        raise ClientDisconnected()
    body: bytes = msg.get("body", b"")
    if limit is not None and len(body) > limit:
        raise BodyTooLarge(limit)
    if not msg.get("more_body", False):  # the common case: the whole body in one message
        return body
    chunks = [body]
    size = len(body)
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    hdrs: Headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    hdrs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send_response(send, status, json_bytes(obj), b"application/json", headers)


def openai_error(message: str, type_: str, code: int | str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def send_stream(
    send: Send,
    status: int,
    chunks: AsyncIterator[bytes],
    content_type: bytes = b"text/event-stream",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    hdrs: Headers = [(b"content-type", content_type), (b"cache-control", b"no-cache")]
    hdrs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    async for chunk in chunks:
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


Handler = Callable[[Request, Send], Awaitable[None]]


class Router:
    """Exact-path routing by method. Unknown path → 404, wrong method → 405, both JSON."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self.not_found: Handler = self._default_not_found

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method.upper()] = handler

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add(method, path, fn)
            return fn

        return deco

    @staticmethod
    async def _default_not_found(request: Request, send: Send) -> None:
        await send_json(send, 404, {"detail": "Not Found"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan_noop(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        methods = self._routes.get(scope["path"])
        if methods is None:
            await self.not_found(request, send)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await send_json(send, 405, {"detail": "Method Not Allowed"})
            return
        await handler(request, send)


async def lifespan_noop(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
