"""Differential and round-trip tests against the REAL LMCache 0.5.6 controller (marker ``lmcache``)."""

from __future__ import annotations

import json
import random
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from kvgate.serving import serve_in_thread
from kvgate_sim.controller_core import SimController
from kvgate_sim.controller_server import create_controller_app
from kvgate_sim.lmcache_real import RealController, http_json, lmcache_python
from kvgate_sim.lmcache_worker import LMCacheWorkerBridge
from kvgate_sim.protocol import lmcache_chunk_hashes
from tests.lmcache.conftest import api, barrier, require_lmcache, wait_deregistered, wait_until
from tests.lmcache.fake_worker import FakeWorker

pytestmark = pytest.mark.lmcache

CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"


def test_chunk_hash_equals_real_chunked_token_database() -> None:
    require_lmcache()
    rng = random.Random(1)
    cases = [[rng.randrange(150_000) for _ in range(n)] for n in (0, 1, 255, 256, 257, 600, 1024, 1500)]
    script = (
        "import json, sys\n"
        "from lmcache.v1.token_database import ChunkedTokenDatabase\n"
        "db = ChunkedTokenDatabase()\n"
        "cases = json.load(sys.stdin)\n"
        "print(json.dumps([[[s, e, h] for s, e, h in db.process_tokens(c, make_key=False)] for c in cases]))\n"
    )
    for seed in ("0", "123"):
        out = subprocess.run(
            [str(lmcache_python()), "-c", script],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={"PYTHONHASHSEED": seed, "LMCACHE_TRACK_USAGE": "false", "PATH": "/usr/bin:/bin"},
        )
        real = json.loads(out.stdout.strip().splitlines()[-1])
        for tokens, chunks in zip(cases, real, strict=True):
            ours = lmcache_chunk_hashes(tokens, save_unfull_chunk=True)
            assert [h for _s, _e, h in chunks] == ours
            assert [e for _s, e, _h in chunks] == [min(256 * (i + 1), len(tokens)) for i in range(len(ours))]


# --------------------------------------------------------------------------- differential
class Pair:
    """One simulated worker reported to both the real controller (bridge) and the simulated one."""

    def __init__(self, real: RealController, sim: SimController, inst: str, wid: int) -> None:
        self.sim = sim
        self.worker = FakeWorker(inst, wid)
        self.bridge = LMCacheWorkerBridge(self.worker, real.pull_url, real.reply_url, heartbeat_interval=None).start()
        self.worker.sinks += [self.bridge.op_sink, sim.op_sink]
        sim.register_worker(self.worker, "127.0.0.1", self.bridge.port)
        self.registered = True


@pytest.fixture
def sim() -> Iterator[tuple[SimController, str]]:
    app, ctl = create_controller_app()
    with serve_in_thread(app) as server:
        yield ctl, server.url


def _compare(real: RealController, sim_url: str, queries: list[list[int]]) -> None:
    for q in queries:
        s_real, b_real = api(real, "/lookup", {"tokens": q})
        s_sim, b_sim = http_json(sim_url + "/lookup", {"tokens": q})
        assert (s_real, s_sim) == (200, 200)
        assert json.dumps(b_real["layout_info"]) == json.dumps(b_sim["layout_info"]), f"len={len(q)}"


