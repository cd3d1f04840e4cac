"""Remote tokenization: vLLM ``/tokenize`` at ``vllm_endpoint``, falling back to the route's other engines.

Every engine of a route's cluster serves the same model, so any healthy one can tokenize. The configured
``vllm_endpoint`` is tried first; when it fails with a retryable error (connection refused, timeout, 5xx,
malformed answer) it is set aside for ``cooldown`` seconds and the call moves on to the fallbacks (the
healthy endpoints of the request's cluster, in config order), one attempt each, within the same deadline.
A non-retryable 4xx (the request itself is refused) is raised at once: the other engines would refuse it too.

Kept apart from the filter so that an in-process tokenizer can replace it behind the same ``tokenize``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvgate.filters.kvcache.errors import UpstreamCallError
from kvgate.filters.kvcache.lmcache_client import TokenizerClient

DEFAULT_PRIMARY_COOLDOWN = 5.0  # seconds the configured endpoint is skipped after a failure


class RemoteTokenizer:
    def __init__(
        self,
        primary: TokenizerClient,
        client_for: Callable[[str], TokenizerClient],
        *,
        clock: Callable[[], float] = time.monotonic,
        cooldown: float = DEFAULT_PRIMARY_COOLDOWN,
        on_fallback: Callable[[str, UpstreamCallError | None], None] = lambda url, exc: None,
    ):
        self.primary = primary
        self._client_for = client_for
        self._clients: dict[str, TokenizerClient] = {primary.base_url: primary}
        self._clock = clock
        self.cooldown = cooldown
        self._on_fallback = on_fallback
        self._primary_down_until = 0.0

    @property
    def primary_down(self) -> bool:
        return self._clock() < self._primary_down_until

    def _client(self, url: str) -> TokenizerClient:
        url = url.strip().rstrip("/")
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = self._client_for(url)
        return client

    async def tokenize(
        self, request: Mapping[str, Any], *, deadline: float | None = None, fallbacks: Sequence[str] = ()
    ) -> list[int]:
        """Token ids for ``request``; ``fallbacks`` = base URLs of other engines serving the same model."""
        others = [self._client(u) for u in fallbacks if u.strip().rstrip("/") != self.primary.base_url]
        candidates = others if self.primary_down and others else [self.primary, *others]
        first: UpstreamCallError | None = None  # raised if every candidate fails (the primary's, usually)
        last: UpstreamCallError | None = None
        for client in candidates:
            try:
                tokens = await client.tokenize(request, deadline=deadline)
            except UpstreamCallError as exc:
                if not exc.retryable:
                    raise
                if client is self.primary:
                    self._primary_down_until = self._clock() + self.cooldown
                first = first or exc
                last = exc
                continue
            if client is self.primary:
                self._primary_down_until = 0.0
            else:
                self._on_fallback(client.log_url, last)
            return tokens
        assert first is not None
        raise first
