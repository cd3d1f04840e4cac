"""Issue 10 items 1, 19, 3: an answer proves an endpoint alive; transport failures back off; https checks."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import Upstreams, dead_port, gateway_config, launch


async def test_5xx_and_429_answers_never_eject_the_endpoint(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    state = upstreams.states["a"]
    gw = await launch(gateways, gateway_config([a], fallback=True))
    async with aiohttp.ClientSession() as s:
        state.fail_status = 500
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 500  # the upstream's answer, passed through
        state.fail_status = 429
        state.fail_headers = [(b"retry-after", b"7")]
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 429  # passed back, never turned into a 503
            assert r.headers["retry-after"] == "7"
        assert len(state.calls) == 2  # a 429 is not retried on the same endpoint
        state.fail_status = None
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 200  # the endpoint was never taken out of rotation
    assert gw.gateway.runtime.clusters.get("llm").get("a").healthy()


async def test_429_is_retried_on_another_endpoint(upstreams: Upstreams, gateways) -> None:
    a, b = await upstreams.add("a"), await upstreams.add("b")
    upstreams.states["a"].fail_status = 429
    gw = await launch(gateways, gateway_config([a, b], fallback=True, filters=[{"name": "test.prefer"}]))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "a"}) as r:
            assert r.status == 200
            assert (await r.json())["served_by"] == "b"
    assert gw.gateway.runtime.clusters.get("llm").get("a").healthy()


async def test_outlier_detection_ejects_after_consecutive_5xx_of_distinct_requests(
    upstreams: Upstreams, gateways
) -> None:
    a, b = await upstreams.add("a"), await upstreams.add("b")
    upstreams.states["a"].fail_status = 503
    cfg = gateway_config(
        [a, b],
        filters=[{"name": "test.prefer"}],
        llm_meta={"retry_policy": {"name": "CountBased", "config": {"times": 2}}},
    )
    cfg["clusters"][0]["outlier_detection"] = {
        "consecutive_5xx": 3,
        "base_ejection_time": "30s",
        "max_ejection_time": "5m",
    }
    gw = await launch(gateways, cfg)
    ep = gw.gateway.runtime.clusters.get("llm").get("a")
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            # three attempts per request on "a": the request counts once
            assert ep.healthy(), i
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "a"}) as r:
                assert r.status == 503
        assert not ep.healthy()
        assert "consecutive_5xx" in ep.cooldown_reason and ep.cooldown_s == 30.0
        async with s.get(f"{gw.admin_url}/metrics") as r:
            text = await r.text()
    assert 'kvgate_endpoint_ejections_total{cause="consecutive_5xx",cluster="llm",endpoint="a"} 1.0' in text


async def test_503_names_the_endpoints_and_why(gateways) -> None:
    gw = await launch(gateways, gateway_config([("d1", dead_port())]))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
        async with s.post(f"{gw.url}/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
            msg = (await r.json())["error"]["message"]
    assert "d1 cooling down" in msg and "connection failure" in msg and "unhealthy" not in msg


async def test_passive_cooldown_backs_off_exponentially_and_resets_on_success(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    gw = await launch(gateways, gateway_config([a, ("dead", dead_port())], llm_meta={"health_check_interval": 1000}))
    cluster = gw.gateway.runtime.clusters.get("llm")
    dead = cluster.get("dead")
    lengths = []
    for _ in range(4):
        cluster.mark_failed(dead, "connection failure (test)")
        lengths.append(dead.cooldown_s)
    assert lengths == [1.0, 2.0, 4.0, 8.0]
    cluster.mark_ok(dead)
    cluster.mark_failed(dead, "connection failure (test)")
    assert dead.cooldown_s == 1.0
    # capped by the cluster's max_ejection_time (default 300 s)
    for _ in range(20):
        cluster.mark_failed(dead)
    assert dead.cooldown_s == 300.0


async def test_active_health_check_uses_the_proxy_scheme(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    hc = {"path": "/health", "interval": "50ms", "timeout": "1s", "unhealthy_threshold": 1}
    plain = gateway_config([a])
    plain["clusters"][0]["health_check"] = hc
    tls = gateway_config([a], proxy={"scheme": "https"})
    tls["clusters"][0]["health_check"] = hc
    gw_plain = await launch(gateways, plain)
    gw_tls = await launch(gateways, tls)
    ep_tls = gw_tls.gateway.runtime.clusters.get("llm").get("a")
    for _ in range(100):
        if not ep_tls.active_healthy:
            break
        await asyncio.sleep(0.05)
    # a TLS handshake against the plain-HTTP upstream fails: the check really spoke https
    assert not ep_tls.active_healthy
    assert gw_plain.gateway.runtime.clusters.get("llm").get("a").active_healthy


async def test_dead_endpoint_cooldown_backs_off_over_real_requests(upstreams: Upstreams, gateways) -> None:
    a = await upstreams.add("a")
    cfg = gateway_config(
        [a, ("dead", dead_port())],
        fallback=True,
        filters=[{"name": "test.prefer"}],
        llm_meta={"health_check_interval": 50},
    )
    gw = await launch(gateways, cfg)
    dead = gw.gateway.runtime.clusters.get("llm").get("dead")
    lengths = []
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            for _ in range(200):  # wait (bounded) until the cooldown is over
                if dead.healthy():
                    break
                await asyncio.sleep(0.02)
            async with s.post(
                f"{gw.url}/v1/completions", json={"prompt": "x"}, headers={"x-test-preferred": "dead"}
            ) as r:
                assert r.status == 200  # failed over to "a"
            lengths.append(dead.cooldown_s)
        # a success resets the back-off
        gw.gateway.runtime.clusters.get("llm").mark_ok(dead)
    assert lengths == [0.05, 0.1, 0.2]
    assert dead.ejections == 0
