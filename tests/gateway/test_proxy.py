"""Gateway core against real upstream HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai

from .conftest import Upstreams, dead_port, gateway_config, launch


async def test_non_streaming_pass_through(upstreams: Upstreams, gateways) -> None:
    ep = await upstreams.add("a")
    gw = await launch(
        gateways, gateway_config([ep], llm_meta={"api_key": "sk-secret"}, hcm_extra={"decision_headers": True})
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gw.url}/v1/chat/completions?trace=1",
            json={"model": "demo", "messages": []},
            headers={"x-custom": "yes", "Authorization": "Bearer client", "x-user-name": "café"},
        ) as r:
            assert r.status == 200
            body = await r.json()
            assert r.headers["x-served-by"] == "a"
            assert r.headers["x-kvgate-endpoint"] == "a"
    assert body["served_by"] == "a"
    call = upstreams.states["a"].calls[0]
    assert call["query"] == "trace=1"
    assert call["body"] == {"model": "demo", "messages": []}
    assert call["headers"]["x-custom"] == "yes"
    assert call["headers"]["x-user-name"] == "café"  # non-ASCII (UTF-8) header values round-trip
    assert call["headers"]["authorization"] == "Bearer sk-secret"  # api_key replaces the client's
    assert call["headers"]["host"].startswith("127.0.0.1:")


async def test_streaming_first_chunk_before_upstream_finishes(upstreams: Upstreams, gateways) -> None:
    ep = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([ep]))
    state = upstreams.states["a"]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gw.url}/v1/completions",
            json={"model": "demo", "prompt": "x", "stream": True, "x_chunks": 3, "x_wait_release": True},
        ) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
            # The upstream is still holding back its last chunk: streaming is not buffered.
            assert not state.release_last.is_set()
            assert json.loads(first[len(b"data: ") :])["choices"][0]["text"] == "t0 "
            state.release_last.set()
            rest = await asyncio.wait_for(r.read(), 10)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert rest.count(b"data: ") == 3


async def test_openai_client_through_gateway(upstreams: Upstreams, gateways) -> None:
    ep = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([ep]))
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-test", max_retries=0)
    try:
        resp = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert resp.choices[0].message.content == "hello from a"
        stream = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream]
        assert "".join(pieces) == "t1 t2 "
        comp = await client.completions.create(model="demo", prompt="hi")
        assert comp.choices[0].text == "hello from a"
    finally:
        await client.close()


async def test_preferred_endpoint_honoured_and_fallbacks(upstreams: Upstreams, gateways) -> None:
    a, b = await upstreams.add("a"), await upstreams.add("b")
    gw = await launch(gateways, gateway_config([a, b], filters=[{"name": "test.prefer"}]))
    async with aiohttp.ClientSession() as s:
        served = []
        for _ in range(4):
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "b"}) as r:
                served.append((await r.json())["served_by"])
        assert served == ["b"] * 4
        # unknown id → LB pick (round robin alternates)
        served = []
        for _ in range(4):
            async with s.post(
                f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "nope"}
            ) as r:
                served.append((await r.json())["served_by"])
        assert sorted(served) == ["a", "a", "b", "b"]
        # unhealthy preferred → LB pick among the healthy
        cluster = gw.gateway.runtime.clusters.get("llm")
        cluster.mark_failed(cluster.get("b"))
        for _ in range(3):
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "b"}) as r:
                assert (await r.json())["served_by"] == "a"
        async with s.get(f"{gw.admin_url}/metrics") as r:
            text = await r.text()
    assert 'kvgate_preferred_endpoint_decisions_total{cluster="llm",outcome="honored"} 4.0' in text
    assert 'kvgate_preferred_endpoint_decisions_total{cluster="llm",outcome="unknown_id"} 4.0' in text
    assert 'kvgate_preferred_endpoint_decisions_total{cluster="llm",outcome="unhealthy"} 3.0' in text


async def test_failover_and_all_down(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    dead = ("dead", dead_port())
    gw = await launch(gateways, gateway_config([dead, a], fallback=True))
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 200
                assert (await r.json())["served_by"] == "a"
    gw2 = await launch(gateways, gateway_config([("d1", dead_port()), ("d2", dead_port())], fallback=True))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw2.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
            err = (await r.json())["error"]
            assert err["type"] == "service_unavailable" and err["message"]
        # both endpoints now cool down: still 503 (no healthy endpoint), still JSON
        async with s.post(f"{gw2.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
            assert "cooling down" in (await r.json())["error"]["message"]


async def test_fallback_wraps_around_from_last_endpoint(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    dead = ("dead", dead_port())
    gw = await launch(gateways, gateway_config([a, dead], fallback=True, filters=[{"name": "test.prefer"}]))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "dead"}) as r:
            assert r.status == 200  # Pixiu's index+1 fallback has nothing after the last endpoint
            assert (await r.json())["served_by"] == "a"


async def test_retry_policy_and_5xx_passthrough(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    upstreams.states["a"].fail_status = 503
    gw = await launch(
        gateways, gateway_config([a], llm_meta={"retry_policy": {"name": "CountBased", "config": {"times": 2}}})
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503  # the last upstream answer passes through
    assert len(upstreams.states["a"].calls) == 3
    # 4xx answers are the client's problem: passed through, not retried
    upstreams.states["a"].fail_status = 400
    upstreams.states["a"].calls.clear()
    gw.gateway.runtime.clusters.get("llm").mark_ok(gw.gateway.runtime.clusters.get("llm").get("a"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 400
    assert len(upstreams.states["a"].calls) == 1


async def test_upstream_timeout_is_504(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    upstreams.states["a"].delay_s = 3.0
    gw = await launch(gateways, gateway_config([a], proxy={"timeout": "200ms"}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 504
            assert (await r.json())["error"]["type"] == "upstream_timeout"


async def test_client_disconnect_cancels_upstream(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    state = upstreams.states["a"]
    s = aiohttp.ClientSession()
    r = await s.post(
        f"{gw.url}/v1/completions", json={"prompt": "x", "stream": True, "x_chunks": 3, "x_wait_release": True}
    )
    await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
    r.close()  # drop the connection mid-stream
    await s.close()
    await asyncio.wait_for(state.disconnected.wait(), 10)
    cluster = gw.gateway.runtime.clusters.get("llm")
    for _ in range(100):
        if cluster.get("a").in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert cluster.get("a").in_flight == 0


async def test_local_errors_are_openai_json(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a], hcm_extra={"max_request_body_bytes": 1000}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/nope", json={}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "not_found"
        async with s.post(f"{gw.url}/v1/completions", data=b"x" * 5000) as r:
            assert r.status == 413
            err = (await r.json())["error"]
            assert err["code"] == 413 and "1000" in err["message"]
        async with s.get(f"{gw.admin_url}/readyz") as r:
            assert r.status == 200
        async with s.get(f"{gw.admin_url}/healthz") as r:
            assert r.status == 200


async def test_least_request_sends_new_requests_away_from_a_busy_endpoint(upstreams: Upstreams, gateways) -> None:
    a, b = await upstreams.add("a"), await upstreams.add("b")
    gw = await launch(gateways, gateway_config([a, b], lb="least_request"))
    held_body = {"prompt": "x", "stream": True, "x_chunks": 2, "x_wait_release": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json=held_body) as held:
            busy = held.headers["x-served-by"]
            assert (await held.content.readline()).startswith(b"data: ")  # in flight on `busy` until released
            served = []
            for _ in range(4):
                async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
                    served.append((await r.json())["served_by"])
            upstreams.states[busy].release_last.set()
            assert (await held.read()).endswith(b"data: [DONE]\n\n")
    idle = ({"a", "b"} - {busy}).pop()
    assert served == [idle] * 4  # round robin would have sent two of them to the busy endpoint
    async with aiohttp.ClientSession() as s:  # both idle again: ties rotate over the endpoints
        seen = set()
        for _ in range(2):
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
                seen.add((await r.json())["served_by"])
    assert seen == {"a", "b"}


async def test_ring_hash_is_sticky_per_session_and_spreads_sessions(upstreams: Upstreams, gateways) -> None:
    a, b = await upstreams.add("a"), await upstreams.add("b")
    gw = await launch(gateways, gateway_config([a, b], lb="RingHashing"))
    async with aiohttp.ClientSession() as s:
        seen = {}
        for sess in ("s1", "s2", "s3", "s4", "s5", "s6"):
            got = set()
            for _ in range(3):
                async with s.post(
                    f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-session-id": sess}
                ) as r:
                    got.add((await r.json())["served_by"])
            assert len(got) == 1  # sticky per session
            seen[sess] = got.pop()
    assert set(seen.values()) == {"a", "b"}  # and spread across endpoints


async def test_paths_are_forwarded_verbatim_and_dot_segments_rejected(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    async with aiohttp.ClientSession() as s:
        async with s.get(aiohttp.client.URL(f"{gw.url}/v1/models/org%2Fmodel?x=%3F", encoded=True)) as r:
            assert r.status == 404
            got = await r.json()
        assert got == {"raw_path": "/v1/models/org%2Fmodel", "query": "x=%3F"}
        # "/v1/../admin" would be collapsed to "/admin" by the upstream client: escape from the route prefix
        async with s.post(aiohttp.client.URL(f"{gw.url}/v1/../reset_prefix_cache", encoded=True), json={}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert all("reset_prefix_cache" not in c.get("path", "") for c in upstreams.states["a"].calls)


async def test_upstream_dying_mid_stream_is_counted_and_truncates(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a]))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/die", json={}) as r:
            assert r.status == 200
            try:
                await r.read()
                truncated = False
            except aiohttp.ClientPayloadError:
                truncated = True
        assert truncated  # never a clean end for an aborted stream
        async with s.get(f"{gw.admin_url}/metrics") as r:
            text = await r.text()
        # the gateway still answers, and the abort was counted
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 200
            assert len(r.headers.getall("date")) == 1  # no duplicated Date from the upstream
    assert 'kvgate_requests_total{cluster="llm",endpoint="a",status="upstream_aborted"} 1.0' in text
