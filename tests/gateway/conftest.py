from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from kvgate.app import RunningGateway, start_gateway
from kvgate.chain import (
    PREFERRED_ENDPOINT_PARAM,
    FilterStatus,
    HttpFilter,
    RequestContext,
    registered_filter,
    registered_kinds,
)
from kvgate.config import parse_config
from kvgate.serving import ServerHandle, start_server

from .upstream import UpstreamState, make_upstream


class _PreferConfig(BaseModel):
    header: str = "x-test-preferred"


class _PreferFilter(HttpFilter):
    """Test-only filter: copies a header into llm_preferred_endpoint_id, like the kvcache filter does."""

    def __init__(self, cfg: _PreferConfig):
        self.cfg = cfg

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        v = ctx.header(self.cfg.header)
        if v:
            ctx.params[PREFERRED_ENDPOINT_PARAM] = v
        return FilterStatus.CONTINUE


@pytest.fixture(autouse=True)
def test_filter_kinds() -> Iterator[None]:
    """``test.prefer`` exists only while a gateway test runs; a test that leaves a kind registered fails."""
    before = registered_kinds()
    with registered_filter("test.prefer", _PreferConfig, lambda cfg, rt: _PreferFilter(cfg)):
        yield
    assert registered_kinds() == before, "a test left a filter kind in the global registry"


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def gateway_config(
    endpoints: list[tuple[str, int]],
    *,
    lb: str = "RoundRobin",
    fallback: bool = False,
    filters: list[dict[str, Any]] | None = None,
    hcm_extra: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
    llm_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    http_filters = [*(filters or []), {"name": "dgp.filter.llm.proxy", "config": proxy or {}}]
    hcm: dict[str, Any] = {
        "route_config": {"routes": [{"match": {"prefix": "/v1"}, "route": {"cluster": "llm"}}]},
        "http_filters": http_filters,
    }
    hcm.update(hcm_extra or {})
    meta = {"fallback": fallback, "health_check_interval": 5000, **(llm_meta or {})}
    return {
        "listeners": [
            {
                "name": "net/http",
                "protocol_type": "HTTP",
                "address": {"socket_address": {"address": "127.0.0.1", "port": 8888}},
                "filter_chains": {"filters": [{"name": "dgp.filter.httpconnectionmanager", "config": hcm}]},
            }
        ],
        "clusters": [
            {
                "name": "llm",
                "lb_policy": lb,
                "endpoints": [
                    {"id": eid, "socket_address": {"address": "127.0.0.1", "port": port}, "llm_meta": meta}
                    for eid, port in endpoints
                ],
            }
        ],
    }


class Upstreams:
    def __init__(self) -> None:
        self.handles: dict[str, ServerHandle] = {}
        self.states: dict[str, UpstreamState] = {}

    async def add(self, name: str) -> tuple[str, int]:
        app, state = make_upstream(name)
        h = await start_server(app)
        self.handles[name] = h
        self.states[name] = state
        return name, h.port

    async def close(self) -> None:
        for h in self.handles.values():
            await h.stop(1.0)


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    u = Upstreams()
    try:
        yield u
    finally:
        await u.close()


class Gateways(list[RunningGateway]):
    """The gateways a test started (stopped when it ends)."""


@pytest.fixture
async def gateways() -> AsyncIterator[Gateways]:
    started = Gateways()
    yield started
    for g in started:
        await g.stop(2.0)


async def launch(gateways: list[RunningGateway], cfg: dict[str, Any]) -> RunningGateway:
    g = await start_gateway(parse_config(cfg), port=0, admin_port=0)
    gateways.append(g)
    return g
