"""Issue 10 items 2, 7: headers are forwarded as the client sent them, minus hop-by-hop ones."""

from __future__ import annotations

import asyncio

from .conftest import Gateways, Upstreams, gateway_config, launch


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_no_accept_or_accept_encoding_added(upstreams: Upstreams, gateways: Gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    answer = await raw_request(gw.listeners[0].port, post("/v1/completions", b'{"prompt": "x"}'))
    assert answer.startswith(b"HTTP/1.1 200")
    sent = upstreams.states["a"].calls[0]["headers"]
    assert "accept-encoding" not in sent  # no compressed answer asked for: none is decoded either
    assert "content-type" not in sent  # the client sent none
    assert "accept" not in sent and "user-agent" not in sent


async def test_client_accept_and_user_agent_forwarded_as_sent(upstreams: Upstreams, gateways: Gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    req = post("/v1/completions", b'{"prompt": "x"}', "Accept: application/json", "User-Agent: my-app/1")
    answer = await raw_request(gw.listeners[0].port, req)
    assert answer.startswith(b"HTTP/1.1 200")
    sent = upstreams.states["a"].calls[0]["headers"]
    assert sent["accept"] == "application/json" and sent["user-agent"] == "my-app/1"


async def test_connection_listed_headers_are_dropped_both_ways(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    state = upstreams.states["a"]
    state.resp_headers = [(b"connection", b"x-up-hop"), (b"x-up-hop", b"1"), (b"x-up-keep", b"1")]
    gw = await launch(gateways, gateway_config([a]))
    req = post(
        "/v1/completions",
        b'{"prompt": "x"}',
        "X-Hop: secret",
        "X-Other-Hop: 1",
        "X-Keep: yes",
        "Proxy-Connection: x-other-hop",
        "Connection: close, X-Hop",
    )
    answer = await raw_request(gw.listeners[0].port, req)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200")
    sent = state.calls[0]["headers"]
    assert sent["x-keep"] == "yes"
    assert "x-hop" not in sent and "x-other-hop" not in sent and "proxy-connection" not in sent
    assert b"x-up-keep: 1" in head and b"x-up-hop" not in head
