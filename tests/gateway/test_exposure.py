"""Issue 10 items 8, 10, 11, 17: what the gateway reveals (decision headers, /config, admin) and adds
(X-Forwarded-For / Forwarded)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel

from kvgate.chain import FilterStatus, HttpFilter, RequestContext, registered_filter
from kvgate.config import parse_config
from kvgate.redact import redact_secrets as redact
from kvgate.server import Gateway
from kvgate.serving import start_server

from .conftest import Upstreams, gateway_config, launch
from .upstream import make_upstream


class _DecisionConfig(BaseModel):
    pass


class _DecisionFilter(HttpFilter):
    """Test-only stand-in for the kvcache filter: appends a decision header, as it does."""

    async def decode(self, ctx: RequestContext) -> FilterStatus:
        ctx.response_headers.append((b"x-kvgate-kvcache", b"routed;lookup_ms=1.0"))
        ctx.response_headers.append((b"x-other-filter", b"kept"))
        return FilterStatus.CONTINUE


@pytest.fixture(autouse=True)
def decision_filter_kind() -> Iterator[None]:
    with registered_filter("test.decision", _DecisionConfig, lambda cfg, rt: _DecisionFilter()):
        yield


async def _post(s: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Any:
    async with s.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers or {}) as r:
        assert r.status == 200
        return r.headers


async def test_decision_headers_are_opt_in(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    filters = [{"name": "test.decision"}]
    off = await launch(gateways, gateway_config([a], filters=filters))
    on = await launch(gateways, gateway_config([a], filters=filters, hcm_extra={"decision_headers": True}))
    tok = await launch(gateways, gateway_config([a], filters=filters, hcm_extra={"decision_headers_token": "s3cret"}))
    async with aiohttp.ClientSession() as s:
        h = await _post(s, off.url)
        assert "x-kvgate-kvcache" not in h and "x-kvgate-endpoint" not in h
        assert h["x-other-filter"] == "kept"
        h = await _post(s, on.url)
        assert h["x-kvgate-kvcache"].startswith("routed") and h["x-kvgate-endpoint"] == "a"
        assert "x-kvgate-endpoint" not in await _post(s, tok.url)
        assert "x-kvgate-endpoint" not in await _post(s, tok.url, {"x-kvgate-debug-token": "wrong"})
        h = await _post(s, tok.url, {"x-kvgate-debug-token": "s3cret"})
        assert h["x-kvgate-endpoint"] == "a" and h["x-kvgate-kvcache"].startswith("routed")
    # the debug token is a credential: never forwarded upstream
    assert all("x-kvgate-debug-token" not in c["headers"] for c in upstreams.states["a"].calls)


def test_config_redaction_by_pattern() -> None:
    out = redact(
        {
            "bearer_token": "t1",
            "client_secret": "t2",
            "hmac_key": "t3",
            "db_password": "t4",
            "authHeader": "t5",
            "controller": "http://user:pw@127.0.0.1:9000/x?access-token=abc&region=eu",
            "token_cache": {"max_size": 5, "enabled": True},
            "name": "keepme",
            "api_key": None,
        }
    )
    assert out["bearer_token"] == out["client_secret"] == out["hmac_key"] == out["db_password"] == "***"
    assert out["authHeader"] == "***"
    assert out["controller"] == "http://***@127.0.0.1:9000/x?access-token=***&region=***"
    assert out["token_cache"] == {"max_size": 5, "enabled": True} and out["name"] == "keepme"
    assert out["api_key"] is None


async def test_admin_token_guards_config_and_metrics(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    cfg = gateway_config([a])
    cfg["admin"] = {"token": "adm1n"}
    gw = await launch(gateways, cfg)
    async with aiohttp.ClientSession() as s:
        for path in ("/config", "/metrics"):
            async with s.get(f"{gw.admin_url}{path}") as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == 401
            async with s.get(f"{gw.admin_url}{path}", headers={"Authorization": "Bearer adm1n"}) as r:
                assert r.status == 200
        async with s.get(f"{gw.admin_url}/config", headers={"Authorization": "Bearer adm1n"}) as r:
            assert "adm1n" not in await r.text()  # admin.token itself is redacted
        async with s.get(f"{gw.admin_url}/healthz") as r:
            assert r.status == 200


async def test_non_loopback_admin_without_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    from kvgate.app import start_gateway

    app, _ = make_upstream("a")
    up = await start_server(app)
    try:
        with caplog.at_level(logging.WARNING, logger="kvgate"):
            gw = await start_gateway(
                parse_config(gateway_config([("a", up.port)])), port=0, admin_port=0, admin_host="0.0.0.0"
            )
            await gw.stop(1.0)
    finally:
        await up.stop(1.0)
    assert any("without admin.token" in r.getMessage() for r in caplog.records)


def test_unknown_static_resources_keys_warn() -> None:
    data = gateway_config([("a", 1)])
    cfg = parse_config(
        {
            "static_resources": {
                "listeners": data["listeners"],
                "clusters": data["clusters"],
                "shutdown_config": {"timeout": "1s"},
            }
        }
    )
    gw = Gateway(cfg)
    assert "unknown key ignored: static_resources.shutdown_config" in gw.warnings


async def test_forwarded_headers_replace_by_default_and_append_when_trusted(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    plain = await launch(gateways, gateway_config([a]))
    trusting = await launch(gateways, gateway_config([a], hcm_extra={"xff_num_trusted_hops": 1}))
    spoof = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"}
    async with aiohttp.ClientSession() as s:
        await _post(s, plain.url, spoof)
        await _post(s, trusting.url, spoof)
    first, second = (c["headers"] for c in upstreams.states["a"].calls)
    assert first["x-forwarded-for"] == "127.0.0.1"  # not trusted: the peer address only
    assert first["forwarded"] == "for=127.0.0.1;proto=http"
    assert second["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"  # trusted: appended
    assert second["forwarded"] == "for=6.6.6.6, for=127.0.0.1;proto=http"
