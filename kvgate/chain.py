"""HTTP filter chain: the filter-kind registry, the per-request context and the filter interface.

A filter kind = a typed config model + a factory + ``decode`` (and optionally ``encode``). Filters
are built once per listener (long-lived state such as caches and breakers lives on the instance)
and run in YAML order for every request. Filters talk through ``ctx.params`` (Pixiu's ``hc.Params``),
e.g. the kvcache filter sets :data:`PREFERRED_ENDPOINT_PARAM` for the proxy filter.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from kvgate.config import config_error_from_validation
from kvgate.errors import ConfigError, RegistryError
from kvgate.jsonload import loads

if TYPE_CHECKING:
    from kvgate.runtime import Runtime

# Bodies above this size are parsed on a worker thread (``RequestContext.json_async``): measured ~7 ms per MB of
# chat JSON for parse + key on the event loop, so 256 KiB keeps an inline parse under ~2 ms of loop stall.
# See benchmarks/body_offload.py.
JSON_OFFLOAD_BYTES = 256 * 1024
PREFERRED_ENDPOINT_PARAM = "llm_preferred_endpoint_id"
UPSTREAM_ATTEMPTS_PARAM = "llm_upstream_attempts"


class FilterStatus(enum.Enum):
    CONTINUE = "continue"
    STOP = "stop"  # a local reply was set; later decode filters are skipped


@dataclass(slots=True)
class LocalReply:
    status: int
    body: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class UpstreamResponse:
    """What the terminal filter hands back: status, headers and the body, as an async stream or (``complete``)
    as bytes that had all arrived."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: AsyncGenerator[bytes, None] | None  # closed with aclose() when the client goes away; None: ``complete``
    endpoint_id: str | None = None
    on_close: Callable[[], None] | None = None
    length: int | None = None  # the body's Content-Length when declared (the server ends the answer with it)
    complete: bytes | None = None  # the whole body, when it came with the head (``body`` is then None)


_UNSET: Any = object()


@dataclass(slots=True, eq=False)
class RequestContext:
    method: str
    path: str  # percent-decoded (route matching)
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    cluster_name: str = ""
    route_prefix: str = "/"
    timeout: float = 10.0
    raw_path: bytes = b""  # as the client sent it (forwarded upstream unchanged)
    # the client may see x-kvgate-* decision headers: when False (the server says) filters need not build them,
    # and the server drops any that are set
    decisions: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    response: UpstreamResponse | None = None
    local_reply: LocalReply | None = None
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    completed: bool = False  # the last response byte was handed to the server
    _json: Any = _UNSET

    def header(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return default

    def json(self) -> Any:
        """The body parsed as JSON once and shared by all filters. Raises ``ValueError`` if malformed."""
        if self._json is _UNSET:
            self._json = _parse_json(self.body)
        if isinstance(self._json, Exception):
            raise ValueError(str(self._json))
        return self._json

    async def json_async(self, offload_above: int = JSON_OFFLOAD_BYTES) -> Any:
        """:meth:`json`, but a body larger than ``offload_above`` bytes is parsed on a worker thread.

        The parse still holds the GIL (``json`` is C code), yet the loop is no longer blocked for the whole
        request: see benchmarks/body_offload.py for the measured stall. The result is shared like ``json()``'s.
        """
        if self._json is _UNSET and len(self.body) > offload_above:
            parsed = await asyncio.to_thread(_parse_json, self.body)
            if self._json is _UNSET:
                self._json = parsed
        return self.json()

    def reply(self, status: int, message: str, error_type: str, code: int | str | None = None) -> FilterStatus:
        self.local_reply = LocalReply(
            status, {"error": {"message": message, "type": error_type, "param": None, "code": code or status}}
        )
        return FilterStatus.STOP


def _parse_json(body: bytes) -> Any:
    """Parsed JSON (``None`` for an empty body), or the exception that a malformed body raised."""
    try:
        return loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return exc


class HttpFilter:
    """Base class: override ``decode`` and/or ``encode``; ``start``/``close`` manage resources."""

    kind: str = ""

    async def start(self) -> None:
        return None

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        return FilterStatus.CONTINUE

    async def encode(self, ctx: RequestContext) -> FilterStatus:
        return FilterStatus.CONTINUE

    async def close(self) -> None:
        return None


C = TypeVar("C", bound=BaseModel)
FactoryFn = Callable[[C, "Runtime"], HttpFilter]


@dataclass(frozen=True)
class FilterKind(Generic[C]):
    name: str
    config_model: type[C]
    factory: FactoryFn[C]
    terminal: bool = False


_REGISTRY: dict[str, FilterKind[Any]] = {}


def register_filter(
    name: str, config_model: type[C], *, terminal: bool = False
) -> Callable[[FactoryFn[C]], FactoryFn[C]]:
    """Decorator registering a filter kind (Pixiu's ``filter.RegisterHttpFilter``): a duplicate ``name`` is an error.

    This module knows no concrete filter: the built-in kinds register themselves when :mod:`kvgate.registry`
    (the plugin index) imports them.
    """

    def deco(fn: FactoryFn[C]) -> FactoryFn[C]:
        if name in _REGISTRY:
            raise RegistryError(f"filter kind {name!r} is already registered")
        _REGISTRY[name] = FilterKind(name, config_model, fn, terminal)
        return fn

    return deco


def unregister_filter(name: str) -> None:
    """Remove a registered kind (tests and plugins that are unloaded); unknown names are an error."""
    if _REGISTRY.pop(name, None) is None:
        raise RegistryError(f"filter kind {name!r} is not registered")


@contextmanager
def registered_filter(
    name: str, config_model: type[C], factory: FactoryFn[C], *, terminal: bool = False
) -> Iterator[FilterKind[C]]:
    """Register a kind for the duration of a ``with`` block (test filters must not leak into the registry)."""
    register_filter(name, config_model, terminal=terminal)(factory)
    try:
        yield _REGISTRY[name]
    finally:
        unregister_filter(name)


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def get_kind(name: str) -> FilterKind[Any] | None:
    return _REGISTRY.get(name)


def validate_filter_config(name: str, raw: dict[str, Any] | None, path: str) -> BaseModel:
    """Validate a filter's ``config`` map; errors name ``<path>.config.<key>``."""
    kind = get_kind(name)
    if kind is None:
        raise ConfigError(f"{path}.name", f"unknown filter {name!r} (known: {', '.join(registered_kinds())})")
    model: type[BaseModel] = kind.config_model
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        raise config_error_from_validation(exc, prefix=f"{path}.config") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}.config.{exc.path}" if exc.path else f"{path}.config", exc.reason) from None


def build_filter(name: str, config: BaseModel, runtime: Runtime) -> HttpFilter:
    kind = get_kind(name)
    if kind is None:
        raise RegistryError(f"filter kind {name!r} is not registered")
    flt = kind.factory(config, runtime)
    flt.kind = name
    return flt