@pytest.mark.parametrize("seed", range(6))
def test_differential_random_sequences(real_ctl: RealController, sim: tuple[SimController, str], seed: int) -> None:
    sim_ctl, sim_url = sim
    rng = random.Random(seed)
    # prompts sharing prefixes → deep chains held by several instances
    base = [rng.randrange(100_000) for _ in range(256 * 6)]
    prompts = [
        base[: rng.randrange(256, len(base))] + [rng.randrange(100_000) for _ in range(rng.randrange(600))]
        for _ in range(8)
    ]
    chains = [lmcache_chunk_hashes(p) for p in prompts]
    names = [f"s{seed}i{k}" for k in range(4)]
    pairs: list[Pair] = []
    try:
        for name in names:
            for wid in [0, 1] if rng.random() < 0.3 else [0]:
                pairs.append(Pair(real_ctl, sim_ctl, name, wid))
        rng.shuffle(pairs)  # op interleaving; registration order is already fixed
        for _phase in range(5):
            for _ in range(25):
                p = rng.choice(pairs)
                chain = rng.choice(chains)
                loc = CPU if rng.random() < 0.75 else DISK
                if rng.random() < 0.65:
                    p.worker.admit_hashes(chain[: rng.randrange(1, len(chain) + 1)], loc)
                else:
                    p.worker.evict_hashes(rng.sample(chain, rng.randrange(1, min(4, len(chain)) + 1)), loc)
            # registration events need every previously pushed op processed first
            for p in pairs:
                if p.registered:
                    barrier(real_ctl, p.bridge)
            _compare(real_ctl, sim_url, prompts + [p_[:300] for p_ in prompts])
            p = rng.choice(pairs)
            r = rng.random()
            if p.registered and r < 0.4:
                assert p.bridge.reregister()  # known worker: keys cleared, place kept
                sim_ctl.register_worker(p.worker, "127.0.0.1", p.bridge.port)
            elif p.registered and r < 0.7:
                assert p.bridge.deregister()
                wait_deregistered(real_ctl, p.worker.instance_id, p.worker.worker_id)
                sim_ctl.deregister_worker(p.worker.instance_id, p.worker.worker_id)
                p.registered = False
            elif not p.registered:
                assert p.bridge.reregister()  # new registration: goes to the end
                sim_ctl.register_worker(p.worker, "127.0.0.1", p.bridge.port)
                p.registered = True
        for p in pairs:
            if p.registered:
                barrier(real_ctl, p.bridge)
        _compare(real_ctl, sim_url, prompts + [p_[: rng.randrange(len(p_) + 1)] for p_ in prompts for _ in range(3)])
        # the registries agree too
        for name in names:
            _, r = api(real_ctl, "/query_worker_info", {"instance_id": name})
            _, s = http_json(sim_url + "/query_worker_info", {"instance_id": name})
            assert [(w["worker_id"], w["port"]) for w in r["worker_infos"]] == [
                (w["worker_id"], w["port"]) for w in s["worker_infos"]
            ]
        _status, stats = api(real_ctl, "/controller/key-stats")
        real_counts = {
            i["instance_id"]: (i["key_count"], i["worker_count"])
            for i in stats["instances"]
            if i["instance_id"] in names
        }
        sim_counts = {
            i["instance_id"]: (i["key_count"], i["worker_count"]) for i in sim_ctl.index.key_stats()["instances"]
        }
        assert real_counts == sim_counts
    finally:
        for p in pairs:
            p.bridge.close()
    for name in names:
        wait_until(
            lambda n=name: api(real_ctl, "/query_worker_info", {"instance_id": n})[1]["worker_infos"] == [],
            what=f"{name} gone",
        )


# --------------------------------------------------------------------------- commands through the bridge
@pytest.fixture
def bridged(real_ctl: RealController) -> Iterator[tuple[FakeWorker, LMCacheWorkerBridge]]:
    w = FakeWorker("cmdA")
    b = LMCacheWorkerBridge(w, real_ctl.pull_url, real_ctl.reply_url, heartbeat_interval=None).start()
    w.sinks.append(b)
    try:
        yield w, b
    finally:
        b.close()
        wait_deregistered(real_ctl, "cmdA", 0)


