"""HTTP clients: LMCache controller (``/lookup`` ``/pin`` ``/compress`` ``/evict``) and vLLM ``/tokenize``.

One attempt per method call: retries and breakers live in :mod:`kvgate.resilience` and are applied by the
filter. Every call is ``POST`` JSON with a total timeout derived from the caller's deadline. The controller calls'
bodies (token ids and plain strings) are encoded by msgspec: ``json.dumps`` of a 4 k-token lookup cost ~300 µs, a
fifth of a routed request's CPU time (the same JSON text but for non-ASCII characters, sent as UTF-8 rather than
``\\u`` escapes); a ``/tokenize`` body (the client's own JSON values) keeps the standard library's encoding.
``layout_info`` values are accepted in both shapes: the real controller's ``[location, end]`` array
and Pixiu's mock ``{"0": location, "1": end}`` object.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from kvgate.filters.kvcache.errors import CallTimeout, DecodeError, NotSupportedError, StatusError, TransportError
from kvgate.filters.kvcache.pool import HostSlots
from kvgate.jsonload import dumps
from kvgate.payload import request_body
from kvgate.redact import redact_url, redact_userinfo
from kvgate.token_ids import MAX_TOKEN_ID

SessionFactory = Callable[[], aiohttp.ClientSession]
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class InstanceMatch:
    location: str
    matched_tokens: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    event_id: str
    layout: dict[str, InstanceMatch] = field(default_factory=dict)

    @property
    def matches(self) -> dict[str, int]:
        return {k: v.matched_tokens for k, v in self.layout.items()}

    def best(self) -> tuple[str, InstanceMatch] | None:
        """The entry with the largest match (ties: first in controller order)."""
        best: tuple[str, InstanceMatch] | None = None
        for iid, m in self.layout.items():
            if best is None or m.matched_tokens > best[1].matched_tokens:
                best = (iid, m)
        return best


@dataclass(frozen=True, slots=True)
class ActionResult:
    event_id: str
    num_tokens: int


def parse_layout_value(value: Any) -> InstanceMatch:
    """``["LocalCPUBackend", 768]`` or ``{"0": "LocalCPUBackend", "1": 768}`` → :class:`InstanceMatch`."""
    if isinstance(value, list | tuple) and len(value) >= 2:
        loc, end = value[0], value[1]
    elif isinstance(value, dict) and "1" in value:
        loc, end = value.get("0", ""), value["1"]
    else:
        raise DecodeError(f"[kvcache] decode lookup response: unexpected layout_info value {value!r:.80}")
    if isinstance(end, bool) or not isinstance(end, int | float) or not math.isfinite(end):
        raise DecodeError(f"[kvcache] decode lookup response: matched tokens is not a finite number: {end!r:.40}")
    return InstanceMatch(location=str(loc) if loc is not None else "", matched_tokens=int(end))


def parse_lookup(data: Any) -> LookupResult:
    if not isinstance(data, dict):
        raise DecodeError("[kvcache] decode lookup response: not a JSON object")
    layout_raw = data.get("layout_info")
    if layout_raw is None:
        layout_raw = {}
    if not isinstance(layout_raw, dict):
        raise DecodeError("[kvcache] decode lookup response: layout_info is not an object")
    layout = {str(k): parse_layout_value(v) for k, v in layout_raw.items()}
    return LookupResult(event_id=str(data.get("event_id", "")), layout=layout)


def _parse_action(data: Any) -> ActionResult:
    if not isinstance(data, dict):
        raise DecodeError("[kvcache] decode controller response: not a JSON object")
    n = data.get("num_tokens", 0)
    finite = isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n)
    return ActionResult(event_id=str(data.get("event_id", "")), num_tokens=int(n) if finite else 0)


def host_key(url: str) -> str:
    """``host:port`` of ``url`` (the unit of ``max_conns_per_host``); no userinfo."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname or ''}:{port}"
    except ValueError:
        return url


def controller_body(payload: Mapping[str, Any]) -> bytes:
    """A controller call's JSON body (token ids and strings: :func:`kvgate.jsonload.dumps`)."""
    return dumps(payload)


def stdlib_body(payload: Mapping[str, Any]) -> bytes:
    """A JSON body as the standard library writes it (compact)."""
    return json.dumps(payload, separators=(",", ":")).encode()


def _reject_constant(name: str) -> Any:
    """``json.loads`` hook: ``NaN`` / ``Infinity`` / ``-Infinity`` are not JSON (RFC 8259) and are refused."""
    raise ValueError(f"non-finite number {name} is not valid JSON")


