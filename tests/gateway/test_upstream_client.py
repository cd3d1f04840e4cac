"""The proxy filter's upstream client against real loopback servers: connection cap, idle timeout mid-stream,
error outcomes, connection reuse and the closing of a cut body, non-ASCII answer headers, path bytes as sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from .conftest import Gateways, Upstreams, dead_port, gateway_config, launch

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An HTTP/1.1 upstream written on asyncio streams, to control what the connection does."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.closed_by_peer = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[list[RawUpstream]]:
    started: list[RawUpstream] = []
    yield started
    for u in started:
        await u.stop()


async def raw_upstream(started: list[RawUpstream], handler: Handler) -> tuple[RawUpstream, int]:
    u = RawUpstream(handler)
    started.append(u)
    return u, await u.start()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and its Content-Length body; b"" when the peer closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def metrics_text(gw: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin_url}/metrics") as r:
        return await r.text()


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never: {what}")


async def test_max_conns_per_host_caps_and_its_wait_counts_toward_timeout(
    upstreams: Upstreams, gateways: Gateways
) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], proxy={"maxConnsPerHost": 1, "timeout": "300ms"}))
    state = upstreams.states["a"]
    held_body = {"prompt": "x", "stream": True, "x_chunks": 2, "x_wait_release": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json=held_body) as held:
            assert (await held.content.readline()).startswith(b"data: ")  # holds the only connection
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "y"}) as r:
                assert r.status == 504  # waited for a free connection past the header timeout
                assert (await r.json())["error"]["type"] == "upstream_timeout"
            assert len(state.calls) == 1  # the second request never reached the upstream
            state.release_last.set()
            assert (await held.read()).endswith(b"data: [DONE]\n\n")
        gw.gateway.runtime.clusters.get("llm").mark_ok(gw.gateway.runtime.clusters.get("llm").get("a"))
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "z"}) as r:
            assert r.status == 200  # the slot came back when the stream ended
    assert len(state.calls) == 2


@pytest.mark.parametrize(
    "proxy",
    [
        {"stream_idle_timeout": "300ms"},  # idle shorter than the header wait: the proxy's timer
        {"stream_idle_timeout": "300ms", "timeout": "200ms"},  # idle not shorter than the header wait
    ],
    ids=["proxy-timer", "header-shorter"],
)
async def test_stalled_stream_is_cut_after_idle_timeout(
    upstreams: Upstreams, gateways: Gateways, proxy: dict[str, Any]
) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], proxy=proxy))
    state = upstreams.states["a"]
    body = {"prompt": "x", "stream": True, "x_chunks": 3, "x_wait_release": True}
    try:
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/completions", json=body) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # truncated, never a clean end
                await asyncio.wait_for(r.read(), 20)
        await asyncio.wait_for(state.disconnected.wait(), 10)  # the upstream connection was closed
        cluster = gw.gateway.runtime.clusters.get("llm")
        await wait_until(lambda: cluster.get("a").in_flight == 0, "slot freed")
        text = await metrics_text(gw)
        assert 'kvgate_requests_total{cluster="llm",endpoint="a",status="upstream_aborted"} 1.0' in text
    finally:
        state.release_last.set()


async def test_error_outcomes(upstreams: Upstreams, gateways: Gateways, raw_upstreams: list[RawUpstream]) -> None:
    async def close_before_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then close without an answer

    _, broken_port = await raw_upstream(raw_upstreams, close_before_head)
    slow = await upstreams.add("slow")
    upstreams.states["slow"].delay_s = 3.0
    cases = {
        "dead": (dead_port(), 503, "service_unavailable", "network_error"),
        "broken": (broken_port, 502, "upstream_error", "broken"),
        "slow": (slow[1], 504, "upstream_timeout", "timeout"),
    }
    for eid, (port, status, error_type, outcome) in cases.items():
        gw = await launch(gateways, gateway_config([(eid, port)], proxy={"timeout": "300ms"}))
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert (r.status, (await r.json())["error"]["type"]) == (status, error_type), eid
        text = await metrics_text(gw)
        assert f'kvgate_upstream_attempts_total{{cluster="llm",endpoint="{eid}",outcome="{outcome}"}}' in text, eid


async def test_keepalive_reuse_and_cut_body_closes_its_connection(
    gateways: Gateways, raw_upstreams: list[RawUpstream]
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await read_request(reader):
            if b"/v1/big" in head:  # far more than the client reads before it goes away
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 10000000\r\n\r\n")
                writer.write(b"data: {}\n\n")
                await writer.drain()
                await reader.read()  # until the gateway closes this connection
                up.closed_by_peer += 1
                return
            payload = json.dumps({"ok": True}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
            )
            writer.write(payload)
            await writer.drain()

    up, port = await raw_upstream(raw_upstreams, answer)
    gw = await launch(gateways, gateway_config([("a", port)]))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 200 and await r.json() == {"ok": True}
        assert up.connections == 1  # one kept-alive upstream connection for all three
        r = await s.post(f"{gw.url}/v1/big", json={})
        assert (await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)) == b"data: {}\n\n"
        r.close()  # the client goes away mid-body
    await wait_until(lambda: up.closed_by_peer == 1, "the cut body's upstream connection closed")
    async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 200  # a fresh connection replaces it
    assert up.connections == 2  # the big answer came on the kept connection, which it took down


async def test_answer_header_outside_ascii(upstreams: Upstreams, gateways: Gateways) -> None:
    a = await upstreams.add("a")
    upstreams.states["a"].resp_headers = [(b"x-up-name", "café".encode()), (b"x-up-plain", b"1")]
    gw = await launch(gateways, gateway_config([a]))
    async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 200 and (await r.json())["served_by"] == "a"
        assert r.headers["x-up-plain"] == "1"
        raw = dict(r.raw_headers)
    assert raw[b"x-up-name"] == "café".encode()  # forwarded as received


async def test_path_bytes_outside_the_url_parsers_set(upstreams: Upstreams, gateways: Gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listeners[0].port)
    try:
        writer.write(b"GET /v1/models/a{b}%2Fc?q=%3F HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 404")
    got = upstreams.states["a"].calls[0]
    assert got["query"] == "q=%3F"
    assert got["raw_path"] == "/v1/models/a{b}%2Fc"  # as sent


async def test_an_upstream_cookie_is_never_sent_on_another_clients_request(
    upstreams: Upstreams, gateways: Gateways
) -> None:
    """The upstream client keeps no cookies: one client's Set-Cookie reached the next client's request before
    (aiohttp's default cookie jar; it skips IP hosts, so the endpoint is named by host name here)."""
    name, port = await upstreams.add("a")
    upstreams.states["a"].resp_headers = [(b"set-cookie", b"session=client-one-secret; Path=/")]
    cfg = gateway_config([(name, port)])
    cfg["clusters"][0]["endpoints"][0]["socket_address"]["address"] = "localhost"
    gw = await launch(gateways, cfg)
    for _ in range(2):  # two clients, each with its own session (no cookie of their own)
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 200
            assert r.headers["set-cookie"].startswith("session=client-one-secret")  # passed to the client
    calls = upstreams.states["a"].calls
    assert len(calls) == 2
    assert "cookie" not in calls[1]["headers"]
