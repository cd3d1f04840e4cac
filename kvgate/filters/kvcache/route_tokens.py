"""The filter's token acquisition: a prompt's token ids for routing (request path) and for the background job.

Request path (:meth:`RouteTokens.on_miss`, called on a token-cache miss, inside the routing cap): prompts that
cannot fill one block of the routing source are skipped; the ``local_tokenizer`` (issue 9) tokenizes in-process
first — for a chat routed from the event index lazily (:meth:`RouteTokens.lazy_chat`: only as far as the index
could match); with ``tokenize_on_miss: true`` the remote ``/tokenize`` path (``vllm_endpoint``, then the route
cluster's other healthy engines) is the fallback, behind the ``tokenize_routing`` breaker and bounded by the
routing deadline. Background path (:meth:`RouteTokens.tokenize`): local first, then remote behind the
``tokenize`` breaker, until the job's deadline. Tokens obtained either way are stored in the token cache
(:meth:`RouteTokens.store`), which also drops the event index's memoized hashes for that key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvgate.errors import ConfigError
from kvgate.filters.kvcache.config import KVCacheConfig
from kvgate.filters.kvcache.errors import KVCacheError
from kvgate.filters.kvcache.events import FilterEvents
from kvgate.filters.kvcache.extract import Extracted
from kvgate.filters.kvcache.jobs import Job
from kvgate.filters.kvcache.metrics import KVCacheMetrics
from kvgate.filters.kvcache.remote_tokenizer import RemoteTokenizer
from kvgate.filters.kvcache.tokens import TokenCache
from kvgate.resilience import CircuitBreaker
from kvgate.tokenization import LocalTokenizer, TokenizationError
from kvgate.tokenization.segments import Split

if TYPE_CHECKING:  # imported when index_source needs it: the lookup path loads no ZMQ
    from kvgate.filters.kvcache.event_index import EventIndex

log = logging.getLogger("kvgate.filters.kvcache")

LMCACHE_CHUNK_TOKENS = 256  # the controller's hard-coded lookup granularity
_TEMPLATE_TOKENS_PER_MESSAGE = 8  # generous bound on chat-template tokens around each message


class Unheld:
    """A token-cache miss decided without full tokens: nobody holds the prompt's first block (lazy tokenization)."""


UNHELD = Unheld()


def as_list(tokens: list[int] | array[int]) -> list[int]:
    return tokens if isinstance(tokens, list) else tokens.tolist()


def may_fill_a_chunk(req: Extracted, chunk_tokens: int = LMCACHE_CHUNK_TOKENS) -> bool:
    """False when the prompt cannot reach one ``chunk_tokens`` block (256 = an LMCache chunk; the event index
    uses its own smallest block size), so a match could never be found.

    Byte-level BPE (and SentencePiece with byte fallback) never makes more tokens than UTF-8 bytes; the
    chat template adds a few tokens per message. Skipping saves a tokenization for short prompts.
    """
    text = req.engine_text if req.kind == "prompt" else req.prompt
    extra = _TEMPLATE_TOKENS_PER_MESSAGE * (len(req.messages) + 1) if req.kind == "chat" else 2
    return len(text.encode("utf-8")) + extra >= chunk_tokens


def load_local_tokenizer(config: KVCacheConfig) -> LocalTokenizer | None:
    """The ``local_tokenizer`` directory, loaded once (a load failure is a config error naming the key)."""
    lt = config.local_tokenizer
    if lt is None or not config.enabled:
        return None
    try:
        return LocalTokenizer.from_dir(lt.path, thread_threshold=lt.thread_threshold, fast=lt.fast)
    except TokenizationError as exc:
        raise ConfigError("local_tokenizer.path", f"[kvcache] local_tokenizer.path: {exc}") from None