def test_pin_clear_health_worker_info_roundtrip(real_ctl: RealController, bridged: tuple[FakeWorker, Any]) -> None:
    w, b = bridged
    t = list(range(1000, 1700))
    w.store_tokens(t)
    barrier(real_ctl, b)
    status, body = api(real_ctl, "/lookup", {"tokens": t})
    assert body["layout_info"] == {"cmdA": [CPU, 512]}
    status, body = api(real_ctl, "/pin", {"instance_id": "cmdA", "location": CPU, "tokens": t})
    assert (status, body["num_tokens"]) == (200, 512) and re.match("Pin", body["event_id"])
    assert w.pinned == set(lmcache_chunk_hashes(t))
    status, body = api(real_ctl, "/health", {"instance_id": "cmdA"})
    assert (status, body["error_codes"]) == (200, {"0": 0})
    w.health_code = 7
    assert api(real_ctl, "/health", {"instance_id": "cmdA"})[1]["error_codes"] == {"0": 7}
    w.fail.add("health")
    assert api(real_ctl, "/health", {"instance_id": "cmdA"})[1]["error_codes"] == {"0": -1001}
    status, body = api(real_ctl, "/query_worker_info", {"instance_id": "cmdA"})
    [info] = body["worker_infos"]
    assert (info["instance_id"], info["worker_id"], info["ip"], info["port"], info["peer_init_url"]) == (
        "cmdA",
        0,
        "127.0.0.1",
        b.port,
        None,
    )
    assert api(real_ctl, "/query_instance", {"event_id": "x", "ip": "127.0.0.1"})[1]["res"]  # some instance
    t2 = list(range(5000, 5512))
    w.store_tokens(t2)
    status, body = api(real_ctl, "/compress", {"instance_id": "cmdA", "method": "m", "location": CPU, "tokens": t2})
    assert (status, body["num_tokens"]) == (200, 512) and ("compress", None) in w.calls
    status, body = api(
        real_ctl, "/decompress", {"instance_id": "cmdA", "method": "m", "location": CPU, "tokens": t2[:256]}
    )
    assert (status, body["num_tokens"]) == (200, 256)
    status, body = api(real_ctl, "/clear", {"instance_id": "cmdA", "location": CPU})
    assert (status, body["num_tokens"]) == (200, 512)  # the pinned chunks stay
    barrier(real_ctl, b)
    assert api(real_ctl, "/lookup", {"tokens": t2})[1]["layout_info"] == {}
    assert api(real_ctl, "/lookup", {"tokens": t})[1]["layout_info"] == {"cmdA": [CPU, 512]}
    w.fail.add("clear")
    assert api(real_ctl, "/clear", {"instance_id": "cmdA", "location": CPU}) == (
        500,
        {"detail": "Operation 'clear' is not supported."},
    )


def test_move_between_bridges(real_ctl: RealController) -> None:
    src, dst = FakeWorker("mvSrc"), FakeWorker("mvDst")
    bs = LMCacheWorkerBridge(
        src, real_ctl.pull_url, real_ctl.reply_url, heartbeat_interval=None, peer_init_url="127.0.0.1:1"
    ).start()
    bd = LMCacheWorkerBridge(
        dst, real_ctl.pull_url, real_ctl.reply_url, heartbeat_interval=None, peer_init_url="127.0.0.1:2"
    ).start()
    try:
        src.sinks.append(bs)
        dst.sinks.append(bd)
        t = list(range(3000, 3600))
        src.store_tokens(t)
        status, body = api(
            real_ctl, "/move", {"old_position": ["mvSrc", CPU], "new_position": ["mvDst", CPU], "tokens": t}
        )
        assert (status, body["num_tokens"]) == (200, 512)
        barrier(real_ctl, bs)
        barrier(real_ctl, bd)
        assert api(real_ctl, "/lookup", {"tokens": t})[1]["layout_info"] == {"mvDst": [CPU, 512]}
    finally:
        bs.close()
        bd.close()
    wait_deregistered(real_ctl, "mvSrc", 0)
    wait_deregistered(real_ctl, "mvDst", 0)


