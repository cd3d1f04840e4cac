"""Issue 10 items 1b, 12, 15, 16: slow or oversized clients, the server layer's own refusals as JSON,
WebSocket upgrades refused cleanly, no ERROR/traceback for handled events. Raw sockets on loopback;
short configured timeouts, asserting behaviour (answer / closed connection), never timing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvgate import server
from kvgate.ratelog import RateLimitedLog

from .conftest import Upstreams, gateway_config, launch
from .rawhttp import WEBSOCKET_UPGRADE, collect_logs, exchange, request

SHORT = {"request_headers_timeout": "300ms", "request_body_timeout": "300ms", "idle_timeout": "1s"}


async def test_slow_headers_get_408_and_silent_connections_are_closed(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra=SHORT))
    port = gw.listeners[0].port
    # one header byte every 100 ms, forever (bounded by the test): the head never completes
    slow = [b"POST /v1/completions HTTP/1.1\r\n"] + [b"X" for _ in range(40)]
    ans = await exchange(port, slow, gap_s=0.1)
    assert ans.status == 408 and ans.is_openai_error()
    silent = await exchange(port, b"")  # connect and say nothing
    assert silent.status is None  # closed by the server (exchange reads until EOF)


async def test_slow_body_gets_408(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra=SHORT))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{"
    ans = await exchange(gw.listeners[0].port, [head, b" ", b" "], gap_s=0.5)
    assert ans.status == 408 and ans.is_openai_error()
    assert upstreams.states["a"].calls == []


async def test_oversized_heads_get_431_json(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    port = gw.listeners[0].port
    big = await exchange(port, request("POST", "/v1/completions", b"{}", "X-Big: " + "a" * (1 << 20)))
    assert big.status == 431 and big.is_openai_error()
    many = await exchange(port, request("POST", "/v1/completions", b"{}", *(f"X-H{i}: v" for i in range(10_000))))
    assert many.status == 431 and many.is_openai_error()
    assert upstreams.states["a"].calls == []
    ok = await exchange(port, request("POST", "/v1/completions", b'{"prompt": "x"}'))
    assert ok.status == 200


async def test_too_many_small_headers_get_431_naming_the_count(upstreams: Upstreams, gateways) -> None:
    # 150 short headers: far below the size limit, above the count limit (checked once the head is parsed)
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra={"max_request_headers_count": 100}))
    port = gw.listeners[0].port
    many = await exchange(port, request("POST", "/v1/completions", b"{}", *(f"X-H{i}: v" for i in range(150))))
    assert many.status == 431 and many.is_openai_error()
    assert b"more than 100 request headers" in many.body
    assert upstreams.states["a"].calls == []
    # 90 headers on each of two requests on one connection: the count is per request
    few = [f"X-H{i}: v" for i in range(90)]
    keep = request("POST", "/v1/completions", b'{"prompt": "x"}', *few, close=False)
    ok = await exchange(port, keep + request("POST", "/v1/completions", b'{"prompt": "x"}', *few))
    assert ok.status == 200 and len(upstreams.states["a"].calls) == 2


async def test_request_trailers_count_toward_the_header_limits(upstreams: Upstreams, gateways) -> None:
    # A chunked body's trailers join the request's headers (uvicorn): they are held to the same byte limit, so an
    # endless run of trailers cannot grow the server's memory (regression: they were once not counted at all).
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra={"max_request_headers_kb": 2}))
    body = b'{"prompt": "x"}'
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(40))  # ~4.4 kB
    req = (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        + trailers
        + b"\r\n"
    )
    ans = await exchange(gw.listeners[0].port, req)
    assert ans.status == 431 and ans.is_openai_error()
    assert upstreams.states["a"].calls == []
    few = b"X-T: 1\r\n"  # a trailer within the limits is accepted
    ok = await exchange(gw.listeners[0].port, req.split(b"0\r\n", 1)[0] + b"0\r\n" + few + b"\r\n")
    assert ok.status == 200


async def test_idle_keepalive_connections_are_capped(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra={"max_idle_connections": 1}))
    port = gw.listeners[0].port
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for reader, writer in conns:
            writer.write(request("GET", "/v1/models", close=False))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next(
                int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")
            )
            await asyncio.wait_for(reader.readexactly(length), 10)
        # the second idle connection pushed the first (oldest) one out
        assert await asyncio.wait_for(conns[0][0].read(1), 10) == b""
        conns[1][1].write(request("GET", "/v1/models"))
        assert (await asyncio.wait_for(conns[1][0].read(12), 10)).startswith(b"HTTP/1.1 200")
    finally:
        for _, w in conns:
            w.close()


async def test_server_layer_refusals_are_openai_json(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    port = gw.listeners[0].port
    with collect_logs() as logs:
        cases = {
            "non_ascii_path": (request("GET", "/v1/mod\u00e9ls"), 400),
            "long_path": (request("GET", "/v1/" + "a" * 70_000), 414),
            "long_query": (request("GET", "/v1/models?q=" + "a" * 70_000), 414),
            "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
            "garbage_method": (b"G@RB@GE / HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
            "websocket": (request("GET", "/v1/models", b"", *WEBSOCKET_UPGRADE, close=False), 400),
        }
        for name, (data, status) in cases.items():
            ans = await exchange(port, data)
            assert ans.status == status, name
            assert ans.headers["content-type"] == "application/json", name
            assert ans.is_openai_error(), name
    assert logs.problems() == []
    assert len(logs.warnings("refused a client request")) <= len(cases)  # one per kind at most


async def test_mid_stream_abort_and_drain_cut_log_no_error(
    upstreams: Upstreams, gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh limiter: the same test for the other upstream client may have logged this kind seconds ago
    monkeypatch.setattr(server, "_rlog", RateLimitedLog(server.log, server._rlog.interval_s))
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    with collect_logs() as logs:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"{gw.url}/v1/die", json={}) as r:
                    try:
                        await r.read()
                    except aiohttp.ClientPayloadError:
                        pass
            # a stream still running when the drain time is over is cut: no CancelledError traceback
            r = await s.post(
                f"{gw.url}/v1/completions", json={"prompt": "x", "stream": True, "x_chunks": 3, "x_wait_release": True}
            )
            await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
            await gw.stop(drain_timeout=0.3)
            r.close()
            upstreams.states["a"].release_last.set()
    assert logs.problems() == []
    assert len(logs.warnings("aborted the response")) == 1  # rate-limited
    assert len(logs.warnings("drain timeout")) == 1