class RouteTokens:
    """Token ids for a request: token cache, local tokenizer, remote ``/tokenize`` (see the module docstring).

    ``breaker`` guards the background remote tokenize, ``routing_breaker`` the request-path one (kept apart so
    slow routing tokenizes cannot stop the background work that fills the cache); ``fallbacks(cluster)`` names
    the base URLs of the route cluster's healthy engines.
    """

    def __init__(
        self,
        config: KVCacheConfig,
        *,
        token_cache: TokenCache,
        local: LocalTokenizer | None,
        remote: RemoteTokenizer,
        event_index: EventIndex | None,
        breaker: CircuitBreaker,
        routing_breaker: CircuitBreaker,
        fallbacks: Callable[[str], list[str]],
        metrics: KVCacheMetrics,
        events: FilterEvents,
    ) -> None:
        self.cfg = config
        self.token_cache = token_cache
        self.local = local
        self.remote = remote
        self.event_index = event_index
        self.breaker = breaker
        self.routing_breaker = routing_breaker
        self._fallbacks = fallbacks
        self.metrics = metrics
        self.events = events

    def store(self, key: str, tokens: list[int] | array[int]) -> list[int] | array[int]:
        """Cache ``tokens`` for ``key``; returns what routing should use: the cached ``array('I')`` for the event
        index (its chain keys hash that buffer: no second conversion), a list for ``/lookup`` (sent as JSON)."""
        stored = self.token_cache.put(key, tokens)
        self.metrics.token_cache_size.set(len(self.token_cache))
        if self.event_index is not None:
            self.event_index.forget_tokens(key)
            return stored
        return as_list(tokens)

    def min_prompt_tokens(self) -> int:
        """Prompts that cannot fill one block of the routing source are not tokenized on the request path."""
        if self.event_index is not None:
            return self.event_index.min_block_tokens() or LMCACHE_CHUNK_TOKENS
        return LMCACHE_CHUNK_TOKENS

    # ------------------------------------------------------------------ request path

    async def on_miss(
        self, req: Extracted, key: str, deadline: float, cluster: str
    ) -> list[int] | array[int] | Unheld | None:
        """Token-cache miss on the request path: local tokenizer first, then (``tokenize_on_miss``) remote.
        ``UNHELD``: the event index provably matches nothing for this chat (see :meth:`lazy_chat`)."""
        if not may_fill_a_chunk(req, self.min_prompt_tokens()):
            return None
        if self.local is not None:
            split: Split | None = None
            if self.event_index is not None and req.kind == "chat":
                lazy = self.lazy_chat(self.local, self.event_index, req)
                if isinstance(lazy, Unheld):
                    return lazy
                if isinstance(lazy, array):
                    return self.store(key, lazy)
                split = lazy
            tokens = await self.tokenize_local(self.local, req, key, split)
            if tokens is not None:
                return self.store(key, tokens)
        if self.cfg.tokenize_on_miss:
            return await self.tokenize_within(req, key, deadline, cluster)
        return None

    def lazy_chat(self, tok: LocalTokenizer, index: EventIndex, req: Extracted) -> Unheld | array[int] | Split | None:
        """Lazy tokenization for the event index: render the chat, encode its pieces (between added tokens) only
        until one more token than the index's largest block size is known, and stop when nobody holds the first
        block at any size: ``match`` of the full ids would be empty too (``BlockIndex.first_block_held``), so the
        decision is identical. Returns ``UNHELD``, the full ids (the whole chat fit in the prefix), or the rendered
        chat, split once at its added tokens, to encode in full (``None``: rendering failed; the full path repeats
        it and reports the failure).
        Nothing partial is cached: the background job tokenizes an ``UNHELD`` chat in full."""
        t0 = time.perf_counter()
        try:
            text = tok.render_chat(list(req.messages), tools=req.tools)
        except TokenizationError:
            return None
        biggest = index.max_block_tokens()
        if biggest is None:  # an empty index matches nothing
            self.metrics.local_tokenize.labels("unheld").inc()
            return UNHELD
        split = tok.split_chat(text)
        prefix = tok.chat_prefix(split, biggest + 1)
        if prefix is None:
            return split
        ids, complete = prefix
        if complete:
            self.metrics.local_tokenize.labels("ok").inc()
            self.metrics.local_tokenize_latency.observe(time.perf_counter() - t0)
            return ids
        if index.index.first_block_held(ids, len(ids) - 1):
            return split
        self.metrics.local_tokenize.labels("unheld").inc()
        return UNHELD

    async def tokenize_local(
        self, tok: LocalTokenizer, req: Extracted, key: str, split: Split | None = None
    ) -> list[int] | array[int] | None:
        """In-process tokenization (long texts on a worker thread); ``None`` when it fails (counted, logged).
        ``split``: the chat already rendered and split (:meth:`LocalTokenizer.split_chat`)."""
        m = self.metrics
        t0 = time.perf_counter()
        try:
            if req.kind == "prompt":
                tokens: list[int] | array[int] = await tok.aencode_prompt(req.engine_text)
            elif split is not None:
                tokens = await tok.aencode_rendered_chat(split)
            else:
                tokens = await tok.aencode_chat(list(req.messages), tools=req.tools)
        except TokenizationError as exc:
            m.local_tokenize.labels("fallback").inc()
            self.events.warn(
                "local_tokenize_fallback",
                "[kvcache] local tokenization failed, the remote /tokenize path is used: %s (key=%s)",
                str(exc)[:200],
                key[:12],
            )
            return None
        finally:
            m.local_tokenize_latency.observe(time.perf_counter() - t0)
        m.local_tokenize.labels("ok").inc()
        return tokens

    async def tokenize_within(
        self, req: Extracted, key: str, deadline: float, cluster: str
    ) -> list[int] | array[int] | None:
        """``tokenize_on_miss``: tokenize on the request path, bounded by the routing deadline."""
        breaker = self.routing_breaker
        if not breaker.would_allow():
            return None
        t0 = time.perf_counter()
        body = req.tokenize_request()
        try:
            async with asyncio.timeout_at(deadline):
                tokens = await breaker.call(
                    lambda: self.remote.tokenize(body, deadline=deadline, fallbacks=self._fallbacks(cluster)),
                    deadline=deadline,
                )
        except (TimeoutError, KVCacheError) as exc:
            self.metrics.tokenize_calls.labels("error").inc()
            log.debug(
                "[kvcache] routing tokenize failed: %s (key=%s, prompt_chars=%d)",
                type(exc).__name__,
                key[:12],
                len(req.prompt),
            )
            return None
        finally:
            self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        self.metrics.tokenize_calls.labels("ok").inc()
        return self.store(key, tokens)

    # ------------------------------------------------------------------ background

    async def tokenize(self, job: Job, deadline: float) -> list[int]:
        """The background job's tokenize (not stored here: the job stores it when the token cache is enabled)."""
        if self.local is not None:
            local = await self.tokenize_local(self.local, job.request, job.key)
            if local is not None:
                return as_list(local)
        t0 = time.perf_counter()
        body = job.request.tokenize_request()
        try:
            fallbacks = self._fallbacks(job.cluster)
            tokens = await self.breaker.call(
                lambda: self.remote.tokenize(body, deadline=deadline, fallbacks=fallbacks), deadline=deadline
            )
        except KVCacheError as exc:
            self.metrics.tokenize_calls.labels("error").inc()
            self.events.warn(
                "tokenize_failed",
                "[kvcache] tokenize failed: %s (key=%s, prompt_chars=%d)",
                exc,
                job.key[:12],
                len(job.request.prompt),
            )
            raise
        finally:
            self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        self.metrics.tokenize_calls.labels("ok").inc()
        return tokens