def test_full_sync_after_deregistration(real_ctl: RealController) -> None:
    w = FakeWorker("syncA")
    b = LMCacheWorkerBridge(w, real_ctl.pull_url, real_ctl.reply_url, heartbeat_interval=0.2).start()
    try:
        assert b.heartbeat_url is not None
        w.sinks.append(b)
        t = list(range(7000, 7800))
        w.store_tokens(t)
        barrier(real_ctl, b)
        wait_until(lambda: b.flush(0.1))
        assert b.deregister()
        # the next heartbeat re-registers the unknown worker and asks for a full sync
        syncs = b.full_syncs_completed
        wait_until(lambda: b.full_syncs_completed > syncs, what="full sync")
        assert api(real_ctl, "/lookup", {"tokens": t})[1]["layout_info"] == {"syncA": [CPU, 768]}
        w.evict_hashes(lmcache_chunk_hashes(t)[2:])
        barrier(real_ctl, b)
        assert api(real_ctl, "/lookup", {"tokens": t})[1]["layout_info"] == {"syncA": [CPU, 512]}
    finally:
        b.close()
    wait_deregistered(real_ctl, "syncA", 0)


# --------------------------------------------------------------------------- error-body parity
BAD_REQUESTS: list[tuple[str, bytes | None, str | None]] = [
    ("/lookup", b"{}", "application/json"),
    ("/lookup", b"", "application/json"),
    ("/lookup", b"not json", "application/json"),
    ("/lookup", b"[1]", "application/json"),
    ("/lookup", b"null", "application/json"),
    ("/lookup", b'{"tokens":"abc"}', "application/json"),
    ("/lookup", b'{"tokens":[true, 1.5, "a", "2", null, 2.0]}', "application/json"),
    ("/lookup", b'{"tokens":[1]}', "text/plain"),
    ("/clear", b'{"instance_id":5}', "application/json"),
    ("/clear", b'{"instance_id":"ghost","location":"LocalCPUBackend"}', "application/json"),
    ("/pin", b'{"instance_id":"ghost","location":"LocalCPUBackend","tokens":[1]}', "application/json"),
    ("/compress", b'{"instance_id":"ghost","method":"m","location":"l","tokens":null}', "application/json"),
    ("/decompress", b'{"instance_id":"ghost","method":"m","location":"l"}', "application/json"),
    ("/move", b'{"old_position":["a"],"new_position":"b"}', "application/json"),
    ("/move", b'{"old_position":["a","b"],"new_position":["c","d"]}', "application/json"),
    ("/query_worker_info", b'{"instance_id":"x","worker_ids":"a"}', "application/json"),
    ("/query_worker_info", b'{"instance_id":"ghost"}', "application/json"),
    ("/query_instance", b'{"event_id":"e","ip":"10.255.255.1"}', "application/json"),
    ("/query_instance", b'{"ip":"x"}', "application/json"),
    ("/check_finish", b'{"event_id":"e"}', "application/json"),
    ("/check_finish", b"{}", "application/json"),
    ("/health", b'{"instance_id":"ghost"}', "application/json"),
    ("/health", b'{"instance_id":["x"]}', "application/json"),
    ("/lookup", None, None),  # GET → 405
    ("/controller/workers?instance_id=ghost", None, None),
    ("/controller/workers?instance_id=ghost&worker_id=q", None, None),
    ("/controller/workers?instance_id=ghost&worker_id=0", None, None),
    ("/nope", b"{}", "application/json"),
]


def _raw(url: str, data: bytes | None, ctype: str | None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if ctype:
        req.add_header("content-type", ctype)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    body = json.loads(raw)
    if isinstance(body, dict) and isinstance(body.get("event_id"), str):
        body["event_id"] = re.sub(r"[0-9a-f-]{36}$", "<uuid>", body["event_id"])
    return status, body


@pytest.mark.parametrize(("path", "data", "ctype"), BAD_REQUESTS)
def test_error_bodies_match_real(
    real_ctl: RealController, sim: tuple[SimController, str], path: str, data: bytes | None, ctype: str | None
) -> None:
    assert _raw(sim[1] + path, data, ctype) == _raw(real_ctl.url + path, data, ctype)
