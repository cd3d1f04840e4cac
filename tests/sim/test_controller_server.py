"""Simulated LMCache controller over real HTTP: lookup semantics, commands on in-process workers, errors."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kvgate.serving import start_server
from kvgate_sim.controller_core import SimController
from kvgate_sim.controller_server import create_controller_app
from kvgate_sim.protocol import lmcache_chunk_hashes
from tests.lmcache.fake_worker import FakeWorker

CPU = "LocalCPUBackend"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def toks(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


class Client:
    def __init__(self, url: str, session: aiohttp.ClientSession, ctl: SimController) -> None:
        self.url, self.session, self.ctl = url, session, ctl

    async def post(
        self, path: str, body: Any = None, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"json": body} if data is None else {"data": data, "headers": headers or {}}
        async with self.session.post(self.url + path, **kwargs) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.json(content_type=None)

    def worker(self, inst: str, wid: int = 0, peer: str | None = None, ip: str = "127.0.0.1") -> FakeWorker:
        w = FakeWorker(inst, wid, [self.ctl.op_sink])
        self.ctl.register_worker(w, ip, 8000 + len(self.ctl.index.registered_workers()), peer)
        return w

    async def layout(self, tokens: list[int]) -> dict[str, list[Any]]:
        status, body = await self.post("/lookup", {"tokens": tokens})
        assert status == 200
        assert re.fullmatch("Lookup" + UUID, body["event_id"])
        return body["layout_info"]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app, ctl = create_controller_app()
    server = await start_server(app)
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(server.url, session, ctl)
    finally:
        await server.stop()


async def test_lookup_semantics_table(client: Client) -> None:
    a = client.worker("instA")
    b = client.worker("instB")
    t600 = toks(600)
    a.store_tokens(t600)
    assert await client.layout(t600) == {"instA": [CPU, 512]}
    t = toks(800)
    b.store_tokens(t)  # chunks 0-2
    assert await client.layout(t) == {"instA": [CPU, 512], "instB": [CPU, 768]}
    a.evict_hashes([lmcache_chunk_hashes(t)[1]])
    assert await client.layout(t) == {"instA": [CPU, 256], "instB": [CPU, 768]}
    assert await client.layout(toks(255)) == {}
    assert await client.layout([]) == {}


async def test_first_registered_is_credited(client: Client) -> None:
    first = client.worker("first")
    second = client.worker("second")
    t = toks(512, 5000)
    second.store_tokens(t)
    assert await client.layout(t) == {"second": [CPU, 512]}
    first.store_tokens(t)
    assert await client.layout(t) == {"first": [CPU, 512]}
    # re-registering clears the worker's keys but keeps its place
    client.ctl.register_worker(first)
    assert await client.layout(t) == {"second": [CPU, 512]}


async def test_validation_errors_match_fastapi(client: Client) -> None:
    assert await client.post("/lookup", {}) == (
        422,
        {"detail": [{"type": "missing", "loc": ["body", "tokens"], "msg": "Field required", "input": {}}]},
    )
    status, body = await client.post("/lookup", {"tokens": ["a"]})
    assert (
        status == 422
        and body["detail"][0]["type"] == "int_parsing"
        and body["detail"][0]["loc"] == ["body", "tokens", 0]
    )
    status, body = await client.post("/lookup", {"tokens": [1.5]})
    assert status == 422 and body["detail"][0]["type"] == "int_from_float"
    assert await client.post("/lookup", data=b"", headers={"content-type": "application/json"}) == (
        422,
        {"detail": [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]},
    )
    assert await client.post("/lookup", data=b"not json", headers={"content-type": "application/json"}) == (
        422,
        {
            "detail": [
                {
                    "type": "json_invalid",
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": "Expecting value"},
                }
            ]
        },
    )
    status, body = await client.post("/lookup", [1])
    assert status == 422 and body["detail"][0]["type"] == "model_attributes_type"
    status, body = await client.post("/clear", {"instance_id": 5})
    assert status == 422 and [d["type"] for d in body["detail"]] == ["string_type", "missing"]
    # lax ints like FastAPI: true, "2", 2.0 are accepted
    status, body = await client.post("/lookup", {"tokens": [True, "2", 2.0]})
    assert status == 200 and body["layout_info"] == {}


async def test_error_bodies_without_workers(client: Client) -> None:
    loc = {"location": CPU}
    assert await client.post("/clear", {"instance_id": "nope", **loc}) == (
        500,
        {"detail": "The number of tokens cleared should be the same across all workers."},
    )
    assert (await client.post("/pin", {"instance_id": "nope", "tokens": [1], **loc}))[1]["detail"] == (
        "The number of tokens pinned should be the same across all workers."
    )
    assert (await client.post("/compress", {"instance_id": "nope", "method": "m", **loc}))[1]["detail"] == (
        "The number of tokens compressed should be the same across all workers."
    )
    assert await client.post("/decompress", {"instance_id": "nope", "method": "m", **loc}) == (500, {"detail": ""})
    assert await client.post("/move", {"old_position": ["a", CPU], "new_position": ["b", CPU]}) == (
        500,
        {"detail": "The number of tokens moved should be the same across all workers."},
    )
    assert await client.post("/check_finish", {"event_id": "x"}) == (500, {"detail": ""})
    status, body = await client.post("/query_instance", {"event_id": "e", "ip": "127.0.0.9"})
    assert status == 500 and body["detail"].startswith(
        "1 validation error for QueryInstResponse\nres\n  Input should be a valid string [type=string_type, "
        "input_value=None, input_type=NoneType]"
    )
    status, body = await client.post("/health", {"instance_id": "nope"})
    assert status == 200 and body["error_codes"] == {} and body["event_id"].startswith("health")
    status, body = await client.post("/query_worker_info", {"instance_id": "nope"})
    assert status == 200 and body["worker_infos"] == [] and body["event_id"].startswith("QueryWorkerInfo")
    assert await client.get("/controller/key-stats") == (
        200,
        {"total_key_count": 0, "total_instance_count": 0, "total_worker_count": 0, "instances": []},
    )
    assert await client.get("/controller/workers") == (200, {"workers": [], "total_count": 0})
    assert await client.get("/controller/workers?instance_id=x") == (404, {"detail": "No workers found for instance x"})
    assert await client.get("/controller/workers?instance_id=x&worker_id=0") == (
        404,
        {"detail": "Worker (x, 0) not found"},
    )
    status, body = await client.get("/controller/workers?instance_id=x&worker_id=q")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "worker_id"]
    async with client.session.get(client.url + "/lookup") as r:
        assert r.status == 405 and await r.json() == {"detail": "Method Not Allowed"}
        assert r.headers["allow"] == "POST"
    assert await client.post("/controller/key-stats", {}) == (405, {"detail": "Method Not Allowed"})
    assert await client.post("/nope", {}) == (404, {"detail": "Not Found"})


async def test_commands_change_worker_state(client: Client) -> None:
    a = client.worker("instA", ip="127.0.0.5")
    t = toks(700)
    a.store_tokens(t)
    status, body = await client.post("/pin", {"instance_id": "instA", "location": CPU, "tokens": t})
    assert status == 200 and body["num_tokens"] == 512 and re.fullmatch("Pin" + UUID, body["event_id"])
    assert a.pinned == set(lmcache_chunk_hashes(t))
    t2 = toks(512, 9000)
    a.store_tokens(t2)
    assert (
        await client.post("/compress", {"instance_id": "instA", "method": "cachegen", "location": CPU, "tokens": t2})
    )[1]["num_tokens"] == 512
    assert (
        await client.post(
            "/decompress", {"instance_id": "instA", "method": "cachegen", "location": CPU, "tokens": t2[:300]}
        )
    )[1]["num_tokens"] == 256
    # clear evicts the unpinned chunks; the index follows at once (ops are applied synchronously)
    status, body = await client.post("/clear", {"instance_id": "instA", "location": CPU})
    assert (status, body["num_tokens"]) == (200, 512) and body["event_id"].startswith("Clear")
    assert await client.layout(t2) == {}
    assert await client.layout(t) == {"instA": [CPU, 512]}  # pinned chunks survive
    assert (await client.post("/health", {"instance_id": "instA"}))[1]["error_codes"] == {"0": 0}
    a.health_code = 3
    assert (await client.post("/health", {"instance_id": "instA"}))[1]["error_codes"] == {"0": 3}
    a.fail.add("health")
    assert (await client.post("/health", {"instance_id": "instA"}))[1]["error_codes"] == {"0": -1001}
    a.fail.add("clear")
    assert await client.post("/clear", {"instance_id": "instA", "location": CPU}) == (
        500,
        {"detail": "Operation 'clear' is not supported."},
    )
    assert (await client.post("/query_instance", {"event_id": "x", "ip": "127.0.0.5"}))[1]["res"] == "instA"
    status, body = await client.post("/query_worker_info", {"instance_id": "instA"})
    assert [(i["instance_id"], i["worker_id"], i["ip"], i["peer_init_url"]) for i in body["worker_infos"]] == [
        ("instA", 0, "127.0.0.5", None)
    ]
    assert set(body["worker_infos"][0]) == {
        "instance_id",
        "worker_id",
        "ip",
        "port",
        "peer_init_url",
        "registration_time",
        "last_heartbeat_time",
    }


async def test_multi_worker_mismatch_and_stats(client: Client) -> None:
    w0 = client.worker("tp", 0)
    w1 = client.worker("tp", 1)
    t = toks(512)
    w0.store_tokens(t)
    w1.store_tokens(t[:256])
    assert await client.post("/pin", {"instance_id": "tp", "location": CPU, "tokens": t}) == (
        500,
        {"detail": "The number of tokens pinned should be the same across all workers."},
    )
    w1.store_tokens(t)
    assert (await client.post("/pin", {"instance_id": "tp", "location": CPU, "tokens": t}))[1]["num_tokens"] == 512
    assert (await client.post("/health", {"instance_id": "tp"}))[1]["error_codes"] == {"0": 0, "1": 0}
    assert (await client.get("/controller/key-stats"))[1] == {
        "total_key_count": 4,
        "total_instance_count": 1,
        "total_worker_count": 2,
        "instances": [{"instance_id": "tp", "key_count": 4, "worker_count": 2}],
    }
    status, one = await client.get("/controller/workers?instance_id=tp&worker_id=1")
    assert status == 200 and one["key_count"] == 2 and one["worker_id"] == 1
    status, lst = await client.get("/controller/workers?instance_id=tp")
    assert lst["total_count"] == 2 and [w["worker_id"] for w in lst["workers"]] == [0, 1]


async def test_move_and_evict_extension(client: Client) -> None:
    src = client.worker("src")
    dst_nop2p = client.worker("nop2p")
    dst = client.worker("dst", peer="127.0.0.1:7777")
    t = toks(600)
    src.store_tokens(t)
    assert await client.post("/move", {"old_position": ["src", CPU], "new_position": ["nop2p", CPU], "tokens": t}) == (
        500,
        {
            "detail": (
                "Src worker 0 not registered for instance src or dst worker 0 not registered for instance nop2p "
                "or P2P is not enabled."
            )
        },
    )
    assert not dst_nop2p.store
    status, body = await client.post(
        "/move", {"old_position": ["src", CPU], "new_position": ["dst", CPU], "tokens": t, "should_copy": True}
    )
    assert (status, body["num_tokens"]) == (200, 512) and body["event_id"].startswith("Move")
    assert await client.layout(t) == {"src": [CPU, 512]}
    assert set(dst.store[CPU]) == set(lmcache_chunk_hashes(t))
    src.store_tokens(toks(256, 7000))
    client.ctl.deregister_worker("src", 0)
    assert await client.layout(t) == {"dst": [CPU, 512]}
    status, body = await client.post("/evict", {"tokens": t[:300], "instance_id": "dst"})
    assert (status, body["num_tokens"]) == (200, 256) and body["event_id"].startswith("Evict")
    assert await client.layout(t) == {}
    assert await client.post("/evict", {"tokens": t, "instance_id": "ghost"}) == (
        500,
        {"detail": "The number of tokens evicted should be the same across all workers."},
    )
    status, body = await client.post("/evict", {"instance_id": "dst"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "tokens"]