def loads_strict(body: bytes) -> Any:
    """``json.loads`` that refuses ``NaN`` / ``Infinity`` (a ``ValueError``, like any malformed JSON)."""
    return json.loads(body, parse_constant=_reject_constant)


class _JsonPoster:
    def __init__(
        self,
        session_factory: SessionFactory,
        base_url: str,
        default_timeout: float,
        on_bad_response: Callable[[str], None] | None = None,
        slots: HostSlots | None = None,
    ):
        self._session_factory = session_factory
        self._slots = slots or HostSlots(0)
        self._on_bad_response = on_bad_response
        self.base_url = base_url.strip().rstrip("/")
        self.log_url = redact_url(self.base_url)  # the only form of the URL that may appear in a log line
        self.host = host_key(self.base_url)
        self.default_timeout = default_timeout

    async def _post(self, path: str, body: bytes, what: str, deadline: float | None, parse: Callable[[Any], R]) -> R:
        """One POST of the JSON ``body``; the answer is decoded with ``parse``. Any malformed answer is a
        :class:`DecodeError`."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.default_timeout
        if deadline - loop.time() <= 0:
            raise CallTimeout(f"[kvcache] {what}: deadline exceeded")
        async with self._slots.slot(self.host, deadline):  # PoolTimeout: waited for a slot, nothing sent
            timeout = deadline - loop.time()  # what the pool wait left of the deadline
            if timeout <= 0:
                raise CallTimeout(f"[kvcache] {what}: deadline exceeded")
            try:
                async with self._session_factory().post(
                    self.base_url + path,
                    data=request_body(body),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    body = await resp.read()
                    status = resp.status
            except TimeoutError as exc:
                raise CallTimeout(f"[kvcache] call {what}: timed out after {timeout:.3f}s") from exc
            except (aiohttp.ClientError, OSError) as exc:
                detail = redact_userinfo(str(exc)).replace(self.base_url, self.log_url)
                raise TransportError(f"[kvcache] call {what}: {type(exc).__name__}: {detail}") from exc
        text = body.decode("utf-8", "replace")
        if status in (404, 405):
            raise NotSupportedError(what, status, text)
        if not 200 <= status < 300:
            raise StatusError(what, status, text)
        try:
            return parse(loads_strict(body))
        except DecodeError:
            self._bad_response(what)
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # ValueError includes malformed JSON, NaN/Infinity and int(float('nan')); OverflowError: int(1e999).
            self._bad_response(what)
            raise DecodeError(f"[kvcache] decode {what} response: {type(exc).__name__}: {exc}") from None

    def _bad_response(self, what: str) -> None:
        if self._on_bad_response is not None:
            self._on_bad_response(what)


class LMCacheClient(_JsonPoster):
    """The LMCache controller HTTP API (single attempts)."""

    async def lookup(self, tokens: Sequence[int], *, deadline: float | None = None) -> LookupResult:
        ids = tokens if isinstance(tokens, list) else list(tokens)  # (the token cache hands out a fresh list)
        return await self._post("/lookup", controller_body({"tokens": ids}), "lookup", deadline, parse_lookup)

    async def pin(
        self, tokens: Sequence[int], instance_id: str, location: str, *, deadline: float | None = None
    ) -> ActionResult:
        payload = {"tokens": list(tokens), "instance_id": instance_id, "location": location}
        return await self._post("/pin", controller_body(payload), "pin", deadline, _parse_action)

    async def compress(
        self, tokens: Sequence[int], instance_id: str, location: str, method: str, *, deadline: float | None = None
    ) -> ActionResult:
        payload = {"tokens": list(tokens), "instance_id": instance_id, "location": location, "method": method}
        return await self._post("/compress", controller_body(payload), "compress", deadline, _parse_action)

    async def evict(self, tokens: Sequence[int], instance_id: str, *, deadline: float | None = None) -> ActionResult:
        payload = {"tokens": list(tokens), "instance_id": instance_id}
        return await self._post("/evict", controller_body(payload), "evict", deadline, _parse_action)


class TokenizerClient(_JsonPoster):
    """vLLM ``POST {vllm_endpoint}/tokenize``; only ``tokens`` of the response is used."""

    async def tokenize(self, request: Mapping[str, Any], *, deadline: float | None = None) -> list[int]:
        return await self._post("/tokenize", stdlib_body(request), "tokenize", deadline, parse_tokens)


def parse_tokens(data: Any) -> list[int]:
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise DecodeError("[kvcache] decode tokenize response: 'tokens' is not a list of integers")
    if tokens and (min(tokens) < 0 or max(tokens) > MAX_TOKEN_ID):  # every vocabulary fits 32 bits
        raise DecodeError("[kvcache] decode tokenize response: a token id is outside 0..2**32-1")
    return tokens
